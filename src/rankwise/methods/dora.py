"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., ICML 2024, arXiv:2402.09353).

The adapted weight is a trainable magnitude times a LoRA-updated direction::

    W = diag(m) (W0 + s·B A) / ‖W0 + s·B A‖_row,      m ∈ R^out,  m₀ = ‖W0‖_row

with LoRA's ``A (r × in)``, ``B (out × r)``, ``s = α/r`` (``α/√r`` with rslora) and its init
(``B = 0``; for embeddings ``A = 0``), so the adapted layer equals the base at init. The norm is
taken per output unit — a row of the canonical ``out × in`` matrix (the paper's "column" of its
``in × out`` weight; PEFT's ``lora/dora.py`` convention) — and, as in the paper (Sec. 4.3) and
PEFT, treated as a constant in backward (detached): ``A`` and ``B`` get gradients through the
``s·B A x`` branch only, ``m`` through ``g = m / ‖·‖``.

Activation view (PEFT's formula; ``g = m / ‖W0 + s·BA‖_row``)::

    y = base_out + (g − 1) ⊙ (base_out − bias) + g ⊙ s·B (A x)

The norm is never formed from a materialized ``B A``: ``‖W0 + s·BA‖² = ‖W0‖² + 2s⟨W0, BA⟩ +
s²‖BA‖²`` per row, from ``W0 Aᵀ`` (out × r) and ``A Aᵀ`` (r × r), with ``‖W0‖²`` cached (see
``_dora_common``). Cost per step: one extra pass over ``W0`` (``out·in·r`` flops for ``W0 Aᵀ``) on
top of LoRA; PEFT forms ``B A`` and ``W0 + s·BA`` (two ``out × in`` temporaries) instead. On
linear layers the branch is one autograd node that keeps only ``x`` and ``base_out`` for backward.
With dropout ``p > 0`` in training, ``base_out − bias`` is replaced by ``W0 · drop(x)`` (PEFT's
semantics), which costs one more matmul with ``W0``.

The update reads ``W0`` (``reads_base``): merge keeps the exact ``ΔW = diag(g)(W0 + s·BA) − W0``
it added. Parameters per layer: ``r (in + out) + out``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.layers import LayerView
from ..core.registry import register
from ..errors import ShapeMismatchError
from ._dora_common import BaseStats, base_projections, dora_forward, row_norm_sq
from .lora import Lora, LoraConfig


@dataclass
class DoraConfig(LoraConfig):
    """LoRA's options (rank, alpha, dropout, rslora, init); the magnitude vector is added."""


@register("dora")
class Dora(Lora):
    """Magnitude × normalized LoRA-updated direction (see module docstring)."""

    Config = DoraConfig
    summary = "W = m·(W0+sBA)/‖W0+sBA‖_row, norm from W0Aᵀ and AAᵀ, never BA (Liu et al. 2024)"
    reads_base = True

    def __init__(self, view: LayerView, config: DoraConfig, generator=None, calibration=None):
        super().__init__(view, config, generator=generator, calibration=calibration)  # A, B on W0's device
        self.stats = BaseStats(view)
        with torch.no_grad():
            self.magnitude = nn.Parameter(self._norm_sq().sqrt())

    @classmethod
    def num_params(cls, view: LayerView, config: DoraConfig) -> int:
        return config.rank * (view.in_features + view.out_features) + view.out_features

    def _norm_sq(self) -> torch.Tensor:
        a = self.lora_A
        w0a, aat = base_projections(self.view, a)
        return row_norm_sq(self.stats.w0sq(a.dtype), w0a, aat, self.lora_B, self.scale)

    def scale_vector(self) -> torch.Tensor:
        """``g = m / ‖W0 + s·BA‖_row`` (norm detached): the per-output factor of the adapted weight."""
        return self.magnitude / self._norm_sq().sqrt()

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return dora_forward(self.view, x, base_out, self.lora_A, self.lora_B, self.scale_vector(), self.scale,
                            self.config.dropout, self.training)

    def delta_weight(self) -> torch.Tensor:
        g = self.scale_vector()
        w0 = self.view.weight2d().detach().to(g.dtype)
        return self.view.to_param((g - 1)[:, None] * w0 + (g * self.scale)[:, None] * (self.lora_B @ self.lora_A))

    def clear_cache(self) -> None:
        """Forget the cached ``‖W0‖²`` (needed only after editing ``W0`` through ``.data``)."""
        self.stats.clear()

    # ---- PEFT format: LoRA with use_dora=True ---------------------------------------------
    @classmethod
    def peft_accepts(cls, pcfg: dict) -> bool:
        return pcfg.get("peft_type") == "LORA" and bool(pcfg.get("use_dora"))

    @classmethod
    def to_peft_config(cls, config: DoraConfig, views: list[LayerView]) -> dict:
        return {**super().to_peft_config(config, views), "use_dora": True}

    def _peft_magnitude_shape(self) -> tuple[int, ...]:
        if self.view.kind in ("conv1d", "conv2d"):
            return (1, self.view.out_features, *([1] * len(self.view.kernel)))
        return (self.view.out_features,)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().peft_tensors(), "lora_magnitude_vector": self.magnitude.reshape(self._peft_magnitude_shape())}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        mag = tensors["lora_magnitude_vector"]
        if mag.numel() != self.view.out_features:
            raise ShapeMismatchError(
                f"module '{self.view.name}': PEFT tensor lora_magnitude_vector has shape {tuple(mag.shape)}, "
                f"rankwise expects {self._peft_magnitude_shape()} (one magnitude per output of the "
                f"{self.view.out_features}x{self.view.in_features} weight). Load it onto the model it was trained on."
            )
        super().load_peft_tensors(tensors)
        with torch.no_grad():
            self.magnitude.copy_(mag.reshape(-1))

    @classmethod
    def peft_suffixes(cls) -> tuple[str, ...]:
        return (*super().peft_suffixes(), "lora_magnitude_vector")
