"""SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation
(Cao & Song, 2024, arXiv:2409.00055).

The base weight is split by its SVD into a trainable principal part and a frozen residual::

    W0 = W_p0 + W_res,   W_p0 = U_p0 diag(S_p0) V_p0ᵀ  (top r triplets),   W_res frozen
    W  = W_p + W_res,    W_p  = U_p  diag(S_p)  V_pᵀ    (U_p out × r, S_p r, V_p in × r trained)

initialized at ``(U_p, S_p, V_p) = (U_p0, S_p0, V_p0)``, so ``W = W0`` exactly at init. Training
adds the orthonormal regularizer (Frobenius norms, not squared, as the reference code)::

    L_reg = ‖U_pᵀ U_p − I‖_F + ‖V_pᵀ V_p − I‖_F

``rankwise.train`` (and any loop using ``rw.rank_regularization``) adds ``γ · mean L_reg`` over the
adapter's layers to the task loss (``gamma``, default 4e-4 as in the paper's experiments); by hand, use
:meth:`Sorsa.orthonormal_loss` per layer or :func:`regularizer` for the mean over all SORSA adapters. The paper writes the update as a
separate step ``W_p ← W_p − η_t ∇L_train − γ_t ∇L_reg``; with plain SGD that is adding
``(γ_t/η_t) · L_reg`` to the loss (with Adam the two differ; the reference trainer adds it).

Weight view, exact whatever the float error of the SVD (``W_res`` cancels)::

    ΔW = W_p − W_p0 = (U_p − U_p0) S A + U_p0 ((S_p − S_p0) V_pᵀ + S_p0 (V_p − V_p0)ᵀ)

with ``S A = diag(S_p) V_pᵀ``. The activation view uses the same split so that every term is
exactly zero at init (``identity_at_init``): two products of width ``2r``,
``h = x [V_p, V_p − V_p0]``, ``y = W0 x + b + [h₁ ⊙ S_p, h₁ ⊙ (S_p − S_p0) + h₂ ⊙ S_p0] [U_p − U_p0, U_p0]ᵀ``.
The residual ``W_res`` is never formed (the base layer computes ``W0 x``).

Parameters per layer: ``r (out + in + 1)``. ``rank`` is clamped to ``min(out, in)``. The init is a
deterministic function of ``W0``; the initial factors are non-persistent buffers recomputed from
``W0`` on load. Works on every layer kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.api import adapted_layers
from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.registry import register
from ._svd_common import check_rank_fits, low_rank_out, scale_channels, weight_svd


@dataclass
class SorsaConfig(AdapterConfig):
    """rank: r, the principal singular triplets made trainable (clamped to min(out, in));
    gamma: γ of the orthonormal regularizer that ``rankwise.train`` adds (0: none)."""

    rank: int = 8
    gamma: float = 4e-4

    def __post_init__(self):
        super().__post_init__()
        self._check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
                    "rank", "rank must be a positive integer.")
        self._check(isinstance(self.gamma, (int, float)) and not isinstance(self.gamma, bool) and self.gamma >= 0,
                    "gamma", "gamma (weight of the orthonormal regularizer) must be a number ≥ 0 (0 turns it off).")


@register("sorsa")
class Sorsa(Method):
    """Trainable principal singular triplets with an orthonormal regularizer (see module docstring)."""

    Config = SorsaConfig
    kinds = ("linear", "hf_conv1d", "conv1d", "conv2d", "embedding")
    summary = "principal SVD part U_p S_p V_pᵀ trainable, residual frozen, orthonormal regularizer (SORSA)"
    identity_at_init = True
    deterministic_init = True
    merge_atol = 1e-5
    default_lr = 1e-3

    def __init__(self, view: LayerView, config: SorsaConfig, generator=None, calibration=None):
        super().__init__(view, config)
        self.view, self.config = view, config
        self.rank = r = check_rank_fits(view, config.rank)
        u, s, vt = weight_svd(view, r)
        self.register_buffer("u0", u, persistent=False)
        self.register_buffer("s0", s, persistent=False)
        self.register_buffer("vt0", vt, persistent=False)
        self.sorsa_U = nn.Parameter(u.clone())  # out × r
        self.sorsa_S = nn.Parameter(s.clone())  # r
        self.sorsa_Vt = nn.Parameter(vt.clone())  # r × in  (V_pᵀ)

    @classmethod
    def num_params(cls, view: LayerView, config: SorsaConfig) -> int:
        return check_rank_fits(view, config.rank) * (view.out_features + view.in_features + 1)

    @classmethod
    def rank_regularization(cls, model: nn.Module, name: str) -> torch.Tensor | None:
        """Loss-term hook (``rw.rank_regularization``; ``rankwise.train`` adds it):
        ``γ ·`` the mean :meth:`orthonormal_loss` over adapter ``name``'s layers (None if γ = 0)."""
        layers = [ad for _, layer in adapted_layers(model) for n, ad in layer.adapters.items()
                  if n == name and isinstance(ad, Sorsa)]
        if not layers or not layers[0].config.gamma:
            return None
        return layers[0].config.gamma * torch.stack([ad.orthonormal_loss() for ad in layers]).mean()

    def orthonormal_loss(self) -> torch.Tensor:
        """``‖U_pᵀ U_p − I‖_F + ‖V_pᵀ V_p − I‖_F`` (zero while the factors stay orthonormal)."""
        eye = torch.eye(self.rank, dtype=self.sorsa_U.dtype, device=self.sorsa_U.device)
        u, vt = self.sorsa_U, self.sorsa_Vt
        return torch.linalg.matrix_norm(u.t() @ u - eye) + torch.linalg.matrix_norm(vt @ vt.t() - eye)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        r, s, s0 = self.rank, self.sorsa_S, self.s0
        a = torch.cat([self.sorsa_Vt, self.sorsa_Vt - self.vt0])  # 2r × in
        b = torch.cat([self.sorsa_U - self.u0, self.u0], dim=1)  # out × 2r
        view = self.view

        def mid(h):
            dim = 1 if view.channel_dim == 1 else h.dim() - 1
            h1, h2 = h.narrow(dim, 0, r), h.narrow(dim, r, r)
            first = scale_channels(h1, s, view)
            second = scale_channels(h1, s - s0, view) + scale_channels(h2, s0, view)
            return torch.cat([first, second], dim=dim)

        return low_rank_out(view, x, base_out, a, b, mid=mid)

    def delta_weight(self) -> torch.Tensor:
        u, s, vt, u0, s0, vt0 = self.sorsa_U, self.sorsa_S, self.sorsa_Vt, self.u0, self.s0, self.vt0
        sa = s[:, None] * vt
        d = (u - u0) @ sa + u0 @ ((s - s0)[:, None] * vt + s0[:, None] * (vt - vt0))
        return self.view.to_param(d)


def regularizer(model: nn.Module) -> torch.Tensor:
    """Mean :meth:`Sorsa.orthonormal_loss` over every SORSA adapter of ``model`` (0 if none)."""
    losses = [m.orthonormal_loss() for m in model.modules() if isinstance(m, Sorsa)]
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).mean()
