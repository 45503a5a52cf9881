"""SALT: Singular Value Adaptation with Low-Rank Transformation
(Elsayed et al., 2025, arXiv:2503.16055; BMVC 2025).

With the thin SVD ``W0 = U Σ Vᵀ`` (all ``p = min(out, in)`` triplets), the top ``r`` singular
values get a trainable scale ``α`` and shift ``β``, and the remaining ``p − r`` directions a
low-rank update ``X Y`` of their singular-value block; a ReLU keeps the new "singular value
matrix" non-negative. As the authors' code (``prompt_adapted_segment_anything/modeling/SALT.py``,
``get_modified_singular_values`` and ``forward``)::

    S' = [ diag(α ⊙ σ_r + β)          0           ]        X ((p−r) × k), Y (k × (p−r))
         [        0           diag(σ_rest) + s X Y ]        s = lora_alpha / lora_rank (1 by default)
    W  = U ReLU(S') Vᵀ                 (ReLU entrywise on the whole p × p matrix)
    ΔW = U_r diag(ReLU(α σ_r + β) − σ_r) V_rᵀ + U_rest (ReLU(diag(σ_rest) + s X Y) − diag(σ_rest)) V_restᵀ

The LoRA term lives in the residual singular subspaces only: ``U_rᵀ ΔW V_r`` is the diagonal
scale/shift change, never touched by ``X Y``. Note the ReLU acts entrywise on ``diag(σ_rest) + s X Y``,
so negative off-diagonal entries of ``X Y`` are cut to zero (the reference does exactly this).

Deviations, stated: the reference draws ``X, Y ~ N(0, 0.01²)``; here ``X = 0`` and
``Y ~ N(0, 0.01²)`` (from the generator), so ``W = W0`` exactly at init and both factors get
gradients from the first step on. The reference's optional penalty ``‖scale-shift change‖ +
‖X Y‖`` returned next to its output is not part of the method here. ``lora_alpha`` (an extra
scale on ``X Y``) defaults to ``lora_rank``, i.e. no scale, as the reference.

Activation view (never forms ``ΔW``; the ``p × p`` core is folded into ``U`` per step)::

    y = W0 x + b + [U_r diag(ReLU(α σ_r + β) − σ_r),  U_rest M] (Vᵀ x),     M = ReLU(diag(σ_rest) + s X Y) − diag(σ_rest)

Cost: two products of the size of the base layer (``N · in · p + N · p · out``) plus
``out · (p − r)²`` per step for ``U_rest M``, and ``(out + in) · p`` frozen values — the price of
an update that is dense in the residual block (the reference forms the whole weight each step).

Parameters per layer: ``2r + 2k(p − r)``. ``rank`` is clamped to ``p``; ``U, σ, V`` are
non-persistent buffers recomputed from ``W0`` on load. Works on every kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import low_rank_apply, normal_
from ..core.registry import register
from ._svd_common import check_rank_fits, weight_svd


@dataclass
class SaltConfig(AdapterConfig):
    """rank: r top singular values scaled and shifted (clamped to min(out, in)); lora_rank: k, the
    rank of X Y on the residual block; lora_alpha: its α (default lora_rank, so s = 1)."""

    rank: int = 8
    lora_rank: int = 8
    lora_alpha: float | None = None

    def __post_init__(self):
        super().__post_init__()
        self._check_int("rank")
        self._check_int("lora_rank")
        self._check(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha",
                    "lora_alpha must be positive (or None: lora_alpha = lora_rank).")

    @property
    def lora_scale(self) -> float:
        return (float(self.lora_rank) if self.lora_alpha is None else float(self.lora_alpha)) / self.lora_rank


@register("salt")
class Salt(Method):
    """Scale/shift of the top singular values plus low-rank on the residual block (see module docstring)."""

    Config = SaltConfig
    summary = "scale & shift the top-r singular values of W0, low-rank X·Y on the rest, ReLU (SALT)"
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: SaltConfig, generator=None, calibration=None):
        super().__init__(view, config)
        self.rank = r = check_rank_fits(view, config.rank)
        p, k = min(view.out_features, view.in_features), config.lora_rank
        self.scale = config.lora_scale
        u, s, vt = weight_svd(view)
        self.register_buffer("u", u, persistent=False)  # out × p
        self.register_buffer("s", s, persistent=False)  # p
        self.register_buffer("vt", vt, persistent=False)  # p × in
        kw = view.factory_kwargs
        self.salt_scale = nn.Parameter(torch.ones(r, **kw))
        self.salt_shift = nn.Parameter(torch.zeros(r, **kw))
        self.salt_X = nn.Parameter(torch.zeros(p - r, k, **kw))
        self.salt_Y = nn.Parameter(normal_(torch.empty(k, p - r, **kw), 0.01, generator))
        self.deterministic_init = r == p  # no residual block: nothing random

    @classmethod
    def num_params(cls, view: LayerView, config: SaltConfig) -> int:
        r, p = check_rank_fits(view, config.rank), min(view.out_features, view.in_features)
        return 2 * r + 2 * config.lora_rank * (p - r)

    def sigma_delta(self) -> torch.Tensor:
        """``ReLU(α ⊙ σ_r + β) − σ_r``: the change of the top singular values."""
        s = self.s[:self.rank]
        return F.relu(self.salt_scale * s + self.salt_shift) - s

    def residual_delta(self) -> torch.Tensor:
        """``M = ReLU(diag(σ_rest) + s X Y) − diag(σ_rest)``, ``(p − r) × (p − r)``."""
        rest = torch.diag(self.s[self.rank:])
        return F.relu(rest + (self.salt_X @ self.salt_Y) * self.scale) - rest

    def _left(self) -> torch.Tensor:
        """``U`` times the change of the core: ``ΔW = _left() Vᵀ``."""
        r = self.rank
        return torch.cat([self.u[:, :r] * self.sigma_delta(), self.u[:, r:] @ self.residual_delta()], dim=1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return low_rank_apply(self.view, x, base_out, self.vt, self._left())

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param(self._left() @ self.vt)
