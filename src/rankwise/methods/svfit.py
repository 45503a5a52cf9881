"""SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values
(Sun, Wei, Wu, Shi, He, Ma, Xie, Yang, 2024, arXiv:2409.05926).

The base weight is split by its SVD into the best rank-``r`` part and a frozen residual; the top
``r`` singular values become trainable and rescale the fixed principal subspaces::

    W0 = U_r diag(σ) V_rᵀ + W_res,        W = U_r diag(σ') V_rᵀ + W_res,   σ' ∈ R^r trained
    ΔW = W − W0 = U_r diag(σ' − σ) V_rᵀ               (σ' = σ at init → ΔW = 0 exactly)

Option ``rotate=True`` (the "optionally rotations" extension; the paper trains singular values
only) also trains orthogonal rotations of the two principal bases, ``U_r → U_r R_U``,
``V_r → V_r R_V`` with Cayley ``R = (I − Q)⁻¹(I + Q)``, ``Q`` skew (``r(r−1)/2`` entries each,
zero at init so ``R = I``)::

    ΔW = U_r (R_U diag(σ') R_Vᵀ − diag(σ)) V_rᵀ

Parameters per layer: ``r`` (+ ``r(r − 1)`` with ``rotate``). ``rank`` is clamped to
``min(out, in)``. The residual is never formed: the activation view is
``y = W0 x + b + ((x V_r) M) U_rᵀ`` with the ``r × r`` core ``M`` above (diagonal without
``rotate``). The init is a deterministic function of ``W0`` (no randomness; the generator is
unused), and ``U_r, σ, V_r`` are non-persistent buffers recomputed from ``W0`` on load.
Works on every layer kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import low_rank_apply
from ..core.registry import register
from ._svd_common import cayley, check_rank_fits, num_skew, weight_svd


@dataclass
class SvfitConfig(AdapterConfig):
    """rank: r, how many top singular values are trained (clamped to min(out, in));
    rotate: also train Cayley rotations of the top-r left and right singular vectors."""

    rank: int = 8
    rotate: bool = False

    def __post_init__(self):
        super().__post_init__()
        self._check_int("rank")
        self._check(isinstance(self.rotate, bool), "rotate", "rotate must be True or False.")


@register("svfit")
class Svfit(Method):
    """Trainable top-``r`` singular values of ``W0`` (see module docstring)."""

    Config = SvfitConfig
    summary = "train the top-r singular values of W0 (optionally Cayley rotations of their vectors) (SVFit)"
    deterministic_init = True
    default_lr = 1e-2
    demo_options = {"rank": 32}

    def __init__(self, view: LayerView, config: SvfitConfig, generator=None, calibration=None):
        super().__init__(view, config)
        self.rank = r = check_rank_fits(view, config.rank)
        u, s, vt = weight_svd(view, r)
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("s0", s, persistent=False)
        self.register_buffer("vt", vt, persistent=False)
        self.sigma = nn.Parameter(s.clone())
        if config.rotate:
            self.rot_u = nn.Parameter(torch.zeros(num_skew(r), **view.factory_kwargs))
            self.rot_v = nn.Parameter(torch.zeros(num_skew(r), **view.factory_kwargs))

    @classmethod
    def num_params(cls, view: LayerView, config: SvfitConfig) -> int:
        r = check_rank_fits(view, config.rank)
        return r + (2 * num_skew(r) if config.rotate else 0)

    def core(self) -> torch.Tensor:
        """The ``r × r`` matrix ``M`` with ``ΔW = U_r M V_rᵀ``."""
        if not self.config.rotate:
            return torch.diag(self.sigma - self.s0)
        ru, rv = cayley(self.rot_u, self.rank), cayley(self.rot_v, self.rank)
        return (ru * self.sigma) @ rv.t() - torch.diag(self.s0)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if not self.config.rotate:
            return low_rank_apply(self.view, x, base_out, self.vt, self.u * (self.sigma - self.s0))
        return low_rank_apply(self.view, x, base_out, self.vt, self.u @ self.core())

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param(self.u @ self.core() @ self.vt)
