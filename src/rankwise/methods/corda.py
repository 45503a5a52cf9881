"""CorDA: Context-oriented Decomposition Adaptation (Yang et al., NeurIPS 2024, arXiv:2406.05223).

CorDA orients the decomposition of ``W0`` by the task context: with ``C = E[x xᵀ]`` the
(uncentered) covariance of the layer's inputs on calibration data, it takes the SVD of ``W0 C``
and maps it back with ``C⁻¹``::

    W0 C = U S Vᵀ       ⇒      W0 = U S (C⁻¹ V)ᵀ        (exact, full rank)

    A₀ = √(S_r / s) (C⁻¹ V_r)ᵀ   (r × in),     B₀ = U_r √(S_r / s)   (out × r),    s = α / r

so ``s · B₀ A₀`` is the part of ``W0`` along the top (or bottom) ``r`` context directions, and
``W0 − s·B₀A₀`` stays frozen. Two modes:

* ``mode="ipm"`` (instruction-previewed): the *largest* ``r`` components, with ``C`` from samples
  of the downstream task — the adapter starts from what the task uses most;
* ``mode="kpm"`` (knowledge-preserved): the *smallest* ``r`` components, with ``C`` from data
  whose knowledge must be kept (e.g. QA) — that knowledge stays in the frozen part.

``C`` is made safely invertible as in the reference code (and PEFT): ``C' = C + d·mean(diag C)·I``
with ``d = 0.01`` doubled until ``‖C' C'⁻¹ − I‖_F < 0.05`` (:func:`rankwise.linalg.damped_inverse`);
``C'`` is used on both sides, so the decomposition stays exact. ``C`` is the reference code's
(and PEFT's) ``mean over forward calls of (X/|max X|)ᵀ(X/|max X|)`` — each calibration batch's
input rows divided by their largest entry, padding rows left out
(:class:`~rankwise.core.calibrate.MaxNormalizedGram`, ``in × in`` per layer, streamed). Its
scale does not change ``s·B₀A₀`` but it does set the balance between ``A₀`` and ``B₀`` (a
scale ``t`` of ``C`` gives ``A₀/√t``, ``B₀·√t``), hence the training dynamics, so rankwise
uses the same normalization (PEFT's hook assumes batches of one sample; here a call is a batch).

As for PiSSA, rankwise keeps ``W0`` untouched and the adapter holds ``A₀, B₀``
(``ΔW = s·(B A − B₀ A₀)``, see ``_init_common.py``): the model is the base model exactly at init.
Parameters per layer: ``r · (in + out)``. Linear and HF ``Conv1D`` layers (as PEFT).
PEFT: ``export_peft`` writes the equivalent rank-``2r`` LoRA. PEFT's unconverted CorDA adapters
cannot be imported (their residual base depends on the calibration data): convert them first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.registry import register
from ..errors import CalibrationError, ConfigError
from ..linalg import damped_inverse
from ._init_common import ResidualLowRank


@dataclass
class CordaConfig(RankAlphaConfig):
    """mode: 'ipm' (instruction-previewed: top-r components) | 'kpm' (knowledge-preserved:
    bottom-r components); damp: initial relative ridge of the covariance."""

    mode: str = "ipm"
    damp: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        self._check(self.mode in ("ipm", "kpm"), "mode", "use 'ipm' (instruction-previewed) or 'kpm' "
                    "(knowledge-preserved).")
        self._check(isinstance(self.damp, (int, float)) and self.damp > 0, "damp", "use a positive ridge factor.")


def corda_factors(w: torch.Tensor, cov: torch.Tensor, rank: int, mode: str, damp: float = 0.01):
    """``(U_r, S_r, (C'⁻¹ V_r)ᵀ)`` of ``W C'`` for ``mode`` 'ipm' (top) or 'kpm' (bottom)."""
    w = w.float() if w.dtype != torch.float64 else w
    fixed, inv, _ = damped_inverse(cov.to(w.dtype), damp=damp)
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    sl = slice(0, rank) if mode == "ipm" else slice(s.shape[0] - rank, s.shape[0])
    return u[:, sl], s[sl], vh[sl] @ inv


@register("corda")
class Corda(ResidualLowRank):
    """``ΔW = s·(BA − B₀A₀)`` from the SVD of ``W0·C`` (see module docstring)."""

    Config = CordaConfig
    kinds = ("linear", "hf_conv1d")
    summary = "A,B from the SVD of W0·C (input covariance), IPM/KPM modes, residual frozen (Yang et al. 2024)"
    calibration_needs = ("input_cov",)
    peft_init = "corda"
    default_lr = 1e-3  # demo task: 3e-3 diverges (A₀ carries C⁻¹), 1e-3 beats 3e-4 (loss 1.14 vs 1.89)

    @classmethod
    def calibration_options(cls, config: CordaConfig) -> dict:
        return {"cov_normalize": "max_per_call"}

    def initial_factors(self, view: LayerView, config: CordaConfig, generator, calibration):
        if calibration is None or getattr(calibration, "moments", None) is None:
            raise CalibrationError(f"corda: module '{view.name}' got no input covariance; adapt with "
                                   "rw.adapt(model, 'corda', ..., calibration=batches).")
        u, s, vt = corda_factors(view.weight2d().detach(), calibration.cov, config.rank, config.mode, config.damp)
        root = (s / config.scale).sqrt()
        return root[:, None] * vt, u * root[None, :]

    @classmethod
    def peft_accepts(cls, pcfg: dict) -> bool:
        return pcfg.get("peft_type") == "LORA" and pcfg.get("init_lora_weights") == "corda"

    @classmethod
    def from_peft_config(cls, pcfg: dict) -> dict:
        raise ConfigError(
            "PEFT CorDA adapter (init_lora_weights='corda'): PEFT saves it against a residual base weight that "
            "depends on its calibration covariance, which the adapter file does not hold, so it cannot be put "
            "on the original model. Convert it to LoRA in PEFT (save_pretrained(path_initial_model_for_weight_"
            "conversion=...)) and import that."
        )
