"""Spectral Adapter: Fine-Tuning in Spectral Space (Zhang & Pilanci, NeurIPS 2024, arXiv:2405.13952).

With the SVD ``W0 = U Σ Vᵀ`` split into the top ``r`` triplets and the rest
(``W0 = U_r Σ_r V_rᵀ + W_rest``), only the top singular vector spaces are fine-tuned:

* ``mode="additive"`` (Spectral Adapter^A) — trainable ``A_U (out × r)``, ``A_V (in × r)``,
  zero at init as in the reference code::

      W = (U_r + A_U) Σ_r (V_r + A_V)ᵀ + W_rest
      ΔW = (U_r + A_U) Σ_r A_Vᵀ + A_U Σ_r V_rᵀ                 (r (out + in) parameters)

* ``mode="rotational"`` (Spectral Adapter^R) — orthogonal ``R_U, R_V (r × r)`` by the Cayley
  parametrization ``R = (I − Q)⁻¹(I + Q)``, ``Q`` skew, zero at init (``R = I``)::

      W = (U_r R_U) Σ_r (V_r R_V)ᵀ + W_rest
      ΔW = U_r (R_U Σ_r R_Vᵀ − Σ_r) V_rᵀ                      (r (r − 1) parameters)

  The rotated vectors stay orthonormal and orthogonal to ``W_rest``'s, so the singular values
  of ``W`` are exactly those of ``W0``.

The authors' rotational code for diffusion models (``edlora.py``) also trains a scale of the top-``r``
singular values (``spectral_C``); use ``svfit`` with ``rotate=True`` for that combination.

Both start at ``ΔW = 0`` exactly. Activation views (``W_rest`` is never formed):
additive ``y = W0 x + b + [x A_V, x V_r] diag(Σ_r, Σ_r) [U_r + A_U, A_U]ᵀ`` (two products of
width ``2r``); rotational ``y = W0 x + b + (x V_r)(U_r M)ᵀ`` with the ``r × r`` core
``M = R_U Σ_r R_Vᵀ − Σ_r``. The init is a deterministic function of ``W0`` (no randomness); the
SVD factors are non-persistent buffers recomputed from ``W0`` on load. ``rank`` is clamped to
``min(out, in)``. Works on every layer kind.
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

MODES = ("additive", "rotational")


@dataclass
class SpectralConfig(AdapterConfig):
    """rank: r top singular vectors tuned (clamped to min(out, in)); mode: 'additive' | 'rotational'."""

    rank: int = 8
    mode: str = "additive"

    def __post_init__(self):
        super().__post_init__()
        self._check_int("rank")
        self._check(self.mode in MODES, "mode", f"use one of {MODES}.")


@register("spectral")
class Spectral(Method):
    """Additive or rotational tuning of the top-``r`` singular vectors (see module docstring)."""

    Config = SpectralConfig
    summary = "tune the top-r singular vectors of W0 additively or by Cayley rotations (Spectral Adapter)"
    deterministic_init = True
    # default_lr: the base's 1e-3, measured on the demo task (3e-3 diverges, 1e-3 beats 3e-4: A_U, A_V
    # are scaled by Σ_r)

    def __init__(self, view: LayerView, config: SpectralConfig, generator=None, calibration=None):
        super().__init__(view, config)
        self.rank = r = check_rank_fits(view, config.rank)
        self.mode = config.mode
        u, s, vt = weight_svd(view, r)
        self.register_buffer("u", u, persistent=False)  # out × r
        self.register_buffer("s", s, persistent=False)  # r
        self.register_buffer("vt", vt, persistent=False)  # r × in
        kw = view.factory_kwargs
        if self.mode == "additive":
            self.spectral_U = nn.Parameter(torch.zeros(view.out_features, r, **kw))
            self.spectral_V = nn.Parameter(torch.zeros(r, view.in_features, **kw))  # A_Vᵀ
        else:
            self.rot_u = nn.Parameter(torch.zeros(num_skew(r), **kw))
            self.rot_v = nn.Parameter(torch.zeros(num_skew(r), **kw))

    @classmethod
    def num_params(cls, view: LayerView, config: SpectralConfig) -> int:
        r = check_rank_fits(view, config.rank)
        if config.mode == "additive":
            return r * (view.out_features + view.in_features)
        return 2 * num_skew(r)

    def core(self) -> torch.Tensor:
        """Rotational mode: ``M = R_U Σ_r R_Vᵀ − Σ_r`` (``ΔW = U_r M V_rᵀ``)."""
        ru, rv = cayley(self.rot_u, self.rank), cayley(self.rot_v, self.rank)
        return (ru * self.s) @ rv.t() - torch.diag(self.s)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.mode == "rotational":
            return low_rank_apply(self.view, x, base_out, self.vt, self.u @ self.core())
        a = torch.cat([self.spectral_V, self.vt])  # [A_Vᵀ; V_rᵀ]   (2r × in)
        b = torch.cat([(self.u + self.spectral_U) * self.s, self.spectral_U * self.s], dim=1)  # (out × 2r)
        return low_rank_apply(self.view, x, base_out, a, b)

    def delta_weight(self) -> torch.Tensor:
        if self.mode == "rotational":
            return self.view.to_param(self.u @ self.core() @ self.vt)
        au, avt = self.spectral_U, self.spectral_V
        d = ((self.u + au) * self.s) @ avt + (au * self.s) @ self.vt
        return self.view.to_param(d)
