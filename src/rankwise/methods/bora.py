"""BoRA: Bi-dimensional Weight-Decomposed Low-Rank Adaptation (Wang, Fan, Bao, Jiang & Song, 2024,
arXiv:2412.06441).

DoRA rescales the LoRA-updated weight along one dimension only; BoRA decomposes it along both,
with one trainable magnitude per output unit and one per input unit::

    V  = W0 + s·B A                                   (LoRA update, A ∈ R^{r×in}, B ∈ R^{out×r})
    H  = diag(m_row / ‖V‖_row) V                       normalize each output row, scale by m_row
    W  = H diag(m_col / ‖H‖_col)                       normalize each input column, scale by m_col

``m_row ∈ R^out`` and ``m_col ∈ R^in`` start at ``‖W0‖_row`` and ``‖W0‖_col``, and ``B = 0``
(LoRA's init; for embeddings ``A = 0``), so ``W = W0`` exactly at init. Both norms are treated as
constants in backward (detached, DoRA/PEFT's convention); ``A``, ``B``, ``m_row`` and ``m_col``
get gradients through the numerators. The order (rows, then columns) follows the paper's two
sequential normalization steps.

Cost: the update ``diag(r) (W0 + s·BA) diag(c) − W0`` is full rank (``W0`` is rescaled on both
sides), so unlike DoRA no low-rank activation path exists: the activation view forms ``W``
(``out × in``) once per step and applies it with the layer's own operation. As the first adapter
of a layer it replaces the base product (``computes_base``): one matmul with ``W`` instead of
``W0`` plus an update, i.e. a training step costs about what full fine-tuning of that layer
does (the weight gradient ``Gᵀx`` is needed for ``A``, ``B`` and the magnitudes).

The update reads ``W0`` (``reads_base``). Parameters per layer: ``r (in + out) + out + in``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.registry import register


@dataclass
class BoraConfig(AdapterConfig):
    """rank: r; alpha: s = α/r (None: α = r); rslora: s = α/√r; init: 'kaiming' | 'gaussian' (LoRA's)."""

    rank: int = 8
    alpha: float | None = None
    rslora: bool = False
    init: str = "kaiming"

    def __post_init__(self):
        super().__post_init__()
        self._check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
                    "rank", "rank must be a positive integer.")
        self._check(self.alpha is None or self.alpha > 0, "alpha", "alpha must be positive (or None: alpha = rank).")
        self._check(self.init in ("kaiming", "gaussian"), "init", "use 'kaiming' or 'gaussian'.")

    @property
    def scale(self) -> float:
        alpha = float(self.rank) if self.alpha is None else float(self.alpha)
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def _row_norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=1).clamp_min_(torch.finfo(v.dtype).tiny)


def _col_norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=0).clamp_min_(torch.finfo(v.dtype).tiny)


@register("bora")
class Bora(Method):
    """Row and column magnitudes around a LoRA-updated direction (see module docstring)."""

    Config = BoraConfig
    kinds = ("linear", "hf_conv1d", "conv1d", "conv2d", "embedding")
    summary = "W = (m_row/‖V‖_row) V (m_col/‖·‖_col), V = W0+sBA: magnitudes on rows and columns (Wang et al. 2024)"
    identity_at_init = True
    reads_base = True
    computes_base = True
    merge_atol = 1e-5
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: BoraConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, "bora")
        self.view, self.config, self.rank, self.scale = view, config, config.rank, config.scale
        w = view.weight
        kw = {"dtype": w.dtype if w.is_floating_point() else torch.float32}
        r, n_in, n_out = config.rank, view.in_features, view.out_features
        self.lora_A = nn.Parameter(torch.empty(r, n_in, **kw))
        self.lora_B = nn.Parameter(torch.zeros(n_out, r, **kw))
        with torch.no_grad():
            if view.kind == "embedding":  # as LoRA: the lookup side starts at zero, B random
                self.lora_A.zero_()
                self.lora_B.normal_(generator=generator)
            elif config.init == "gaussian":
                self.lora_A.normal_(0.0, 1.0 / r, generator=generator)
            else:
                bound = 1.0 / math.sqrt(n_in)
                self.lora_A.uniform_(-bound, bound, generator=generator)
            v = self._direction()
            m_row = _row_norm(v)
            h = v * (m_row / _row_norm(v))[:, None]  # the forward's own operations: exactly v here
            m_col = _col_norm(h)
        self.m_row = nn.Parameter(m_row)
        self.m_col = nn.Parameter(m_col)

    @classmethod
    def num_params(cls, view: LayerView, config: BoraConfig) -> int:
        return config.rank * (view.in_features + view.out_features) + view.out_features + view.in_features

    def _direction(self) -> torch.Tensor:
        w0 = self.view.weight2d().detach()
        return w0.to(self.lora_A.dtype) + self.scale * (self.lora_B @ self.lora_A)

    def adapted_weight(self) -> torch.Tensor:
        """``W = diag(m_row/‖V‖_row) V diag(m_col/‖H‖_col)`` (canonical ``out × in``; norms detached)."""
        v = self._direction()
        with torch.no_grad():
            nr = _row_norm(v)
        h = v * (self.m_row / nr)[:, None]
        with torch.no_grad():
            nc = _col_norm(h)
        return h * (self.m_col / nc)[None, :]

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        w = self.adapted_weight()
        w0 = self.view.weight2d()
        if x.is_floating_point() and x.dtype != w.dtype:
            x = x.to(w.dtype)
        if base_out is None:  # first adapter of the layer: one product with W (computes_base)
            return self.view.functional(x, w.to(w0.dtype) if w0.is_floating_point() else w)
        delta = w - w0.detach().to(w.dtype)
        return base_out + self.view.functional(x, delta, bias=False).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        w = self.adapted_weight()
        return self.view.to_param(w - self.view.weight2d().detach().to(w.dtype))
