"""LoRMA: Low-Rank Multiplicative Adaptation for LLMs
(Bihany, Patel, Modi, Findings of ACL 2025, arXiv:2506.07621).

The base weight is transformed multiplicatively instead of added to. A plain low-rank factor
``B A W0`` would cap the rank of the adapted weight at ``r`` ("rank inhibition"); the additive
rank inflation (LoRMA₊) adds the identity, which is the variant implemented here::

    W = (I + s · B A) W0,      B ∈ R^{out × r}, A ∈ R^{r × out},  s = α / r
    ΔW = s · B A W0           (B = 0, A Kaiming-uniform at init → W = W0 exactly)

The paper's other inflation, LoRMA_π (a fixed permutation of ``B A``), is not implemented, nor is
the authors' ``"post"`` mode ``W = W0 (I + s · B A)`` (``B A`` mixing input channels); the default
``"pre"`` mode above is theirs (``NLU/run_glue_lorma_plus.py``, ``LormaLinear_plus``).
The update reads ``W0`` itself (``reads_base = True``: a merge keeps the exact ``ΔW`` it added).

Activation view, with the operations re-ordered as in the paper so that no ``out × out`` or
``out × in`` matrix is formed::

    W0 x = base_out − b;      y = base_out + s · B (A (W0 x))       (O(N · out · r))

With ``dropout > 0`` (training), the update reads a dropped input instead, ``s · B A W0 drop(x)``,
which costs one more product with ``W0`` (the authors' code drops the input of the whole layer).

Like DoRA, it acts on the layer's running output: another active adapter applied *before* it on
the same layer is multiplied too, so stacking it with other methods is order-dependent, and the
sum of weight views is exact only when it is the only active adapter on the layer.

Parameters per layer: ``2 r · out``. Works on every layer kind (``B A`` mixes output channels;
for an embedding, ``W0 x`` is the looked-up row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import kaiming_bound, uniform_
from ..core.registry import register


@dataclass
class LormaConfig(RankAlphaConfig):
    """rank: r; alpha: α (default r, so s = 1); dropout: on the adapter's input; rslora: s = α/√r."""


@register("lorma")
class Lorma(Method):
    """``W = (I + s B A) W0`` (see module docstring)."""

    Config = LormaConfig
    summary = "multiplicative W = (I + s·BA) W0 (additive rank inflation, LoRMA₊)"
    reads_base = True
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: LormaConfig, generator=None, calibration=None):
        super().__init__(view, config)
        self.rank, self.scale = config.rank, config.scale
        r, m, kw = config.rank, view.out_features, view.factory_kwargs
        self.lorma_A = nn.Parameter(uniform_(torch.empty(r, m, **kw), kaiming_bound(m), generator))
        self.lorma_B = nn.Parameter(torch.zeros(m, r, **kw))

    @classmethod
    def num_params(cls, view: LayerView, config: LormaConfig) -> int:
        return 2 * config.rank * view.out_features

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        view, a, b = self.view, self.lorma_A, self.lorma_B
        bias = None if view.kind == "embedding" else view.base.bias
        y0 = base_out
        if self.training and self.config.dropout > 0 and x.is_floating_point():
            y0 = view.functional(F.dropout(x, self.config.dropout), view.weight2d().detach(), bias=False)
        elif bias is not None:  # W0 x = base_out − b, bias on the channel axis
            y0 = base_out - (bias.view(1, -1, *([1] * (base_out.dim() - 2))) if view.channel_dim == 1 else bias)
        if y0.dtype != a.dtype:
            y0 = y0.to(a.dtype)
        if view.channel_dim == 1:
            h = view.apply_out(y0, a)  # 1×1 map out → r on the channel axis
            return base_out + (view.apply_out(h, b) * self.scale).to(base_out.dtype)
        h = F.linear(y0, a)
        if base_out.dtype == h.dtype:
            out2d = torch.addmm(base_out.reshape(-1, b.shape[0]), h.reshape(-1, b.shape[1]), b.t(), alpha=self.scale)
            return out2d.view(base_out.shape)
        return base_out + (F.linear(h, b) * self.scale).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        w0 = self.view.weight2d().detach().to(self.lorma_A.dtype)
        return self.view.to_param((self.lorma_B @ (self.lorma_A @ w0)) * self.scale)
