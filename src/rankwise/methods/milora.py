"""MiLoRA: Minor singular component LoRA (Wang et al., 2024, arXiv:2406.09044).

The mirror image of PiSSA: the adapter starts from the *smallest* ``r`` singular triplets of
``W0 = U S Vᵀ``, which the paper argues carry noise or long-tail knowledge, while the principal
subspace — the pretrained knowledge — stays frozen::

    A₀ = √(S_min / s) V_minᵀ   (r × in),     B₀ = U_min √(S_min / s)   (out × r),   s = α / r

so ``s · B₀ A₀ = U_min S_min V_minᵀ`` and ``W0 − s·B₀A₀`` is exactly the top ``min(m,n) − r``
part of ``W0``. As for PiSSA, rankwise keeps ``W0`` untouched and the adapter holds ``A₀, B₀``
(``ΔW = s·(B A − B₀ A₀)``, ``_init_common.py``), so the adapted model is the base model exactly
at init. The minor components need the full SVD (a randomized sketch finds the top of the
spectrum only); all target layers of one shape are factored in one batched call.

Parameters per layer: ``r · (in + out)``. PEFT has no MiLoRA; ``export_peft`` writes the
equivalent rank-``2r`` LoRA on the original base weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import RankAlphaConfig
from ..core.registry import register
from ._init_common import WeightSplit, svd_factors
from .pissa import weight_svds


@dataclass
class MiloraConfig(RankAlphaConfig):
    """rank, alpha, dropout, rslora as LoRA; the adapter starts at the minor singular components."""


@register("milora")
class Milora(WeightSplit):
    """``ΔW = s·(BA − B₀A₀)``, ``B₀A₀`` the bottom-r SVD part of ``W0`` (see module docstring)."""

    Config = MiloraConfig
    summary = "A,B from the smallest r singular triplets of W0, principal part frozen (Wang et al. 2024)"

    @classmethod
    def decompose(cls, views, config: MiloraConfig, generator=None) -> dict:
        return weight_svds(views, config.rank, smallest=True)

    @classmethod
    def split(cls, usv, config: MiloraConfig):
        return svd_factors(*usv, config.scale)
