"""EVA: Explained Variance Adaptation (Paischer et al., 2024, arXiv:2410.07170).

EVA initializes LoRA's ``A`` with the principal directions of each layer's *input activations*
on calibration data, and redistributes the rank budget across layers by explained variance::

    Xc = rows of the layer input, centered        (streamed: incremental SVD, never stored)
    Xc ≈ U S Vᵀ  →  A = V_{r_l}ᵀ   (r_l × in),   B = 0,   ΔW = s · B A   (a LoRA)

so the update starts at zero (the model is unchanged at init) and ``A`` projects onto the
directions of largest input variance, which carry most of the signal ``W x`` sees.

Rank redistribution: every layer offers its top ``k = round(ρ·r)`` components with their
explained-variance ratios ``σ_i² / total variance``; the ``L·r`` largest ratios over all ``L``
target layers win, and layer ``l`` gets ``r_l`` = the number of its winners (``0 ≤ r_l ≤ k``,
``Σ r_l = L·r``; ties go to the earlier layer). ``ρ = 1`` keeps ``r`` everywhere. With
``adjust_scaling_factors`` each layer's ``α`` is scaled by ``r_l / r`` so its scale ``α/r`` is
unchanged; a layer with ``r_l = 0`` is left out. Per-layer ranks and alphas are saved with the
adapter (``rw.load`` rebuilds them) and exported as PEFT's ``rank_pattern``/``alpha_pattern``.
``whiten`` divides each component by ``√σ_i`` (PEFT's option).

Implementation: the calibration engine (``core/calibrate.py``) keeps for each layer an
:class:`~rankwise.linalg.IncrementalSVD` of ``k + oversample`` components (one pass over the
batches, ``(k+p)·in`` memory per layer, padding rows left out, layers that see the same input —
q/k/v — share one SVD), exact whenever ``k + p ≥ in``; PEFT instead cycles the batches through an
incremental PCA of ``k`` components until they stop moving (cosine similarity ``τ``). Both
estimate the same top-``k`` principal components; ties in the budget are broken
deterministically here.

Parameters per layer: ``r_l · (in + out)``. Linear and HF ``Conv1D`` layers (as PEFT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.registry import register
from ..errors import CalibrationError, ConfigError
from ._init_common import no_data, pattern_key
from .lora import Lora


@dataclass
class EvaConfig(RankAlphaConfig):
    """rho: max rank per layer is round(rho·rank) (≥ 1; 1 = no redistribution);
    whiten: divide components by √σ; adjust_scaling_factors: keep α/r per layer after redistribution;
    center: PCA of centered inputs (as PEFT) or SVD of the raw inputs;
    oversample: extra components the incremental SVD carries (None: as many as it keeps)."""

    rho: float = 2.0
    whiten: bool = False
    adjust_scaling_factors: bool = True
    center: bool = True
    oversample: int | None = None

    def __post_init__(self):
        super().__post_init__()
        self._check(isinstance(self.rho, (int, float)) and self.rho >= 1.0, "rho",
                    "rho must be ≥ 1 (the max rank per layer is round(rho·rank)).")
        for f in ("whiten", "adjust_scaling_factors", "center"):
            self._check(isinstance(getattr(self, f), bool), f, "use True or False.")
        self._check(self.oversample is None or (isinstance(self.oversample, int) and self.oversample >= 0),
                    "oversample", "use a non-negative number of components or None.")

    @property
    def max_components(self) -> int:
        return max(self.rank, round(self.rank * self.rho))


@register("eva")
class Eva(Lora):
    """LoRA with ``A`` from the top principal components of the layer input, ``B = 0`` (see module docstring)."""

    Config = EvaConfig
    kinds = ("linear", "hf_conv1d")
    summary = "LoRA with A from the PCA of layer inputs, rank redistributed by explained variance (Paischer 2024)"
    calibration_needs = ("input_svd",)
    deterministic_init = True  # a function of W0's inputs on the calibration data only
    peft_init = "eva"

    @classmethod
    def calibration_options(cls, config: EvaConfig) -> dict:
        k = config.max_components
        return {"svd_rank": k, "svd_oversample": k if config.oversample is None else config.oversample,
                "center": config.center}

    @classmethod
    def plan(cls, views: dict[str, LayerView], config: EvaConfig, calibration, generator=None) -> dict:
        """Redistribute ``L·r`` ranks over the layers by explained-variance ratio."""
        offers = []
        for i, (name, view) in enumerate(views.items()):
            k = min(config.max_components, view.in_features, view.out_features)
            ratios = calibration[name].svd.explained_variance_ratio[:k].tolist()
            offers += [(-v, i, j, name) for j, v in enumerate(ratios)]
        offers.sort()
        budget = config.rank * len(views)
        counts = dict.fromkeys(views, 0)
        for _, _, _, name in offers[:budget]:
            counts[name] += 1
        out: dict[str, dict | None] = {}
        for name, r_l in counts.items():
            if r_l == 0:
                out[name] = None
            elif r_l != config.rank:
                alpha = config.lora_alpha * (r_l / config.rank if config.adjust_scaling_factors else 1.0)
                out[name] = {"rank": r_l, "alpha": alpha}
        return out

    def __init__(self, view: LayerView, config: EvaConfig, generator=None, calibration=None):
        Method.__init__(self, view, config)
        view.check_rank(config.rank, self.name)
        self.rank, self.scale, r = config.rank, config.scale, config.rank
        a = torch.zeros(r, view.in_features, **view.factory_kwargs)
        if not no_data(view, calibration):
            svd = getattr(calibration, "svd", None)
            if svd is None or svd.vh is None:
                raise CalibrationError(f"eva: module '{view.name}' got no input statistics; adapt with "
                                       "rw.adapt(model, 'eva', ..., calibration=batches).")
            comps = svd.vh[:r]
            if comps.shape[0] < r:
                raise CalibrationError(
                    f"eva: module '{view.name}' needs {r} principal components but its {svd.n} calibration rows "
                    f"give only {comps.shape[0]}. Give more calibration data or a lower rank."
                )
            if config.whiten:
                comps = comps / svd.s[:r].sqrt()[:, None]
            a.copy_(comps)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(view.out_features, r, **view.factory_kwargs))

    # ---- PEFT ----------------------------------------------------------------------------------
    @classmethod
    def to_peft_config(cls, config: EvaConfig, views: list[LayerView]) -> dict:
        pcfg = Lora.to_peft_config(config, views)
        pcfg["init_lora_weights"] = "eva"
        pcfg["eva_config"] = {"rho": float(config.rho), "whiten": config.whiten,
                              "adjust_scaling_factors": config.adjust_scaling_factors}
        return pcfg

    @classmethod
    def peft_patterns(cls, config: EvaConfig, adapters: dict[str, nn.Module]) -> dict:
        ranks = {n: ad.config.rank for n, ad in adapters.items() if ad.config.rank != config.rank}
        alphas = {n: ad.config.lora_alpha for n, ad in adapters.items() if ad.config.lora_alpha != config.lora_alpha}
        return {"rank_pattern": ranks, "alpha_pattern": alphas}

    @classmethod
    def peft_accepts(cls, pcfg: dict) -> bool:
        return pcfg.get("peft_type") == "LORA" and pcfg.get("init_lora_weights") == "eva" and not pcfg.get("use_dora")

    @classmethod
    def from_peft_config(cls, pcfg: dict) -> dict:
        if pcfg.get("bias", "none") != "none" or pcfg.get("lora_bias"):
            raise ConfigError("PEFT EVA adapter trains biases (bias != 'none'); rankwise's eva leaves biases frozen.")
        eva = pcfg.get("eva_config") or {}
        opts = {"rank": int(pcfg["r"]), "alpha": float(pcfg["lora_alpha"]),
                "dropout": float(pcfg.get("lora_dropout") or 0.0), "rslora": bool(pcfg.get("use_rslora"))}
        for key in ("rho", "whiten", "adjust_scaling_factors"):
            if key in eva:
                opts[key] = eva[key]
        return opts

    @classmethod
    def peft_module_overrides(cls, pcfg: dict, modules: list[str]) -> dict[str, dict]:
        """Per-module rank / alpha from PEFT's ``rank_pattern`` / ``alpha_pattern``."""
        ranks, alphas = pcfg.get("rank_pattern") or {}, pcfg.get("alpha_pattern") or {}
        out = {}
        for m in modules:
            ov = {}
            kr, ka = pattern_key(ranks, m), pattern_key(alphas, m)
            if kr is not None:
                ov["rank"] = int(ranks[kr])
            if ka is not None:
                ov["alpha"] = float(alphas[ka])
            if ov:
                out[m] = ov
        return out
