"""LoRA-GA: Low-Rank Adaptation with Gradient Approximation (Wang, Yu & Li, NeurIPS 2024,
arXiv:2407.05000).

LoRA's first step changes the weight by ``ΔW₁ = −η s² (B Bᵀ G + G Aᵀ A)`` (``G = ∂L/∂W`` of full
fine-tuning): with LoRA's random ``A`` and zero ``B`` that is a random projection of ``G``. LoRA-GA
makes it match the full-FT step as well as rank allows by building ``A, B`` from the SVD of the
gradient ``G`` averaged over a few calibration batches, ``G ≈ U S Vᵀ`` (top ``2r`` triplets).
The default (``variant="official"``) is the paper's and the authors' code's init
(Outsider565/LoRA-GA, ``lora_ga_init`` in its PEFT fork and ``reproduce/run_exp.py``)::

    A₀ = c · V_{[:r]}ᵀ       (r × in)       ("ArB2r", the paper's choice)
    B₀ = c · U_{[r:2r]}      (out × r)      singular vectors only, no singular values

Then ``G AᵀA = c² U_{[:r]} S_{[:r]} V_{[:r]}ᵀ`` and ``B BᵀG = c² U_{[r:2r]} S_{[r:2r]} V_{[r:2r]}ᵀ``, so
the first SGD step is ``ΔW₁ = −η s² c² [G]_{2r}``: the best rank-``2r`` approximation of the full
fine-tuning step (rank ``2r``), the paper's Theorem on gradient alignment.

Scaling (``scale_mode``), as the official code:

* ``"stable"`` (default): ``c = d_out^{1/4} / √γ`` on *both* factors (``stable_gamma`` ``γ = 16``;
  the paper's "stable scale": the product ``B A`` grows like ``√d_out / γ`` so the output variance
  stays ``O(1)`` as width grows);
* ``"weight_svd"`` (the code's ``weightS``): ``c = mean_i √(σ_i(W0) / s)`` over the top ``r``
  singular values of ``W0`` (exact here; the code uses ``svd_lowrank(q=4r)``, equal to float
  precision for these top values); ``"gd_scale"`` (``gd``): ``A₀, B₀`` divided by ``s = α/r``;
  ``"unit"``: ``c = 1``.

``direction`` picks which triplets go where: ``"ArB2r"`` (above), ``"A2rBr"`` (A from ``r:2r``,
B from ``:r``), ``"ArBr"`` (A the odd, B the even indices), ``"random"`` (a random permutation of
``0..2r−1``, drawn from ``rw.adapt``'s generator: A gets its first ``r`` indices, B the other ``r``).

``variant="peft"`` is PEFT 0.21's ``lora_ga_init`` instead: ``B₀ = c · U_{[r:2r]} diag(S_{[r:2r]})``
with the stable ``c`` on ``B₀`` only, ``A₀ = V_{[:r]}ᵀ``; ``weight_svd`` rescales ``B₀`` by
``σ₁(W0) / S_B[0]``; ``random`` gives A and B the *same* ``r`` indices. There
``B Bᵀ G = c² U S³ Vᵀ`` (over ``r:2r``) is negligible next to ``G AᵀA = [G]_r`` for a gradient of
small singular values, so the first step is nearly ``−η s² [G]_r``: rank ``r``, not ``2r``, and
``B₀`` is orders of magnitude smaller. It is kept to reproduce PEFT (the tests compare with PEFT
0.21 in that mode); the PEFT *export* is the same rank-``2r`` LoRA for both variants.

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

from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.registry import register
from ..errors import CalibrationError, ConfigError
from ..linalg import randomized_svd, truncated_svd
from ._init_common import ResidualLowRank

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclass
class LoraGaConfig(RankAlphaConfig):
    """direction: which gradient singular triplets go to A and B (see module docstring);
    scale_mode: 'stable' | 'weight_svd' | 'gd_scale' | 'unit'; stable_gamma: γ of the stable scale;
    variant: 'official' (the paper's code: singular vectors only, c on both factors) or 'peft'
    (PEFT 0.21: B carries the singular values and c); svd: 'randomized' (4r test vectors, niter
    power iterations, as both codes) or 'exact'."""

    direction: str = "ArB2r"
    scale_mode: str = "stable"
    stable_gamma: float = 16.0
    variant: str = "official"
    svd: str = "randomized"
    niter: int = 4

    def __post_init__(self):
        super().__post_init__()
        self._check(self.direction in DIRECTIONS, "direction", f"use one of {list(DIRECTIONS)}.")
        self._check(self.scale_mode in SCALES, "scale_mode", f"use one of {list(SCALES)}.")
        self._check(isinstance(self.stable_gamma, (int, float)) and self.stable_gamma > 0, "stable_gamma",
                    "use a positive γ (16 is the paper's and PEFT's default).")
        self._check(self.variant in ("official", "peft"), "variant", "use 'official' or 'peft'.")
        self._check(self.svd in ("randomized", "exact"), "svd", "use 'randomized' or 'exact'.")
        self._check_int("niter", 0)


def gradient_svd(grad: torch.Tensor, rank: int, config: LoraGaConfig, generator=None):
    """Top ``min(2r, min(out, in))`` SVD triplets of ``grad`` as ``config.svd`` asks."""
    k = min(2 * rank, *grad.shape)
    if config.svd == "exact":
        return truncated_svd(grad, k)
    return randomized_svd(grad, k, oversample=min(4 * rank, min(grad.shape)) - k, niter=config.niter,
                          generator=generator)


def lora_ga_factors(grad: torch.Tensor, weight: torch.Tensor, config: LoraGaConfig, generator=None):
    """``(A₀, B₀)`` of LoRA-GA from the mean gradient ``grad (out × in)`` (module docstring)."""
    r, peft = config.rank, config.variant == "peft"
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
        perm = torch.randperm(2 * r, generator=generator)
        ia, ib = perm[:r], (perm[:r] if peft else perm[r:])
    a0, b0, s_b = vh[ia], u[:, ib], s[ib]
    if peft:
        b0 = b0 * s_b[None, :]
    mode = config.scale_mode
    if mode == "stable":
        c = grad.shape[0] ** 0.25 / config.stable_gamma ** 0.5
        a0, b0 = (a0 if peft else a0 * c), b0 * c
    elif mode == "weight_svd" and peft:
        if s_b[0] > 0:
            b0 = b0 * (torch.linalg.matrix_norm(weight.float(), ord=2) / s_b[0])
    elif mode == "weight_svd":
        c = (torch.linalg.svdvals(weight.float())[:r] / config.scale).sqrt().mean()
        a0, b0 = a0 * c, b0 * c
    elif mode == "gd_scale":
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

    def initial_factors(self, view: LayerView, config: LoraGaConfig, generator, calibration):
        if calibration is None or not hasattr(calibration, "grad"):
            raise CalibrationError(f"lora_ga: module '{view.name}' got no gradient; adapt with "
                                   "rw.adapt(model, 'lora_ga', ..., calibration=batches, loss_fn=...).")
        return lora_ga_factors(calibration.grad, view.weight2d().detach(), config, generator)

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
