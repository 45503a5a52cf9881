"""LoRA-XS: Low-Rank Adaptation with Extremely Small number of parameters
(Bałazy, Banaei, Aberer, Tabor, 2024, arXiv:2405.17604).

The frozen factors come from the truncated SVD of the base weight ``W0 = U Σ Vᵀ``; only a tiny
``r × r`` matrix ``R`` between them is trained::

    W = W0 + s · (U_r Σ_r) R V_rᵀ,     U_r (out × r), Σ_r (r × r), V_r (in × r) frozen,
                                        R (r × r) trained,  s = α / r  (α = r by default → s = 1)

As in the paper, the singular values go into the left factor (``A = U_r Σ_r``, ``B = V_rᵀ``), and
``R ~ N(0, σ²)`` with a small ``σ`` (``init_std``, 1e-5 as the paper), so ΔW is tiny but not
exactly zero at init (``identity_at_init = False``). ΔW lies in ``span(U_r) × span(V_r)``.

Activation view (two thin products; the ``r × r`` core is folded into the frozen ``U_r Σ_r``)::

    y = W0 x + b + (x V_r) · (s · U_r Σ_r R)ᵀ        (the out × r product U_rΣ_r R is formed per step)

Parameters per layer: ``r²`` (independent of the layer's size). ``rank`` larger than
``min(out, in)`` is clamped to it. The frozen factors are non-persistent buffers recomputed from
``W0`` (see :mod:`rankwise.methods._svd_common`), so a saved adapter holds only ``R``.
Works on every layer kind: ``V_rᵀ`` is applied as the layer's own operation (conv, lookup).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.registry import register
from ._svd_common import check_rank_fits, low_rank_out, weight_svd


@dataclass
class LoraXSConfig(AdapterConfig):
    """rank: r (top singular triplets; clamped to min(out, in)); alpha: α (default r, so s = 1);
    init_std: σ of R's Gaussian init."""

    rank: int = 8
    alpha: float | None = None
    init_std: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        self._check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
                    "rank", "rank must be a positive integer.")
        self._check(self.alpha is None or self.alpha > 0, "alpha", "alpha must be positive (or None: alpha = rank).")
        self._check(self.init_std >= 0, "init_std", "init_std must be ≥ 0.")


@register("lora_xs")
class LoraXS(Method):
    """``ΔW = s · U_r Σ_r R V_rᵀ`` with only ``R`` trained (see module docstring)."""

    Config = LoraXSConfig
    kinds = ("linear", "hf_conv1d", "conv1d", "conv2d", "embedding")
    summary = "ΔW = s·U_rΣ_r R V_rᵀ, frozen SVD factors of W0, trainable r×r R (Bałazy et al. 2024)"
    identity_at_init = False
    merge_atol = 1e-5
    default_lr = 1e-2
    demo_options = {"rank": 16}

    def __init__(self, view: LayerView, config: LoraXSConfig, generator=None, calibration=None):
        super().__init__(view, config)
        self.view, self.config = view, config
        self.rank = r = check_rank_fits(view, config.rank)
        self.scale = (float(r) if config.alpha is None else float(config.alpha)) / r
        u, s, vt = weight_svd(view, r)
        self.register_buffer("us", u * s, persistent=False)  # U_r Σ_r  (out × r)
        self.register_buffer("vt", vt, persistent=False)  # V_rᵀ    (r × in)
        self.lora_R = nn.Parameter(torch.empty(r, r, dtype=u.dtype, device=u.device))
        with torch.no_grad():
            self.lora_R.normal_(0.0, config.init_std, generator=generator)

    @classmethod
    def num_params(cls, view: LayerView, config: LoraXSConfig) -> int:
        return check_rank_fits(view, config.rank) ** 2

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return low_rank_out(self.view, x, base_out, self.vt, (self.us @ self.lora_R) * self.scale)

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param((self.us @ self.lora_R) @ self.vt * self.scale)
