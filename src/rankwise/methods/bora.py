"""BoRA: Bi-dimensional Weight-Decomposed Low-Rank Adaptation (Wang, Fan, Bao, Jiang & Song, 2024,
arXiv:2412.06441).

DoRA rescales the LoRA-updated weight along one dimension only; BoRA decomposes it along both,
with one trainable magnitude per output unit and one per input unit::

    V  = W0 + s·B A                                   (LoRA update, A ∈ R^{r×in}, B ∈ R^{out×r})
    H  = diag(m_row / ‖V‖_row) V                       normalize each output row, scale by m_row
    W  = H diag(m_col / ‖H‖_col)                       normalize each input column, scale by m_col

``m_row ∈ R^out`` and ``m_col ∈ R^in`` are trained with LoRA's ``A`` and ``B``.

No reference code is published (only the paper), so these choices are rankwise's; each follows
DoRA (Liu et al.) and PEFT's DoRA, which the paper extends:

* the order: rows first, then columns (the abstract names both normalizations, not their order;
  the other order gives a different ``W`` once ``B ≠ 0``);
* both norms are detached (constants in backward), as DoRA's Sec. 4.3 and PEFT do; ``A``, ``B``,
  ``m_row``, ``m_col`` get gradients through the numerators;
* init: LoRA's (``A`` Kaiming-uniform, ``B = 0``; for embeddings ``A = 0``, ``B ~ N(0, 1)``),
  ``m_row = ‖W0‖_row`` and ``m_col = ‖W0‖_col``, so ``W = W0`` exactly at init;
* ``s = α/r`` with ``α = r`` by default (LoRA's scaling);
* dropout ``p > 0`` applies to the input of the update ``W − W0`` only (DoRA/PEFT's semantics):
  ``y = W0 x + b + (W − W0) drop(x)``.

Cost: the update ``diag(r) (W0 + s·BA) diag(c) − W0`` is full rank (``W0`` is rescaled on both
sides), so unlike DoRA no low-rank activation path exists: the activation view forms ``W``
(``out × in``) once per step and applies it with the layer's own operation. As the first adapter
of a layer it replaces the base product (``computes_base``): one matmul with ``W`` instead of
``W0`` plus an update, i.e. a training step costs about what full fine-tuning of that layer
does (the weight gradient ``Gᵀx`` is needed for ``A``, ``B`` and the magnitudes).

The update reads ``W0`` (``reads_base``). Parameters per layer: ``r (in + out) + out + in``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import LayerView
from ..core.method import Method
from ..core.registry import register
from .lora import LoraConfig, lora_factors


@dataclass
class BoraConfig(LoraConfig):
    """LoRA's options: rank, alpha (s = α/r; None: α = r), dropout, rslora (s = α/√r), init
    ('kaiming' | 'gaussian'); the two magnitude vectors are added."""


def _row_norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=1).clamp_min_(torch.finfo(v.dtype).tiny)


def _col_norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=0).clamp_min_(torch.finfo(v.dtype).tiny)


@register("bora")
class Bora(Method):
    """Row and column magnitudes around a LoRA-updated direction (see module docstring)."""

    Config = BoraConfig
    summary = "W = (m_row/‖V‖_row) V (m_col/‖·‖_col), V = W0+sBA: magnitudes on rows and columns (Wang et al. 2024)"
    reads_base = True
    computes_base = True
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: BoraConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, self.name)
        self.rank, self.scale = config.rank, config.scale
        self.lora_A, self.lora_B = lora_factors(view, config, generator)  # LoRA's init
        with torch.no_grad():
            v = self._direction()
            m_row = _row_norm(v)
            h = v * (m_row / _row_norm(v))[:, None]  # the forward's own operations: exactly v here
            self.m_row = nn.Parameter(m_row)
            self.m_col = nn.Parameter(_col_norm(h))

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
        w0 = self.view.weight2d().detach()
        w0 = w0.to(w.dtype) if not w0.is_floating_point() else w0
        if x.is_floating_point() and x.dtype != w.dtype:
            x = x.to(w.dtype)
        p = self.config.dropout
        if p > 0 and self.training:  # the update sees drop(x), the base x (DoRA/PEFT's semantics)
            if base_out is None:
                base_out = self.view.functional(x, w0)
            x = F.dropout(x, p, training=True) if x.is_floating_point() else x  # no dropout on token ids
        elif base_out is None:  # first adapter of the layer: one product with W (computes_base)
            return self.view.functional(x, w.to(w0.dtype))
        return base_out + self.view.functional(x, w - w0.to(w.dtype), bias=False).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        w = self.adapted_weight()
        return self.view.to_param(w - self.view.weight2d().detach().to(w.dtype))
