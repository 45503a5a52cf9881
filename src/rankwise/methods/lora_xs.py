"""LoRA-XS: Low-Rank Adaptation with Extremely Small number of parameters
(Bałazy, Banaei, Aberer, Tabor, 2024, arXiv:2405.17604).

The frozen factors come from the truncated SVD of the base weight ``W0 = U Σ Vᵀ``; only a tiny
``r × r`` matrix ``R`` between them is trained::

    W = W0 + s · U_r R Σ_r V_rᵀ,     U_r (out × r), Σ_r V_rᵀ (r × in) frozen,
                                      R (r × r) trained,  s = α / r  (rsLoRA: α / √r)

The singular values sit on the input side of ``R``, as in the authors' code
(``utils/initialization_utils.py``: the SVD of ``W0ᵀ`` gives ``lora_A = Σ_r V_rᵀ``,
``lora_B = U_r``; forward ``lora_B(R(lora_A(drop(x))))``). The paper's "``A = U_r Σ_r``,
``B = V_rᵀ``" is the same thing written for ``h = x W`` with ``W`` of shape ``in × out``. It
matters for training: ``∂L/∂R = s · U_rᵀ G V_r Σ_r`` scales column ``j`` of the gradient by
``σ_j`` (``G = ∂L/∂W``). ``R ~ N(0, σ²)`` with a small ``σ`` (``init_std``, 1e-5 as the authors'
code), so ΔW is tiny but not exactly zero at init (``identity_at_init = False``).

Scale: ``alpha`` defaults to ``r`` (``s = 1``), as the authors' math-reasoning script
(``lora_alpha = r``); their GLUE script uses ``α = 16`` for every rank (``s = 16/r``) and the
commonsense README ``α = 2r``. Pass ``alpha=16`` to reproduce the GLUE setting (with Adam, ``s``
acts like a factor on the learning rate; ``default_lr`` is measured at ``s = 1``).

Activation view (two thin products, ``U_r R`` formed per step, ``out × r``)::

    y = W0 x + b + s · (U_r R) (Σ_r V_rᵀ drop(x))

Parameters per layer: ``r²`` (independent of the layer's size). ``rank`` larger than
``min(out, in)`` is clamped to it (and ``s`` uses the clamped rank). The frozen factors are
non-persistent buffers recomputed from ``W0`` (see :mod:`rankwise.methods._svd_common`), so a
saved adapter holds only ``R``. Works on every layer kind: ``Σ_r V_rᵀ`` is applied as the layer's
own operation (conv, lookup).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import low_rank_apply, normal_
from ..core.registry import register
from ._svd_common import check_rank_fits, weight_svd


@dataclass
class LoraXSConfig(RankAlphaConfig):
    """rank: r (top singular triplets; clamped to min(out, in)); alpha: α (default r, so s = 1);
    dropout: on the adapter's input; rslora: s = α/√r; init_std: σ of R's Gaussian init."""

    init_std: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        self._check(self.init_std >= 0, "init_std", "init_std must be ≥ 0.")


@register("lora_xs")
class LoraXS(Method):
    """``ΔW = s · U_r R Σ_r V_rᵀ`` with only ``R`` trained (see module docstring)."""

    Config = LoraXSConfig
    summary = "ΔW = s·U_r R Σ_r V_rᵀ, frozen SVD factors of W0, trainable r×r R (Bałazy et al. 2024)"
    identity_at_init = False
    default_lr = 1e-2
    demo_options = {"rank": 16}

    def __init__(self, view: LayerView, config: LoraXSConfig, generator=None, calibration=None):
        super().__init__(view, config)
        self.rank = r = check_rank_fits(view, config.rank)
        self.scale = config.replace(rank=r).scale  # α / r of the rank actually used
        u, s, vt = weight_svd(view, r)
        self.register_buffer("u", u, persistent=False)  # U_r       (out × r)
        self.register_buffer("svt", s[:, None] * vt, persistent=False)  # Σ_r V_rᵀ  (r × in)
        self.lora_R = nn.Parameter(normal_(torch.empty(r, r, **view.factory_kwargs), config.init_std, generator))

    @classmethod
    def num_params(cls, view: LayerView, config: LoraXSConfig) -> int:
        return check_rank_fits(view, config.rank) ** 2

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return low_rank_apply(self.view, x, base_out, self.svt, self.u @ self.lora_R, self.scale,
                              self.config.dropout, self.training)

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param((self.u @ self.lora_R) @ self.svt * self.scale)
