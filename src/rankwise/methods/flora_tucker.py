"""FLoRA: low-rank core space for N-dimensional weights (Si et al., 2024, arXiv:2405.14739).

The update keeps the weight's own tensor shape instead of flattening it to a matrix: a Tucker
decomposition with a small core ``G`` and one factor per mode::

    ΔW = s · G ×₁ U_out ×₂ U_in ×₃ U_k1 ×₄ U_k2          (conv2d: ΔW ∈ R^{out×in×kh×kw})
    ΔW = s · G ×₁ U_out ×₂ U_in ×₃ U_k                   (conv1d)
    ΔW = s · U_out G U_inᵀ                               (linear, HF Conv1D, embedding: 2 modes)

``U_mode ∈ R^{dim × r_mode}``, ``G ∈ R^{r_out × r_in (× r_k…)}``. For convolutions the kernel
dimensions are modes of their own, so the update stays a "convolution-shaped" tensor (the
paper's point: flattening ``out × in·k·k`` destroys that structure).

Ranks: ``r_out = min(rank, out)``, ``r_in = min(rank, in_channels)`` (a mode rank above the
mode's size adds nothing, so it is clamped); kernel modes get ``kernel_rank`` (default: the
kernel size, i.e. full rank on the small kernel modes, as the paper's conv setting).

Init (as the authors' code, github.com/SJTU-DeepVisionLab/FLoRA): every factor
``kaiming_normal(a=√3)`` — ``N(0, 1/(2 r_mode))`` — from the caller's generator, and ``G = 0``,
so the adapted model equals the base at init.

Activation view, never forming ``ΔW``:

* 2 modes: ``base_out + s · (U_out G) (U_inᵀ x)`` — a LoRA of rank ``r_in`` (``core.ops.low_rank_apply``).
* convolutions: ``U_inᵀ`` as a 1×1 convolution (``in → r_in`` channels), then the *core
  convolution* with kernel ``K = G ×₃ U_k1 ×₄ U_k2 ∈ R^{r_out×r_in×kh×kw}`` using the layer's own
  stride / padding / dilation / padding mode, then ``U_out`` as a 1×1 convolution. A per-pixel
  channel map commutes with every padding mode (padding only copies or zeroes pixels), so this
  is exactly the layer's convolution with ``ΔW``; it costs ``r_in·in`` per input pixel plus a
  ``r_out × r_in`` convolution, instead of ``out × in`` with ``k²`` taps.

Parameters: ``Π r_mode + Σ dim_mode · r_mode``.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import low_rank_apply, normal_
from ..core.registry import register


@dataclass
class FloraTuckerConfig(AdapterConfig):
    """rank: Tucker rank of the channel modes (out, in); kernel_rank: rank of each kernel mode
    (None: the kernel size); scale: s."""

    rank: int = 8
    kernel_rank: int | None = None
    scale: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        self._check_int("rank")
        if self.kernel_rank is not None:
            self._check_int("kernel_rank")
        self._check(isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool) and self.scale != 0,
                    "scale", "scale must be a non-zero number.")


def _modes(view: LayerView, config: FloraTuckerConfig) -> tuple[list[int], list[int]]:
    """(mode sizes, mode ranks): [out, in] or [out, in_channels, *kernel]."""
    if view.kind in ("conv1d", "conv2d"):
        w = view.weight
        dims = [w.shape[0], w.shape[1], *w.shape[2:]]
        kr = [k if config.kernel_rank is None else min(config.kernel_rank, k) for k in dims[2:]]
        return dims, [min(config.rank, dims[0]), min(config.rank, dims[1]), *kr]
    dims = [view.out_features, view.in_features]
    return dims, [min(config.rank, d) for d in dims]


@register("flora_tucker")
class FloraTucker(Method):
    """Tucker update with one factor per weight mode (see module docstring)."""

    Config = FloraTuckerConfig
    summary = "ΔW = s·G ×₁U_out ×₂U_in (×₃U_k…): Tucker core over the weight's own modes (Si et al. 2024)"
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: FloraTuckerConfig, generator=None, calibration=None):
        super().__init__(view, config)
        self.scale = float(config.scale)
        dims, ranks = _modes(view, config)
        self.dims, self.ranks, self.rank = dims, ranks, ranks[1]
        self.flora_G = nn.Parameter(torch.zeros(*ranks, **view.factory_kwargs))
        # kaiming_normal_(a=√3) on a (d × r) tensor: std = √(2/(1+3)) / √r
        self.factors = nn.ParameterList(
            nn.Parameter(normal_(torch.empty(d, r, **view.factory_kwargs), math.sqrt(0.5 / r), generator))
            for d, r in zip(dims, ranks))

    @classmethod
    def num_params(cls, view: LayerView, config: FloraTuckerConfig) -> int:
        dims, ranks = _modes(view, config)
        return math.prod(ranks) + sum(d * r for d, r in zip(dims, ranks))

    # ---- the two views -------------------------------------------------------------------
    def _kernel_core(self) -> torch.Tensor:
        """``G`` with its kernel modes expanded: ``r_out × r_in × k…``."""
        core = self.flora_G
        for i, u in enumerate(self.factors[2:]):
            # autocast runs tensordot's product in bf16, so the next factor must follow the core's dtype
            core = torch.movedim(torch.tensordot(core, u.to(core.dtype), dims=([2 + i], [1])), -1, 2 + i)
        return core

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        u_out, u_in = self.factors[0], self.factors[1]
        v = self.view
        if v.kind not in ("conv1d", "conv2d"):
            return low_rank_apply(v, x, base_out, u_in.t(), u_out @ self.flora_G, self.scale)
        if x.dtype != u_in.dtype:
            x = x.to(u_in.dtype)
        spatial = [1] * (x.dim() - 2)
        h = (F.conv2d if v.kind == "conv2d" else F.conv1d)(x, u_in.t().reshape(u_in.shape[1], -1, *spatial))
        # the layer's stride/padding/dilation; under autocast h is already in the autocast dtype
        h = v.base._conv_forward(h, self._kernel_core().to(h.dtype), None)
        return base_out + (v.apply_out(h, u_out.to(h.dtype)) * self.scale).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        n = self.flora_G.dim()
        letters = string.ascii_lowercase
        core, full = letters[:n], letters[n:2 * n]
        spec = core + "," + ",".join(f"{full[i]}{core[i]}" for i in range(n)) + "->" + full
        w = torch.einsum(spec, self.flora_G, *self.factors)  # out × in (× k…) in the weight's own layout
        return self.view.to_param(w.reshape(self.view.out_features, -1) * self.scale)
