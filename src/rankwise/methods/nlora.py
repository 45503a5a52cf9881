"""NLoRA: Nyström-initiated low-rank adaptation (Guo, Chang & Wu, Findings of EMNLP 2025,
arXiv:2502.14482), with its StructuredLoRA (SLoRA) layout and IntermediateTune (IntTune).

SLoRA puts a small trainable ``r × r`` matrix ``N`` between LoRA's factors::

    ΔW = s · B N A,      A ∈ R^{r×in},  N ∈ R^{r×r},  B ∈ R^{out×r},   s = α / r

NLoRA initializes the three factors by the Nyström approximation of ``W0`` — no SVD of ``W0``::

    landmarks="first":    B₀ = W0[:, :r],  A₀ = W0[:r, :],  N₀ = W0[:r, :r]⁺ / s
    landmarks="gaussian": generalized Nyström with Gaussian sketches (Nakatsukasa 2020),
                          re-factored as B₀ = U (orthonormal), N₀ = diag(S) / s, A₀ = Vᵀ

so ``s · B₀ N₀ A₀ = W0[:, J] W0[I, J]⁺ W0[I, :]`` (the CUR/Nyström approximation from the first
``r`` rows and columns, exact when ``rank W0 ≤ r``), resp. the randomized Nyström approximation
with the error stated in :func:`rankwise.linalg.nystrom_svd`. For an unstructured weight the
first-``r`` CUR approximation can be far worse than zero (``W0[:r,:r]`` is ill-conditioned, so
``N₀`` is large); ``landmarks="gaussian"`` is the stable choice there.

As for PiSSA, the approximation moves from the frozen weight into the adapter: rankwise keeps
``W0`` untouched and the adapter holds ``A₀, N₀, B₀`` (``ΔW = s·(B N A − B₀ N₀ A₀)``, see
``_init_common.py``), so the model is the base model exactly at init. ``inttune=True`` trains
``N`` only (IntTune: ``r²`` parameters per layer; ``A, B`` stay at their init).

Deviations from the reference code (TracyGuo2001/NLoRA, ``nlora_init`` in its PEFT fork), kept
on purpose:

* its ``N₀`` is ``W0[:r, :r]`` itself (the ``pinv`` is commented out); ``core="submatrix"`` uses
  that core, the default ``core="pinv"`` the pseudo-inverse, which is what makes ``B₀N₀A₀`` the
  Nyström approximation of ``W0`` the paper describes;
* it does **not** subtract anything from ``W0``: its forward is ``W0 x + s·B N A x``, so its model
  at init is ``W0 + s·W0[:, :r] W0[:r, :r] W0[:r, :]``, not ``W0``. rankwise subtracts
  ``s·B₀N₀A₀`` (residual form: the base model at init, like every other init here), and divides
  ``N₀`` by ``s`` so that ``s·B₀N₀A₀`` is the approximation itself. So ``core="submatrix"``
  reproduces the reference's *factors* (exactly at ``s = 1``, ``alpha = rank``, the default), not
  its *model*: for the same factors the two weights differ by the constant ``s·B₀N₀A₀``, at init
  and after (so training starts from, and follows, a different point).

Parameters per layer: ``r·(in + out) + r²`` (``r²`` with IntTune). PEFT has no NLoRA;
``export_peft`` writes the equivalent rank-``2r`` LoRA (``[NA; N₀A₀]``, ``[B, −B₀]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.registry import register
from ..linalg import cur_nystrom, nystrom_svd
from ._init_common import ResidualLowRank, no_data


@dataclass
class NloraConfig(RankAlphaConfig):
    """landmarks: 'first' (first r rows/columns, the paper's code) | 'gaussian' (random sketches);
    core: 'pinv' (Nyström) | 'submatrix' (the reference code's N₀ = W0[:r,:r]);
    oversample: extra sketch columns for 'gaussian'; inttune: train N only."""

    landmarks: str = "first"
    core: str = "pinv"
    oversample: int = 8
    inttune: bool = False

    def __post_init__(self):
        super().__post_init__()
        self._check(self.landmarks in ("first", "gaussian"), "landmarks", "use 'first' or 'gaussian'.")
        self._check(self.core in ("pinv", "submatrix"), "core", "use 'pinv' or 'submatrix'.")
        self._check(self.core == "pinv" or self.landmarks == "first", "core",
                    "core='submatrix' is defined for landmarks='first' only.")
        self._check_int("oversample", 0)
        self._check(isinstance(self.inttune, bool), "inttune", "use True or False.")


@register("nlora")
class Nlora(ResidualLowRank):
    """``ΔW = s·(B N A − B₀ N₀ A₀)`` from the Nyström approximation of ``W0`` (see module docstring)."""

    Config = NloraConfig
    summary = "SLoRA layout B·N·A initialized by the Nyström approximation of W0 (Guo et al. 2025); IntTune"

    @property
    def deterministic_init(self) -> bool:  # only the Gaussian sketches depend on the seed
        return self.config.landmarks == "first"

    def __init__(self, view: LayerView, config: NloraConfig, generator=None, calibration=None):
        super().__init__(view, config, generator, calibration)
        n0 = torch.zeros(config.rank, config.rank) if no_data(view, calibration) else self.__dict__.pop("_n0")
        n0 = n0.detach().to(**view.factory_kwargs).contiguous()
        self.lora_N = nn.Parameter(n0.clone())
        self.register_buffer("init_N", n0)
        if config.inttune:
            self.lora_A.requires_grad_(False)
            self.lora_B.requires_grad_(False)

    def initial_factors(self, view, config: NloraConfig, generator, calibration):
        """``(A₀, B₀)``; ``N₀`` is left in ``self._n0`` for ``__init__``."""
        r, w = config.rank, view.weight2d().detach()
        if config.landmarks == "first":
            idx = torch.arange(r)
            b0, n0, a0 = cur_nystrom(w, idx, idx)
            if config.core == "submatrix":
                n0 = w[:r, :r].float()
        else:
            b0, s, a0 = nystrom_svd(w, r, oversample=config.oversample, generator=generator)
            n0 = torch.diag(s)
        self._n0 = n0 / config.scale
        return a0, b0
    def trained(self):
        return self.lora_A, self.lora_B @ self.lora_N

    def frozen(self):
        return self.init_A, self.init_B @ self.init_N

    def b_diff(self) -> torch.Tensor:
        # B N − B₀ N₀ = (B − B₀) N + B₀ (N − N₀): exactly zero at init
        return (self.lora_B - self.init_B) @ self.lora_N + self.init_B @ (self.lora_N - self.init_N)

    @classmethod
    def num_params(cls, view: LayerView, config: NloraConfig) -> int:
        core = config.rank * config.rank
        return core if config.inttune else core + config.rank * (view.in_features + view.out_features)
