"""LoRA-GA: Low-Rank Adaptation with Gradient Approximation (Wang, Yu & Li, NeurIPS 2024,
arXiv:2407.05000).

LoRA's first step changes the weight by ``ΔW₁ = −η s² (B Bᵀ G + G Aᵀ A)`` (``G = ∂L/∂W`` of full
fine-tuning): with LoRA's random ``A`` and zero ``B`` that is a random projection of ``G``. LoRA-GA
makes it match the full-FT step as well as rank allows by building ``A, B`` from the SVD of the
gradient ``G`` averaged over a few calibration batches, ``G ≈ U S Vᵀ`` (top ``2r`` triplets)::

    A₀ = V_{[:r]}ᵀ                         (r × in)    ("ArB2r", the paper's choice)
    B₀ = c · U_{[r:2r]} diag(S_{[r:2r]})   (out × r)

so ``B Bᵀ G`` lives in ``span U_{[r:2r]}`` and ``G AᵀA = U_{[:r]} S_{[:r]} V_{[:r]}ᵀ``: the first
update lies exactly in the top-``2r`` singular subspaces of ``G`` (column space ``U_{[:2r]}``, row
space ``V_{[:2r]}``), the best rank-``2r`` region for a step along ``G``.

Scaling (``scale``), as PEFT 0.21's ``LoraGAConfig``:

* ``"stable"`` (default): ``c = d_out^{1/4} / √γ`` (``stable_gamma`` ``γ``; the paper's
  "stable scale", whose product ``B A`` grows like ``√d_out / γ`` so the output variance stays
  ``O(1)`` as width grows);
* ``"weight_svd"``: ``c = σ₁(W0) / S_B[0]``; ``"gd_scale"``: ``A₀, B₀`` divided by ``s = α/r``;
  ``"unit"``: ``c = 1``.

``direction`` picks which triplets go where: ``"ArB2r"`` (above), ``"A2rBr"`` (A from ``r:2r``,
B from ``:r``), ``"ArBr"`` (A the odd, B the even indices), ``"random"`` (one random choice of
``r`` indices for both, drawn from ``rw.adapt``'s generator). This is PEFT's ``lora_ga_init``
exactly (B carries the singular values and the stable factor; the paper's listing spreads
``c`` over both factors — the product and hence the model are the same up to that split).

The base weight stays untouched: PEFT subtracts ``s·B₀A₀`` from ``W0`` so the model is unchanged
at step 0; rankwise keeps ``A₀, B₀`` as frozen buffers, ``ΔW = s·(B A − B₀A₀)`` (see
``_init_common.py``), the same model at every step and exactly the base model at init.

SVD: randomized subspace iteration (:func:`rankwise.linalg.randomized_svd`) with ``4r`` test
vectors and ``niter = 4`` power iterations — PEFT's ``torch.svd_lowrank(q=4r, niter=4)`` — with
a deterministic sign per triplet; ``svd="exact"`` uses the full SVD. When ``4r ≥ min(out, in)``
both are exact. If ``2r > min(out, in)`` the missing triplets are zero columns/rows.

Gradients come from the calibration engine (``calibration_needs = ("grad",)``): the mean over
the calibration batches of ``∂ loss_fn / ∂ W0``, collected only for the target weights, in
passes of bounded memory (``Batches(grad_bytes=...)``).

Parameters per layer: ``r · (in + out)``. PEFT: ``export_peft`` writes the equivalent rank-2r
LoRA on the original weights; PEFT's own (unconverted) LoRA-GA adapters hold a residual base
that depends on the gradients and are refused on import (convert them in PEFT first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.layers import LayerView
from ..core.registry import register
from ..errors import CalibrationError, ConfigError
from ..linalg import randomized_svd, truncated_svd
from ._init_common import InitConfig, ResidualLowRank, loading

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclass
class LoraGaConfig(InitConfig):
    """direction: which gradient singular triplets go to A and B (see module docstring);
    scale: 'stable' | 'weight_svd' | 'gd_scale' | 'unit'; stable_gamma: γ of the stable scale;
    svd: 'randomized' (4r test vectors, niter power iterations, as PEFT) or 'exact'."""

    direction: str = "ArB2r"
    scale_mode: str = "stable"
    stable_gamma: float = 16.0
    svd: str = "randomized"
    niter: int = 4

    def __post_init__(self):
        super().__post_init__()
        self._check(self.direction in DIRECTIONS, "direction", f"use one of {list(DIRECTIONS)}.")
        self._check(self.scale_mode in SCALES, "scale_mode", f"use one of {list(SCALES)}.")
        self._check(isinstance(self.stable_gamma, (int, float)) and self.stable_gamma > 0, "stable_gamma",
                    "use a positive γ (16 is the paper's and PEFT's default).")
        self._check(self.svd in ("randomized", "exact"), "svd", "use 'randomized' or 'exact'.")
        self._check(isinstance(self.niter, int) and self.niter >= 0, "niter",
                    "use a non-negative number of power iterations.")


def gradient_svd(grad: torch.Tensor, rank: int, config: LoraGaConfig, generator=None):
    """Top ``min(2r, min(out, in))`` SVD triplets of ``grad`` as ``config.svd`` asks."""
    k = min(2 * rank, *grad.shape)
    if config.svd == "exact":
        return truncated_svd(grad, k)
    return randomized_svd(grad, k, oversample=min(4 * rank, min(grad.shape)) - k, niter=config.niter,
                          generator=generator)


def lora_ga_factors(grad: torch.Tensor, weight: torch.Tensor, config: LoraGaConfig, generator=None):
    """``(A₀, B₀)`` of LoRA-GA from the mean gradient ``grad (out × in)`` (module docstring)."""
    r = config.rank
    u, s, vh = gradient_svd(grad.float(), r, config, generator)
    k = s.shape[0]
    if k < 2 * r:  # fewer triplets than 2r: pad with zeros (those columns/rows start at zero)
        u = torch.cat([u, u.new_zeros(u.shape[0], 2 * r - k)], 1)
        vh = torch.cat([vh, vh.new_zeros(2 * r - k, vh.shape[1])], 0)
        s = torch.cat([s, s.new_zeros(2 * r - k)])
    d = config.direction
    if d == "ArB2r":
        ia, ib = torch.arange(r), torch.arange(r, 2 * r)
    elif d == "A2rBr":
        ia, ib = torch.arange(r, 2 * r), torch.arange(r)
    elif d == "ArBr":
        ia, ib = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    else:
        ia = ib = torch.randperm(2 * r, generator=generator)[:r]
    a0 = vh[ia]
    s_b = s[ib]
    b0 = u[:, ib] * s_b[None, :]
    if config.scale_mode == "stable":
        b0 = b0 * (grad.shape[0] ** 0.25 / config.stable_gamma ** 0.5)
    elif config.scale_mode == "weight_svd":
        if s_b[0] > 0:
            w_s1 = torch.linalg.matrix_norm(weight.float(), ord=2)
            b0 = b0 * (w_s1 / s_b[0])
    elif config.scale_mode == "gd_scale":
        a0, b0 = a0 / config.scale, b0 / config.scale
    return a0, b0


@register("lora_ga")
class LoraGa(ResidualLowRank):
    """``ΔW = s·(BA − B₀A₀)``, ``A₀, B₀`` from the SVD of the calibration gradient (module docstring)."""

    Config = LoraGaConfig
    kinds = ("linear", "hf_conv1d")
    summary = "A,B from the SVD of the full-FT gradient on calibration batches, stable scale (Wang et al. 2024)"
    calibration_needs = ("grad",)
    peft_init = "lora_ga"

    @property
    def deterministic_init(self) -> bool:  # a function of the data, unless a random sketch or choice is made
        exact = self.config.svd == "exact" or 4 * self.rank >= min(self.view.out_features, self.view.in_features)
        return self.config.direction != "random" and exact

    def __init__(self, view: LayerView, config: LoraGaConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, self.name)
        a0 = b0 = None
        if not loading(calibration):
            if calibration is None or not hasattr(calibration, "grad"):
                raise CalibrationError(f"lora_ga: module '{view.name}' got no gradient; adapt with "
                                       "rw.adapt(model, 'lora_ga', ..., calibration=batches, loss_fn=...).")
            a0, b0 = lora_ga_factors(calibration.grad, view.weight2d().detach(), config, generator)
        self._setup(view, config, a0, b0)

    # ---- PEFT ----------------------------------------------------------------------------------
    @classmethod
    def peft_accepts(cls, pcfg: dict) -> bool:
        return pcfg.get("peft_type") == "LORA" and pcfg.get("init_lora_weights") == "lora_ga"

    @classmethod
    def from_peft_config(cls, pcfg: dict) -> dict:
        raise ConfigError(
            "PEFT LoRA-GA adapter (init_lora_weights='lora_ga'): PEFT saves it against a residual base weight "
            "W0 − s·B₀A₀ that depends on its calibration gradients, which the adapter file does not hold, so it "
            "cannot be put on the original model. Convert it to LoRA in PEFT (save_pretrained("
            "path_initial_model_for_weight_conversion=...)) and import that."
        )
