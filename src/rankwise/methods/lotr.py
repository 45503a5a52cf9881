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
``U, V``); ``"shape"`` groups every targeted layer with the same ``out × in`` (the authors'
README example shares one container between ``query`` and ``value``). The factors are one
parameter object per group (the engine's ``shared`` hook): the optimizer steps them once with
the gradients of all layers of the group, and ``rw.save`` stores them once.

Init: ``G_l = 0`` in every case, so the adapted model equals the base. The factors:

* ``init="orthonormal"`` (default, a rankwise choice): ``U``, ``V`` random with orthonormal
  columns/rows (QR of a Gaussian from the caller's generator), with ``s = α/r = 1``: then
  ``‖ΔW_l‖_F = s ‖G_l‖_F``, a core step moves the weight by as much as it moves the core — the
  scale LoRA users expect, and the one ``default_lr`` was measured at.
* ``init="normal"``: the authors' code (github.com/daskol/lotr, ``lotr/lotr.py``): entries of
  ``U``, ``V`` ~ ``N(0, 1)``; with ``alpha=1`` this is their default ``scale / rank = 1/r``.
  Their columns have norm ≈ ``√dim``, so ``‖ΔW_l‖_F ≈ √(out·in) / r · ‖G_l‖_F``: the same core
  step moves the weight about ``dim / r`` times further than the default (≈ 100× for a
  768-wide layer at ``r = 8``) — lower the learning rate accordingly.

The first step moves only the cores (``G = 0`` gives ``U``, ``V`` no gradient); ``U``, ``V``
follow once the cores are non-zero.

Activation view: ``base_out + s · (U G_l) (V drop(x))`` — ``U G_l`` is ``out × r``, so the cost is a
LoRA of rank ``r`` (``core.ops.low_rank_apply``).

Parameters per layer, as ``num_params`` counts them for a model with this one layer:
``r (out + in) + r²``; a group of ``L`` layers trains ``r (out + in) + L r²``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import low_rank_apply, normal_, seeded_
from ..core.registry import register


@dataclass
class LotrConfig(RankAlphaConfig):
    """rank: r (of the shared factors and the cores); alpha: s = α/r (None: α = r);
    share: 'type' (same layer name up to block indices, and same shape) | 'shape';
    init: 'orthonormal' | 'normal' (the authors' N(0, 1) factors; use with alpha=1)."""

    share: str = "type"
    init: str = "orthonormal"

    def __post_init__(self):
        super().__post_init__()
        self._check(self.share in ("type", "shape"), "share",
                    "use 'type' (one factor pair per layer type and shape) or 'shape' (one per weight shape).")
        self._check(self.init in ("orthonormal", "normal"), "init", "use 'orthonormal' or 'normal'.")


def group_key(view: LayerView, share: str) -> str:
    """The name of the factor group ``view`` belongs to (a valid ``ModuleDict`` key)."""
    shape = f"{view.out_features}x{view.in_features}"
    if share == "shape":
        return f"shape_{shape}"
    kind = re.sub(r"(?:^|(?<=\.))\d+(?=\.|$)", "N", view.name)  # block indices → N
    return re.sub(r"[^0-9A-Za-z]+", "_", kind) + "_" + shape


def _orthonormal(buf: torch.Tensor, generator) -> torch.Tensor:
    """Fill ``buf`` (rows ≥ cols) with Haar-distributed orthonormal columns: QR of a Gaussian with
    the signs of ``diag(R)`` folded in (so the law does not depend on LAPACK's sign choice)."""
    q, r = torch.linalg.qr(torch.randn(buf.shape, generator=generator, dtype=torch.float64, device=buf.device))
    return buf.copy_(q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0))


class LotrFactors(nn.Module):
    """The factors ``U (out × r)`` and ``V (r × in)`` one group of layers shares."""

    def __init__(self, view: LayerView, rank: int, init: str, generator=None):
        super().__init__()
        u = torch.empty(view.out_features, rank, **view.factory_kwargs)
        v_t = torch.empty(view.in_features, rank, **view.factory_kwargs)  # V drawn as Vᵀ (in × r)
        for t in (u, v_t):
            if init == "normal":
                normal_(t, 1.0, generator)
            else:
                seeded_(t, _orthonormal, generator)
        self.lotr_U = nn.Parameter(u)
        self.lotr_V = nn.Parameter(v_t.t().contiguous())


@register("lotr")
class Lotr(Method):
    """Tucker-2 update ``s · U G_l V`` with ``U, V`` shared by a layer group (see module docstring)."""

    Config = LotrConfig
    summary = "ΔW_l = s·U G_l V: U, V shared by layers of one type, r×r core per layer (Bershatsky et al. 2024)"
    default_lr = 3e-3

    @classmethod
    def shared(cls, views: list[LayerView], config: LotrConfig, generator=None) -> nn.ModuleDict:
        groups = nn.ModuleDict()
        for v in views:
            v.check_rank(config.rank, "lotr")
            key = group_key(v, config.share)
            if key not in groups:
                groups[key] = LotrFactors(v, config.rank, config.init, generator)
        return groups

    def __init__(self, view: LayerView, config: LotrConfig, generator=None, calibration=None, shared=None):
        super().__init__(view, config)
        if shared is None:  # built outside rw.adapt: a group of one
            shared = self.shared([view], config, generator)
        view.check_rank(config.rank, "lotr")
        self.rank, self.scale = config.rank, config.scale
        self.group = group_key(view, config.share)
        self.factors = shared[self.group]  # registered here too: one object, counted once by the model
        self.lotr_G = nn.Parameter(torch.zeros(config.rank, config.rank, **view.factory_kwargs))

    @classmethod
    def num_params(cls, view: LayerView, config: LotrConfig) -> int:
        r = config.rank
        return r * (view.out_features + view.in_features) + r * r

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        f = self.factors
        return low_rank_apply(self.view, x, base_out, f.lotr_V, f.lotr_U @ self.lotr_G, self.scale,
                              self.config.dropout, self.training)

    def delta_weight(self) -> torch.Tensor:
        f = self.factors
        return self.view.to_param((f.lotr_U @ self.lotr_G @ f.lotr_V) * self.scale)
