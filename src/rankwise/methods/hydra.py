"""Hydra: multi-head low-rank adaptation (Kim et al., 2023, arXiv:2309.06922).

Two low-rank branches on one layer: a *parallel* branch on the layer input (LoRA) and a
*sequential* branch on the layer's pre-trained output, i.e. a linear combination of the
pre-trained features::

    y = W0 x + b + s · B_p A_p x + s · B_s A_s (W0 x)
    ΔW = s · (B_p A_p + B_s A_s W0)             A_p ∈ R^{r×in}, A_s ∈ R^{r×out}, B_p, B_s ∈ R^{out×r}

The update reads ``W0`` (``reads_base = True``): merge keeps the exact ΔW it added.

Choice (stated): the authors' code (github.com/extremebird/Hydra) gives both branches biases and
feeds the sequential branch ``W0 x + b``; that adds the bias change ``s (B_s A_s b + …)``, which
no weight ΔW can hold. rankwise drops the branch biases and feeds the sequential branch the
bias-free ``W0 x``, so the update is exactly the weight ΔW above and merges into ``W`` alone.
Init as the authors': ``A_p, A_s`` Xavier-uniform, ``B_p = B_s = 0`` (the adapted model equals the
base); ``s`` = ``scale`` (their default 1).

Activation view: the sequential branch's down-projection of the pre-trained feature is folded
into the weights, ``A_s (W0 x) = (A_s W0) x`` — an ``r × in`` product formed once per step
(``r · out · in`` multiply-adds, like ``r`` rows of the layer) — so the whole adapter is one LoRA of
rank ``2r``: ``base_out + s · [B_p B_s] ([A_p; A_s W0] x)``, two thin matmuls
(``core.ops.low_rank_apply``). Backward saves only the layer input (which the base keeps anyway): reading
``base_out`` instead would save an extra output-sized tensor per layer for ``A_s``'s gradient.
It also reads ``W0`` itself, so with several unmerged adapters on a layer the branch still sees
the pre-trained feature, exactly as ``delta_weight`` does.

Parameters: ``r (in + out) + r (out + out) = r (in + 3 out)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import low_rank_apply, uniform_
from ..core.registry import register


@dataclass
class HydraConfig(AdapterConfig):
    """rank: r of both branches; scale: s."""

    rank: int = 8
    scale: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        self._check_int("rank")
        self._check(isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool) and self.scale != 0,
                    "scale", "scale must be a non-zero number.")


@register("hydra")
class Hydra(Method):
    """Parallel + sequential low-rank branches (see module docstring)."""

    Config = HydraConfig
    summary = "ΔW = s·(B_p A_p + B_s A_s W0): parallel + sequential low-rank branches (Kim et al. 2023)"
    reads_base = True
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: HydraConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, "hydra")
        self.rank, self.scale = config.rank, float(config.scale)
        r, n_in, n_out = config.rank, view.in_features, view.out_features
        kw = view.factory_kwargs

        def xavier(rows, cols):
            return uniform_(torch.empty(rows, cols, **kw), math.sqrt(6.0 / (rows + cols)), generator)

        self.hydra_A_par = nn.Parameter(xavier(r, n_in))
        self.hydra_A_seq = nn.Parameter(xavier(r, n_out))
        self.hydra_B_par = nn.Parameter(torch.zeros(n_out, r, **kw))
        self.hydra_B_seq = nn.Parameter(torch.zeros(n_out, r, **kw))

    @classmethod
    def num_params(cls, view: LayerView, config: HydraConfig) -> int:
        return config.rank * (view.in_features + 3 * view.out_features)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        w0 = self.view.weight2d().to(self.hydra_A_seq.dtype)
        a = torch.cat([self.hydra_A_par, self.hydra_A_seq @ w0], dim=0)  # 2r × in
        b = torch.cat([self.hydra_B_par, self.hydra_B_seq], dim=1)  # out × 2r
        return low_rank_apply(self.view, x, base_out, a, b, self.scale)

    def delta_weight(self) -> torch.Tensor:
        w0 = self.view.weight2d().to(self.hydra_A_seq.dtype)
        d = self.hydra_B_par @ self.hydra_A_par + self.hydra_B_seq @ (self.hydra_A_seq @ w0)
        return self.view.to_param(d * self.scale)
