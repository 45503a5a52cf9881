"""LoRMA: Low-Rank Multiplicative Adaptation for LLMs
(Bihany, Patel, Modi, Findings of ACL 2025, arXiv:2506.07621).

The base weight is transformed multiplicatively instead of added to. A plain low-rank factor
``B A W0`` would cap the rank of the adapted weight at ``r`` ("rank inhibition"); the additive
rank inflation (LoRMA₊) adds the identity, which is the variant implemented here::

    W = (I + s · B A) W0,      B ∈ R^{out × r}, A ∈ R^{r × out},  s = α / r
    ΔW = s · B A W0           (B = 0, A Kaiming-uniform at init → W = W0 exactly)

The paper's other inflation, LoRMA_π (a fixed permutation of ``B A``), is not implemented.
The update reads ``W0`` itself (``reads_base = True``: a merge keeps the exact ``ΔW`` it added).

Activation view, with the operations re-ordered as in the paper so that no ``out × out`` or
``out × in`` matrix is formed::

    W0 x = base_out − b;      y = base_out + s · B (A (W0 x))       (O(N · out · r))

Like DoRA, it acts on the layer's running output: another active adapter applied *before* it on
the same layer is multiplied too, so stacking it with other methods is order-dependent, and the
sum of weight views is exact only when it is the only active adapter on the layer.

Parameters per layer: ``2 r · out``. Works on every layer kind (``B A`` mixes output channels;
for an embedding, ``W0 x`` is the looked-up row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.registry import register
from ._svd_common import factor_dtype


@dataclass
class LormaConfig(AdapterConfig):
    """rank: r; alpha: α (default r, so s = 1)."""

    rank: int = 8
    alpha: float | None = None

    def __post_init__(self):
        super().__post_init__()
        self._check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
                    "rank", "rank must be a positive integer.")
        self._check(self.alpha is None or self.alpha > 0, "alpha", "alpha must be positive (or None: alpha = rank).")


@register("lorma")
class Lorma(Method):
    """``W = (I + s B A) W0`` (see module docstring)."""

    Config = LormaConfig
    kinds = ("linear", "hf_conv1d", "conv1d", "conv2d", "embedding")
    summary = "multiplicative W = (I + s·BA) W0 (additive rank inflation, LoRMA₊)"
    identity_at_init = True
    reads_base = True
    merge_atol = 1e-5
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: LormaConfig, generator=None, calibration=None):
        super().__init__(view, config)
        self.view, self.config = view, config
        self.rank = r = config.rank
        self.scale = (float(r) if config.alpha is None else float(config.alpha)) / r
        m = view.out_features
        kw = {"dtype": factor_dtype(view), "device": view.weight.device}
        self.lorma_A = nn.Parameter(torch.empty(r, m, **kw))
        self.lorma_B = nn.Parameter(torch.zeros(m, r, **kw))
        bound = 1.0 / math.sqrt(m)
        with torch.no_grad():
            self.lorma_A.uniform_(-bound, bound, generator=generator)

    @classmethod
    def num_params(cls, view: LayerView, config: LormaConfig) -> int:
        return 2 * config.rank * view.out_features

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        view, a, b = self.view, self.lorma_A, self.lorma_B
        bias = None if view.kind == "embedding" else view.base.bias
        y0 = base_out
        if bias is not None:  # W0 x = base_out − b, bias on the channel axis
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
