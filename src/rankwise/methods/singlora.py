"""SingLoRA: Low-Rank Adaptation Using a Single Matrix
(Bensaïd, Rotstein, Velich, Bensaïd, Kimmel, 2025, arXiv:2507.05566).

One trainable matrix ``A`` replaces LoRA's pair ``B, A``; the update is symmetric for square
layers and ramps up from zero during the first ``T`` training steps::

    W = W0 + (α / r) · u(t) · A Aᵀ,      A ∈ R^{d × r},   u(t) = min(t / T, 1)

Non-square layers (``out ≠ in``) are handled as the paper's extension describes:
``A ∈ R^{max(out, in) × r}`` and ``ΔW = (α/r) u(t) A[:out] A[:in]ᵀ`` (the truncated
``A* = A[:min]`` stands in for the shorter side), so ``ΔW`` is ``out × in`` and its leading
``min × min`` block is symmetric.

Ramp-up: ``t`` counts the forward passes made in training mode with gradients enabled (one per
optimizer step in ordinary training; the counter is a persistent buffer, so it is saved and
resumed). The counter is incremented before use, so the first training step already has
``u = 1/T`` and ``A`` gets a gradient. At init ``t = 0`` → ``u = 0`` → ``ΔW = 0`` exactly.
``ramp_up_steps = 0`` disables the ramp (``u ≡ 1``). :meth:`SingLora.finish_warmup` jumps to the
end of the ramp.

Init: ``A ~ U(−1/√d, 1/√d)`` from the generator with ``d = max(out, in)`` (Kaiming-uniform over
the long side, like LoRA's ``A``). The only public code (kyegomez/SingLoRA, unofficial; no authors'
code was found) applies Kaiming-uniform with fan-in ``r``, which makes ``A Aᵀ`` several times
larger than ``W0`` once the ramp ends; the paper's stable feature-learning argument needs entries
of order ``1/√d``.

Activation view (two thin products, never ``A Aᵀ``)::

    y = W0 x + b + (α/r) u(t) · (drop(x) A[:in]) A[:out]ᵀ      (rsLoRA: α/√r)

Parameters per layer: ``r · max(out, in)`` (``r · d`` for a square ``d × d`` layer, half of
LoRA's ``2 r d``). Works on every layer kind (``in`` is ``in_channels · k`` for convolutions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import kaiming_bound, low_rank_apply, uniform_
from ..core.registry import register


@dataclass
class SingLoraConfig(RankAlphaConfig):
    """rank: r; alpha: α (default r, so α/r = 1); dropout: on the adapter's input; rslora: α/√r;
    ramp_up_steps: T of u(t) = min(t/T, 1) (0: off)."""

    ramp_up_steps: int = 100

    def __post_init__(self):
        super().__post_init__()
        self._check_int("ramp_up_steps", low=0)


@register("singlora")
class SingLora(Method):
    """``ΔW = (α/r) u(t) A[:out] A[:in]ᵀ`` (see module docstring)."""

    Config = SingLoraConfig
    summary = "ΔW = (α/r)·u(t)·A Aᵀ, one matrix, ramp-up u(t) = min(t/T, 1); non-square by truncation (SingLoRA)"
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: SingLoraConfig, generator=None, calibration=None):
        super().__init__(view, config)
        self.rank, self.scale = config.rank, config.scale
        d = max(view.out_features, view.in_features)
        self.singlora_A = nn.Parameter(uniform_(torch.empty(d, config.rank, **view.factory_kwargs),
                                                kaiming_bound(d), generator))
        self.register_buffer("ramp_step", torch.zeros((), dtype=torch.long, device=view.weight.device))

    @classmethod
    def num_params(cls, view: LayerView, config: SingLoraConfig) -> int:
        return config.rank * max(view.out_features, view.in_features)

    def ramp(self) -> torch.Tensor:
        """``u(t) = min(t / T, 1)`` as a 0-d tensor (1 when the ramp is off)."""
        t_max = self.config.ramp_up_steps
        if t_max == 0:
            return torch.ones((), dtype=self.singlora_A.dtype, device=self.singlora_A.device)
        return (self.ramp_step.to(self.singlora_A.dtype) / t_max).clamp(max=1.0)

    def finish_warmup(self) -> None:
        """Jump to the end of the ramp-up (``u = 1``), e.g. to evaluate a freshly built adapter."""
        self.ramp_step.fill_(self.config.ramp_up_steps)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.ramp_step += 1
        a, m, n = self.singlora_A, self.view.out_features, self.view.in_features
        return low_rank_apply(self.view, x, base_out, a[:n].t(), a[:m] * self.ramp(), self.scale,
                              self.config.dropout, self.training)

    def delta_weight(self) -> torch.Tensor:
        a, m, n = self.singlora_A, self.view.out_features, self.view.in_features
        return self.view.to_param((a[:m] @ a[:n].t()) * (self.ramp() * self.scale))
