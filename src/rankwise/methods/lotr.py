"""LoTR: Low Tensor Rank weight adaptation (Bershatsky et al., 2024, arXiv:2402.01376).

The updates of a group of layers of one type (say every attention ``query`` of a transformer)
are stacked into a 3-way tensor and given a Tucker-2 form: factors shared by the group, a small
core per layer::

    ΔW_l = s · U G_l V,     U ∈ R^{out×r}, V ∈ R^{r×in} shared by the group,  G_l ∈ R^{r×r} per layer

with ``s = α / r`` (``alpha`` defaults to ``r``, so ``s = 1``). The core's size does not depend on
the layer's dimensions: ``L`` layers of one ``out × in`` type train ``r(out + in) + L r²``
parameters, against LoRA's ``L r(out + in)``.

Sharing (``share``): ``"type"`` (default, the paper's setting) groups layers whose names agree
once numeric path components are dropped and whose weights have the same shape
(``encoder.layer.0.attention.self.query`` and ``encoder.layer.5.attention.self.query`` share
``U, V``); ``"shape"`` groups every targeted layer with the same ``out × in``. The factors are one
parameter object per group (the engine's ``shared`` hook): the optimizer steps them once with
the gradients of all layers of the group, and ``rw.save`` stores them once.

Init (the paper leaves it open; ours makes the adapted model equal the base): ``U``, ``V``
random with orthonormal columns/rows (QR of a Gaussian from the caller's generator), ``G_l = 0``.
The first step moves only the cores; ``U``, ``V`` follow once the cores are non-zero.

Activation view: ``base_out + s · (U G_l) (V x)`` — ``U G_l`` is ``out × r``, so the cost is a
LoRA of rank ``r`` (two thin matmuls, LoRA's single autograd node on linear layers; the layer's
own operation through ``LayerView`` on convolutions and embeddings).

Parameters per layer, as ``num_params`` counts them for a model with this one layer:
``r (out + in) + r²``; a group of ``L`` layers trains ``r (out + in) + L r²``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.registry import register
from ._shared_common import float_kw, low_rank_forward, positive_int, random_orthonormal


@dataclass
class LotrConfig(AdapterConfig):
    """rank: r (of the shared factors and the cores); alpha: s = α/r (None: α = r);
    share: 'type' (same layer name up to block indices, and same shape) | 'shape'."""

    rank: int = 8
    alpha: float | None = None
    share: str = "type"

    def __post_init__(self):
        super().__post_init__()
        positive_int(self, "rank")
        self._check(self.alpha is None or self.alpha > 0, "alpha", "alpha must be positive (or None: alpha = rank).")
        self._check(self.share in ("type", "shape"), "share",
                    "use 'type' (one factor pair per layer type and shape) or 'shape' (one per weight shape).")

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else float(self.alpha)) / self.rank


def group_key(view: LayerView, share: str) -> str:
    """The name of the factor group ``view`` belongs to (a valid ``ModuleDict`` key)."""
    shape = f"{view.out_features}x{view.in_features}"
    if share == "shape":
        return f"shape_{shape}"
    kind = re.sub(r"(?:^|(?<=\.))\d+(?=\.|$)", "N", view.name)  # block indices → N
    return re.sub(r"[^0-9A-Za-z]+", "_", kind) + "_" + shape


class LotrFactors(nn.Module):
    """The factors ``U (out × r)`` and ``V (r × in)`` one group of layers shares."""

    def __init__(self, n_out: int, n_in: int, rank: int, generator=None, dtype=torch.float32):
        super().__init__()
        self.lotr_U = nn.Parameter(random_orthonormal(n_out, rank, generator, dtype))
        self.lotr_V = nn.Parameter(random_orthonormal(n_in, rank, generator, dtype).t().contiguous())


@register("lotr")
class Lotr(Method):
    """Tucker-2 update ``s · U G_l V`` with ``U, V`` shared by a layer group (see module docstring)."""

    Config = LotrConfig
    kinds = ("linear", "hf_conv1d", "conv1d", "conv2d", "embedding")
    summary = "ΔW_l = s·U G_l V: U, V shared by layers of one type, r×r core per layer (Bershatsky et al. 2024)"
    identity_at_init = True
    merge_atol = 1e-5
    default_lr = 3e-3

    @classmethod
    def shared(cls, views: list[LayerView], config: LotrConfig, generator=None) -> nn.ModuleDict:
        groups = nn.ModuleDict()
        for v in views:
            v.check_rank(config.rank, "lotr")
            key = group_key(v, config.share)
            if key not in groups:
                groups[key] = LotrFactors(v.out_features, v.in_features, config.rank, generator, **float_kw(v))
        return groups

    def __init__(self, view: LayerView, config: LotrConfig, generator=None, calibration=None, shared=None):
        super().__init__(view, config)
        if shared is None:  # built outside rw.adapt: a group of one
            shared = self.shared([view], config, generator)
        view.check_rank(config.rank, "lotr")
        self.view, self.config, self.rank, self.scale = view, config, config.rank, config.scale
        self.group = group_key(view, config.share)
        self.factors = shared[self.group]  # registered here too: one object, counted once by the model
        self.lotr_G = nn.Parameter(torch.zeros(config.rank, config.rank, **float_kw(view)))

    @classmethod
    def num_params(cls, view: LayerView, config: LotrConfig) -> int:
        r = config.rank
        return r * (view.out_features + view.in_features) + r * r

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        f = self.factors
        return low_rank_forward(self.view, x, base_out, f.lotr_V, f.lotr_U @ self.lotr_G, self.scale)

    def delta_weight(self) -> torch.Tensor:
        f = self.factors
        return self.view.to_param((f.lotr_U @ self.lotr_G @ f.lotr_V) * self.scale)
