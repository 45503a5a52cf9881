"""SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation
(Cao & Song, 2024, arXiv:2409.00055).

The base weight is split by its SVD into a trainable principal part and a frozen residual::

    W0 = W_p0 + W_res,   W_p0 = U_p0 diag(S_p0) V_p0ᵀ  (top r triplets),   W_res frozen
    W  = W_p + W_res,    W_p  = U_p  diag(S_p)  V_pᵀ    (U_p out × r, S_p r, V_p in × r trained)

initialized at ``(U_p, S_p, V_p) = (U_p0, S_p0, V_p0)``, so ``W = W0`` exactly at init. Training
adds the orthonormal regularizer, as the authors' code (``sorsalib/src/sorsa/layer.py``
``calc_ortho``: one Frobenius norm — not squared — per factor matrix, averaged over all of them;
``trainer.py``: ``backward((gamma / learning_rate) · calc_ortho(model))``)::

    L_reg = (γ / η_max) · mean over the 2L factor matrices of  ‖U_pᵀ U_p − I‖_F,  ‖V_pᵀ V_p − I‖_F

``rankwise.train`` (and any loop using ``rw.rank_regularization``) adds ``L_reg`` for the adapter's
``L`` layers to the task loss (``gamma``, default 4e-4 as the paper's script). The paper writes
the update as a separate step ``W_p ← W_p − η_t ∇L_train − γ_t ∇L_reg``; with plain SGD at rate
``η`` that is adding ``(γ/η) · L_reg`` to the loss, which is why the reference divides by the
learning rate. The hook does not see the optimizer, so ``η_max`` is the config field ``lr``: set
it to the (peak) learning rate you train with (default None: the method's ``default_lr``, 1e-3;
the paper's script trains at 3e-5). By hand: :meth:`Sorsa.orthonormal_loss` per layer, or
:func:`regularizer` (the reference's ``calc_ortho``) over all SORSA adapters of a model.
Not reproduced: the reference adds the regularizer's gradient after gradient clipping.

Weight view, exact whatever the float error of the SVD (``W_res`` cancels)::

    ΔW = W_p − W_p0 = (U_p − U_p0) S A + U_p0 ((S_p − S_p0) V_pᵀ + S_p0 (V_p − V_p0)ᵀ)

with ``S A = diag(S_p) V_pᵀ``. The activation view uses the same split so that every term is
exactly zero at init (``identity_at_init``): two products of width ``2r``,
``y = W0 x + b + [(U_p − U_p0) S_p + U_p0 (S_p − S_p0),  U_p0 S_p0] [V_p, V_p − V_p0]ᵀ x``.
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
from ..core.ops import low_rank_apply
from ..core.registry import register
from ._svd_common import check_rank_fits, weight_svd


@dataclass
class SorsaConfig(AdapterConfig):
    """rank: r, the principal singular triplets made trainable (clamped to min(out, in));
    gamma: γ of the orthonormal regularizer that ``rankwise.train`` adds (0: none);
    lr: η_max the regularizer divides γ by — your optimizer's (peak) learning rate (None: default_lr)."""

    rank: int = 8
    gamma: float = 4e-4
    lr: float | None = None

    def __post_init__(self):
        super().__post_init__()
        self._check_int("rank")
        self._check(isinstance(self.gamma, (int, float)) and not isinstance(self.gamma, bool) and self.gamma >= 0,
                    "gamma", "gamma (weight of the orthonormal regularizer) must be a number ≥ 0 (0 turns it off).")
        self._check(self.lr is None or (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool)
                                        and self.lr > 0), "lr",
                    "lr (the learning rate γ is divided by) must be positive, or None for the method's default_lr.")


@register("sorsa")
class Sorsa(Method):
    """Trainable principal singular triplets with an orthonormal regularizer (see module docstring)."""

    Config = SorsaConfig
    summary = "principal SVD part U_p S_p V_pᵀ trainable, residual frozen, orthonormal regularizer (SORSA)"
    deterministic_init = True

    def __init__(self, view: LayerView, config: SorsaConfig, generator=None, calibration=None):
        super().__init__(view, config)
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
        ``(γ / lr) ·`` the mean Frobenius norm over adapter ``name``'s ``2L`` factor matrices (None if γ = 0)."""
        layers = [ad for _, layer in adapted_layers(model) for n, ad in layer.adapters.items()
                  if n == name and isinstance(ad, Sorsa)]
        if not layers or not layers[0].config.gamma:
            return None
        cfg = layers[0].config
        lr = cls.default_lr if cfg.lr is None else cfg.lr
        return (cfg.gamma / lr) * torch.stack([ad.orthonormal_loss() for ad in layers]).mean() / 2

    def orthonormal_loss(self) -> torch.Tensor:
        """``‖U_pᵀ U_p − I‖_F + ‖V_pᵀ V_p − I‖_F`` (zero while the factors stay orthonormal)."""
        eye = torch.eye(self.rank, dtype=self.sorsa_U.dtype, device=self.sorsa_U.device)
        u, vt = self.sorsa_U, self.sorsa_Vt
        return torch.linalg.matrix_norm(u.t() @ u - eye) + torch.linalg.matrix_norm(vt @ vt.t() - eye)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` with ``ΔW = B A``, each term exactly zero at init (see module docstring)."""
        u, s, vt, u0, s0, vt0 = self.sorsa_U, self.sorsa_S, self.sorsa_Vt, self.u0, self.s0, self.vt0
        b = torch.cat([(u - u0) * s + u0 * (s - s0), u0 * s0], dim=1)  # out × 2r
        return b, torch.cat([vt, vt - vt0])  # 2r × in

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        b, a = self._factors()
        return low_rank_apply(self.view, x, base_out, a, b)

    def delta_weight(self) -> torch.Tensor:
        b, a = self._factors()
        return self.view.to_param(b @ a)


def regularizer(model: nn.Module) -> torch.Tensor:
    """The reference's ``calc_ortho``: the mean Frobenius norm ``‖UᵀU − I‖_F``, ``‖VᵀV − I‖_F`` over
    every factor matrix of every SORSA adapter of ``model`` (0 if none)."""
    losses = [m.orthonormal_loss() for m in model.modules() if isinstance(m, Sorsa)]
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).mean() / 2
