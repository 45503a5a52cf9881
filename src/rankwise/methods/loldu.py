"""LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition
(Shi, Wei, Wu, Ran, Sun, He, Yang, 2024, arXiv:2410.13618).

The base weight is factored by LU with partial pivoting and its diagonal split out,
``W0 = P L D U`` (``P`` a permutation, ``L`` unit lower-triangular ``out × k``, ``D`` diagonal,
``U`` unit upper-triangular ``k × in``, ``k = min(out, in)``). The first ``r`` components
``P L_r diag(d_r) U_r`` (the first ``r`` columns of ``L`` and rows of ``U``) are re-parametrized
with a trainable diagonal ``z`` and a trainable scalar ``σ``; the rest stays frozen::

    W = (W0 − σ₀ P L_r diag(d_r) U_r) + σ P L_r diag(z) U_r,     z = d_r, σ = σ₀ at init
    ΔW = P L_r diag(σ z − σ₀ d_r) U_r                           (exactly 0 at init)

As in the reference code, ``σ₀`` is the LoRA-style scaling (here ``alpha / r``, default 1), only
``z`` and ``σ`` are trained, and the default ``rank`` is full (``k``, the reference code's default
of 768 for 768-wide layers), so the parameter count is ``min(out, in) + 1``; a smaller ``rank``
gives ``r + 1``.

Activation view (two thin products, ``P L_r`` pre-multiplied once)::

    y = W0 x + b + (P L_r) ((U_r x) ⊙ (σ z − σ₀ d_r))

With full rank these two products cost as much as the base layer. A zero pivot (rank-deficient
``W0``) leaves that row of ``U`` unnormalized (``d = 0``), which keeps ``ΔW`` exact.
The factors are a deterministic function of ``W0`` (no randomness; non-persistent buffers
recomputed from ``W0`` on load). Works on every layer kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.registry import register
from ._svd_common import check_rank_fits, compute_dtype, factor_dtype, low_rank_out, scale_channels


@dataclass
class LolduConfig(AdapterConfig):
    """rank: LDU components re-parametrized (None: all min(out, in); clamped to it);
    alpha: σ₀ = alpha / r (None: σ₀ = 1)."""

    rank: int | None = None
    alpha: float | None = None

    def __post_init__(self):
        super().__post_init__()
        self._check(self.rank is None or (isinstance(self.rank, int) and not isinstance(self.rank, bool)
                                          and self.rank > 0), "rank", "rank must be a positive integer or None.")
        self._check(self.alpha is None or self.alpha > 0, "alpha", "alpha must be positive (or None: σ₀ = 1).")


@torch.no_grad()
def ldu(view: LayerView, rank: int):
    """``(P L_r, d_r, U_r)`` from ``W0 = P L D U`` (LU with partial pivoting), first ``rank`` components."""
    w = view.weight2d().detach()
    p, lower, upper = torch.linalg.lu(w.to(compute_dtype(w)))
    d = torch.diagonal(upper).clone()
    safe = torch.where(d == 0, torch.ones_like(d), d)
    unit_upper = upper / safe[:, None]
    pl = p @ lower
    dt = factor_dtype(view)
    return (pl[:, :rank].to(dt).contiguous(), d[:rank].to(dt).contiguous(),
            unit_upper[:rank].to(dt).contiguous())


@register("loldu")
class Loldu(Method):
    """Trainable diagonal and scale of the LDU decomposition of ``W0`` (see module docstring)."""

    Config = LolduConfig
    kinds = ("linear", "hf_conv1d", "conv1d", "conv2d", "embedding")
    summary = "W0 = P L D U; train the diagonal z (first r components) and one scale σ (LoLDU)"
    demo_options = {"rank": None}  # all min(out, in) components, the paper's setting
    identity_at_init = True
    deterministic_init = True
    merge_atol = 1e-5
    default_lr = 1e-3  # demo task at full rank: 1e-2 diverges (σ rescales all of W0), 1e-3 beats 3e-4

    def __init__(self, view: LayerView, config: LolduConfig, generator=None, calibration=None):
        super().__init__(view, config)
        self.view, self.config = view, config
        self.rank = r = check_rank_fits(view, config.rank)
        pl, d, u = ldu(view, r)
        self.register_buffer("pl", pl, persistent=False)  # P L_r  (out × r)
        self.register_buffer("d0", d, persistent=False)  # d_r
        self.register_buffer("ut", u, persistent=False)  # U_r    (r × in)
        self.sigma0 = 1.0 if config.alpha is None else float(config.alpha) / r
        self.loldu_z = nn.Parameter(d.clone())
        self.loldu_scale = nn.Parameter(torch.tensor(self.sigma0, dtype=d.dtype, device=d.device))

    @classmethod
    def num_params(cls, view: LayerView, config: LolduConfig) -> int:
        return check_rank_fits(view, config.rank) + 1

    def coef(self) -> torch.Tensor:
        """``σ z − σ₀ d_r``: the diagonal of ΔW in the LDU basis."""
        return self.loldu_scale * self.loldu_z - self.sigma0 * self.d0

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        c = self.coef()
        return low_rank_out(self.view, x, base_out, self.ut, self.pl, mid=lambda h: scale_channels(h, c, self.view))

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param((self.pl * self.coef()) @ self.ut)
