"""PiSSA: Principal Singular values and Singular vectors Adaptation (Meng, Wang & Zhang,
NeurIPS 2024, arXiv:2404.02948).

The adapter starts from the top-``r`` SVD of the frozen weight ``W0 = U S Vᵀ``::

    A₀ = √(S_r / s) V_rᵀ   (r × in),     B₀ = U_r √(S_r / s)   (out × r),     s = α / r

so ``s · B₀ A₀ = U_r S_r V_rᵀ`` is the best rank-``r`` approximation of ``W0`` (Eckart–Young),
and the remaining ``W0 − s·B₀A₀`` (the "residual", the minor singular components) stays frozen.
Training updates ``A, B`` (initialized to ``A₀, B₀``), i.e. the principal subspace, which the
paper shows converges faster than LoRA's zero-initialized update.

rankwise keeps ``W0`` untouched and the adapter holds ``A₀, B₀`` (``ΔW = s·(B A − B₀ A₀)``,
see ``_init_common.py``): the adapted model equals PEFT's residual model ``(W0 − s·B₀A₀) + s·BA``
and equals the base model exactly at init.

``niter > 0`` uses the fast randomized SVD (Halko et al. 2011; the paper's "fast SVD", PEFT's
``init_lora_weights="pissa_niter_K"``) with ``niter`` power iterations and ``oversample`` extra
test vectors, seeded by ``rw.adapt``'s generator: error ``‖W0 − s·B₀A₀‖₂ ≤ σ_{r+1} +
(1 + 11√(r+p)·√min(m,n))^{1/(2·niter+1)} σ_{r+1}`` w.h.p. (see :func:`rankwise.linalg.randomized_svd`).
All target layers of the same shape are factored in one batched call.

Parameters per layer: ``r · (in + out)`` (plus the frozen ``A₀, B₀`` buffers, saved with the adapter).
PEFT: ``export_peft`` writes the equivalent rank-``2r`` LoRA; ``import_peft`` reads PEFT's own
``init_lora_weights="pissa"`` adapters (rebuilding ``A₀, B₀`` from ``W0`` as PEFT does).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.registry import register
from ..errors import ConfigError
from ..linalg import batched_map, randomized_svd, truncated_svd
from ._init_common import WeightSplit, svd_factors


@dataclass
class PissaConfig(RankAlphaConfig):
    """niter: 0 = exact SVD, K > 0 = randomized SVD with K power iterations;
    oversample: extra random test vectors for the randomized SVD."""

    niter: int = 0
    oversample: int = 8

    def __post_init__(self):
        super().__post_init__()
        self._check_int("niter", 0)
        self._check_int("oversample", 0)


def weight_svds(views: dict[str, LayerView], rank: int, *, smallest: bool = False, niter: int = 0,
                oversample: int = 0, generator=None) -> dict[str, tuple]:
    """Top (or bottom) ``rank`` SVD triplets of every view's ``W0``, batched over equal shapes."""
    names = list(views)
    mats = [views[n].weight2d().detach() for n in names]

    def fn(stack):
        if niter > 0:
            return randomized_svd(stack, rank, oversample=oversample, niter=niter, generator=generator)
        return truncated_svd(stack, rank, smallest=smallest)

    return dict(zip(names, batched_map(fn, mats)))


@register("pissa")
class Pissa(WeightSplit):
    """``ΔW = s·(BA − B₀A₀)``, ``B₀A₀`` the top-r SVD part of ``W0`` (see module docstring)."""

    Config = PissaConfig
    summary = "A,B from the top-r SVD of W0, residual frozen (Meng et al. 2024); randomized SVD option"
    peft_init = "pissa"

    @property
    def deterministic_init(self) -> bool:  # the randomized SVD (niter > 0) is seeded
        return self.config.niter == 0

    @classmethod
    def decompose(cls, views, config: PissaConfig, generator=None) -> dict:
        return weight_svds(views, config.rank, niter=config.niter, oversample=config.oversample,
                           generator=generator)

    @classmethod
    def split(cls, usv, config: PissaConfig):
        return svd_factors(*usv, config.scale)

    # ---- PEFT ----------------------------------------------------------------------------------
    @classmethod
    def peft_accepts(cls, pcfg: dict) -> bool:
        init = pcfg.get("init_lora_weights")
        return pcfg.get("peft_type") == "LORA" and isinstance(init, str) and init.startswith("pissa")

    @classmethod
    def from_peft_config(cls, pcfg: dict) -> dict:
        if pcfg["init_lora_weights"] != "pissa":
            raise ConfigError(
                f"PEFT adapter has init_lora_weights={pcfg['init_lora_weights']!r}: its residual base weight came "
                "from a randomized SVD that cannot be rebuilt. Convert it to LoRA in PEFT (save_pretrained("
                "path_initial_model_for_weight_conversion=...)) and import that."
            )
        return cls.lora_options_from_peft(pcfg, "PiSSA")
