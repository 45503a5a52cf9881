"""LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition
(Shi, Wei, Wu, Ran, Sun, He, Yang, 2024, arXiv:2410.13618).

The base weight is factored by LU with partial pivoting and its diagonal split out,
``W0 = P L D U`` (``P`` a permutation, ``L`` unit lower-triangular ``out × k``, ``D`` diagonal,
``U`` unit upper-triangular ``k × in``, ``k = min(out, in)``). The first ``r`` components
``P L_r diag(d_r) U_r`` (the first ``r`` columns of ``L`` and rows of ``U``) are re-parametrized
with a trainable diagonal ``z`` and a scale ``σ``; the rest stays frozen::

    W = (W0 − σ₀ P L_r diag(d_r) U_r) + σ P L_r diag(z) U_r,     z = d_r, σ = σ₀ at init
    ΔW = P L_r diag(σ z − σ₀ d_r) U_r                           (exactly 0 at init)

As the authors' code (``minloldu/loldu.py``: ``scaling = lora_alpha / rank`` with
``lora_alpha = 1``, residual ``W0 − scaling · P L_r diag(d_r) U_r``; ``loldu_utils.py``: only
``vector_z`` is trained): ``σ₀ = alpha / r`` with ``alpha = 1``, and ``σ`` stays frozen at ``σ₀``
(``train_scale=True`` trains it too, the variant the reference leaves commented out). The default
``rank`` is full (``k``; the reference's default config uses 768 for 768-wide layers), so the
parameter count is ``min(out, in)`` (``+ 1`` with ``train_scale``); a smaller ``rank`` gives ``r``.

With ``σ`` frozen, a step of ``z`` moves ``ΔW`` by ``σ₀ = 1/r`` times the step, so the learning
rate must be much larger than with the former ``σ₀ = 1`` (best at 1e-3). ``default_lr = 1e-1``,
measured on the demo task (all components, 80 steps, seed 0): accuracy / final loss 0.331 / 2.23
at 1e-3, 0.767 / 0.72 at 3e-2, 0.796 / 0.46 at 1e-1 (the former ``σ₀ = 1`` with trained ``σ``:
0.669 / 1.11 at its best rate, 1e-3); higher rates were not tried.

Activation view (two thin products, ``P L_r`` pre-multiplied once)::

    y = W0 x + b + (P L_r diag(σ z − σ₀ d_r)) (U_r x)

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
from ..core.ops import low_rank_apply
from ..core.registry import register
from ..linalg import compute_dtype
from ._svd_common import check_rank_fits


@dataclass
class LolduConfig(AdapterConfig):
    """rank: LDU components re-parametrized (None: all min(out, in); clamped to it);
    alpha: σ₀ = alpha / r (1 as the reference); train_scale: also train σ (the reference trains z only)."""

    rank: int | None = None
    alpha: float = 1.0
    train_scale: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.rank is not None:
            self._check_int("rank")
        self._check(isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha > 0,
                    "alpha", "alpha must be positive (σ₀ = alpha / rank).")
        self._check(isinstance(self.train_scale, bool), "train_scale", "use True or False.")


@torch.no_grad()
def ldu(view: LayerView, rank: int):
    """``(P L_r, d_r, U_r)`` from ``W0 = P L D U`` (LU with partial pivoting), first ``rank`` components."""
    w = view.weight2d().detach()
    p, lower, upper = torch.linalg.lu(w.to(compute_dtype(w)))
    d = torch.diagonal(upper).clone()
    safe = torch.where(d == 0, torch.ones_like(d), d)
    unit_upper = upper / safe[:, None]
    pl = p @ lower
    dt = view.param_dtype
    return (pl[:, :rank].to(dt).contiguous(), d[:rank].to(dt).contiguous(),
            unit_upper[:rank].to(dt).contiguous())


@register("loldu")
class Loldu(Method):
    """Trainable diagonal (and optionally scale) of the LDU decomposition of ``W0`` (see module docstring)."""

    Config = LolduConfig
    summary = "W0 = P L D U; train the diagonal z of the first r components, scale σ₀ = 1/r (LoLDU)"
    demo_options = {"rank": None}  # all min(out, in) components, the paper's setting
    deterministic_init = True
    default_lr = 1e-1  # σ₀ = 1/r scales every step of z down by r (see module docstring)

    def __init__(self, view: LayerView, config: LolduConfig, generator=None, calibration=None):
        super().__init__(view, config)
        self.rank = r = check_rank_fits(view, config.rank)
        pl, d, u = ldu(view, r)
        self.register_buffer("pl", pl, persistent=False)  # P L_r  (out × r)
        self.register_buffer("d0", d, persistent=False)  # d_r
        self.register_buffer("ut", u, persistent=False)  # U_r    (r × in)
        # σ₀ rounded to the adapter's dtype, so σ₀ z − σ₀ d is exactly 0 at init with a trained σ too
        self.sigma0 = torch.tensor(float(config.alpha) / r, dtype=view.param_dtype, device="cpu").item()
        self.loldu_z = nn.Parameter(d.clone())
        # σ: trained only with train_scale (a float otherwise, frozen at σ₀ as the reference)
        self.loldu_scale = (nn.Parameter(torch.tensor(self.sigma0, **view.factory_kwargs))
                            if config.train_scale else self.sigma0)

    @classmethod
    def num_params(cls, view: LayerView, config: LolduConfig) -> int:
        return check_rank_fits(view, config.rank) + int(config.train_scale)

    def coef(self) -> torch.Tensor:
        """``σ z − σ₀ d_r``: the diagonal of ΔW in the LDU basis."""
        return self.loldu_scale * self.loldu_z - self.sigma0 * self.d0

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return low_rank_apply(self.view, x, base_out, self.ut, self.pl * self.coef())

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param((self.pl * self.coef()) @ self.ut)
