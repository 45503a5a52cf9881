"""SALT: Singular Value Adaptation with Low-Rank Transformation
(Elsayed et al., 2025, arXiv:2503.16055; BMVC 2025).

The top ``r`` singular values of ``W0 = U Σ Vᵀ`` get a trainable scale ``α`` and shift ``β``
(kept non-negative by a ReLU), and a LoRA update covers the remaining directions::

    W = U_r diag(ReLU(α ⊙ σ_r + β)) V_rᵀ + W_rest + s · B A
    ΔW = U_r diag(ReLU(α ⊙ σ_r + β) − σ_r) V_rᵀ + s · B A,     s = lora_alpha / lora_rank

``α = 1``, ``β = 0`` at init. Choices where the paper and the reference code leave room:
the LoRA term is a full-space ``B A`` as in the reference implementation (``X Y`` added to the
reconstructed weight), not projected onto the residual subspace; and it is initialized like LoRA
(``A`` Kaiming-uniform from the generator, ``B = 0``) rather than both factors ``N(0, 0.01²)``,
so ``ΔW = 0`` exactly at init. The reference code's optional penalty on ``α − 1``, ``β`` and
``‖X‖‖Y‖`` is not part of the method here.

Activation view (two products of width ``r + lora_rank``, never ``W_rest``)::

    h = x [V_r, Aᵀ];   y = W0 x + b + [h₁ ⊙ (ReLU(α σ + β) − σ), s · h₂] [U_r, B]ᵀ

Parameters per layer: ``2r + lora_rank (out + in)``. ``rank`` is clamped to ``min(out, in)``;
``U_r, σ_r, V_r`` are non-persistent buffers recomputed from ``W0`` on load. Works on every kind.
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
from ._svd_common import check_rank_fits, low_rank_out, scale_channels, weight_svd


@dataclass
class SaltConfig(AdapterConfig):
    """rank: r top singular values scaled and shifted (clamped to min(out, in)); lora_rank: rank
    of the LoRA term; lora_alpha: its α (default lora_rank, so s = 1)."""

    rank: int = 8
    lora_rank: int = 8
    lora_alpha: float | None = None

    def __post_init__(self):
        super().__post_init__()
        for name in ("rank", "lora_rank"):
            v = getattr(self, name)
            self._check(isinstance(v, int) and not isinstance(v, bool) and v > 0, name,
                        f"{name} must be a positive integer.")
        self._check(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha",
                    "lora_alpha must be positive (or None: lora_alpha = lora_rank).")

    @property
    def lora_scale(self) -> float:
        return (float(self.lora_rank) if self.lora_alpha is None else float(self.lora_alpha)) / self.lora_rank


@register("salt")
class Salt(Method):
    """Scale/shift of the top singular values plus LoRA (see module docstring)."""

    Config = SaltConfig
    kinds = ("linear", "hf_conv1d", "conv1d", "conv2d", "embedding")
    summary = "scale & shift the top-r singular values of W0 (ReLU) plus a LoRA term (SALT)"
    identity_at_init = True
    merge_atol = 1e-5
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: SaltConfig, generator=None, calibration=None):
        super().__init__(view, config)
        self.view, self.config = view, config
        self.rank = r = check_rank_fits(view, config.rank)
        self.lora_rank = k = config.lora_rank
        self.scale = config.lora_scale
        u, s, vt = weight_svd(view, r)
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("s", s, persistent=False)
        self.register_buffer("vt", vt, persistent=False)
        kw = {"dtype": u.dtype, "device": u.device}
        self.salt_scale = nn.Parameter(torch.ones(r, **kw))
        self.salt_shift = nn.Parameter(torch.zeros(r, **kw))
        self.lora_A = nn.Parameter(torch.empty(k, view.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(view.out_features, k, **kw))
        bound = 1.0 / math.sqrt(view.in_features)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)

    @classmethod
    def num_params(cls, view: LayerView, config: SaltConfig) -> int:
        r = check_rank_fits(view, config.rank)
        return 2 * r + config.lora_rank * (view.out_features + view.in_features)

    def sigma_delta(self) -> torch.Tensor:
        """``ReLU(α ⊙ σ + β) − σ``: the change of the top singular values."""
        return F.relu(self.salt_scale * self.s + self.salt_shift) - self.s

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        d = torch.cat([self.sigma_delta(), self.s.new_full((self.lora_rank,), self.scale)])
        a = torch.cat([self.vt, self.lora_A])
        b = torch.cat([self.u, self.lora_B], dim=1)
        return low_rank_out(self.view, x, base_out, a, b, mid=lambda h: scale_channels(h, d, self.view))

    def delta_weight(self) -> torch.Tensor:
        d = (self.u * self.sigma_delta()) @ self.vt + (self.lora_B @ self.lora_A) * self.scale
        return self.view.to_param(d)
