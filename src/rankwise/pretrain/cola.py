r"""CoLA: a low-rank bottleneck with a nonlinearity in place of each dense layer.

Liu, Zhang, Yang, et al., "CoLA: Compute-Efficient Pre-Training of LLMs via Low-Rank Activation",
2025, arXiv 2502.10940; code ``alvin-zyl/CoLA`` (``cola/cola_layer.py``, ``ColaLayer``). Each target
layer (no base weight) becomes

    y = B σ(A x) + b,    A ∈ R^{r×n}, B ∈ R^{m×r},   σ = SiLU (default)

The paper's observation is that the activations of pretrained LLMs have a low effective rank; the
nonlinear bottleneck keeps the network's expressiveness per parameter and cuts the compute of every
layer from m·n to (m + n)·r. The authors apply it to all attention and MLP projections of LLaMA
(the default targets here) and keep the MLP's own gate activation.

Init (``ColaLayer``): every entry of A and B is N(0, σ₀²) with σ₀ = (n + m)^(-1/4) · r^(-1/4), so
``B A`` has entries of variance r·σ₀⁴ = 1/(n + m) (Xavier's). The bias, if the replaced layer had
one, is kept. Default rank 128 is not in the paper (they use rank ≈ d/4: 128 for d = 512 …); pass
``rank`` for your width. ``activation``: ``silu`` (paper), ``gelu``, ``relu``, ``tanh``, or
``identity`` (a plain linear low-rank factorization ``W = B A``, the "Low-Rank" baseline of
low-rank pretraining benchmarks).

No dense weight: with σ between A and B the layer is not linear in x, so :func:`~rankwise.pretrain.to_dense`
refuses a CoLA model (except ``activation="identity"``) — save it in its factorized form (its
``state_dict``, ``rankwise.train.save_checkpoint``) and rebuild it with ``parametrize`` before
loading. ``refactorize_every`` (SVD re-balancing of B A plus a momentum reset, see ``sltrain.py``)
needs a product B A, so it is only accepted with ``activation="identity"``.

Deviations: A is stored as (r, n) and B as (m, r) (the authors store the transposes and compute
``x @ A``); the bias keeps the replaced layer's values rather than a fresh uniform draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import register
from .relora import _int
from .sltrain import refactorize_layers

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh, "identity": None}


class CoLALinear(nn.Module):
    """``y = B σ(A x) + b``."""

    def __init__(self, linear: nn.Linear, rank: int, activation: str, generator: torch.Generator):
        super().__init__()
        w = linear.weight
        m, n = linear.out_features, linear.in_features
        self.in_features, self.out_features, self.rank, self.activation = n, m, rank, activation
        std = (n + m) ** -0.25 * rank ** -0.25
        self.lora_A = nn.Parameter(
            (torch.randn(rank, n, device=w.device, generator=generator) * std).to(w.dtype))
        self.lora_B = nn.Parameter(
            (torch.randn(m, rank, device=w.device, generator=generator) * std).to(w.dtype))
        self.bias = linear.bias
        self._act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.lora_A)
        if self._act is not None:
            h = self._act(h)
        return F.linear(h, self.lora_B, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"activation={self.activation}")


@register
class CoLA:
    """CoLA: ``y = B σ(A x) + b`` (no dense weight unless σ is the identity); math in the module
    docstring."""

    name = "cola"

    @dataclass
    class Config:
        rank: int = 128
        activation: str = "silu"
        refactorize_every: int = 0  # only with activation="identity"

        def __post_init__(self):
            _int("cola", "rank", self.rank, 1)
            if self.activation not in ACTIVATIONS:
                raise ConfigError(f"cola: activation={self.activation!r}; use one of {', '.join(ACTIVATIONS)} "
                                  "(the paper: silu).")
            _int("cola", "refactorize_every", self.refactorize_every, 0)
            if self.refactorize_every and self.activation != "identity":
                raise ConfigError(f"cola: refactorize_every={self.refactorize_every} needs a product B·A, but "
                                  f"activation={self.activation!r} sits between A and B, so re-factoring would change "
                                  "the function. Use refactorize_every=0, or activation='identity'.")

    @staticmethod
    def wrap(linear: nn.Linear, config, generator: torch.Generator) -> nn.Module:
        return CoLALinear(linear, config.rank, config.activation, generator)

    @staticmethod
    @torch.no_grad()
    def dense_weight(module) -> torch.Tensor:
        if module.activation != "identity":
            raise ConfigError(
                f"cola: a CoLA layer computes B·{module.activation}(A·x), which is not linear in x, so it has no "
                f"dense weight (layer {getattr(module, '_rankwise_name', '?')}, {module.out_features}x"
                f"{module.in_features}, rank {module.rank}). Save the model in its factorized form (state_dict or "
                "rankwise.train.save_checkpoint) and rebuild it with rankwise.pretrain.parametrize(model, 'cola', ...) "
                "before loading; to_dense works only with activation='identity'.")
        return (module.lora_B.float() @ module.lora_A.float()).to(module.lora_B.dtype)

    @classmethod
    def on_step(cls, model, layers, config, step, optimizers, total_steps):
        if not config.refactorize_every or step == 0 or step % config.refactorize_every:
            return None
        return refactorize_layers(layers, optimizers)
