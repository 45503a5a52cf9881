"""Task arithmetic, concatenation and SVD re-factoring: the exact combinations, in factor space.

Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089)::

    ΔW = Σ_t w_t ΔW_t = Σ_t w_t B_t A_t = [w_1 B_1 | … | w_T B_T] · [A_1; …; A_T]

so the weighted sum of LoRA updates *is* a LoRA of rank ``Σ r_t`` — concatenation is exact for any
mix of ranks, and nothing ``out × in`` is formed.

* ``linear`` — task arithmetic, exact (the concatenation above); ``rank=`` truncates it by SVD.
* ``cat`` — the same concatenation under PEFT's name (PEFT puts ``w_t s_t`` on ``A_t``, rankwise on
  ``B_t``; the product is the same). Always exact; there is no ``rank=``.
* ``svd`` — the weighted sum re-factored at ``rank`` (default: the largest input rank, PEFT's default
  ``svd_rank``) by a truncated SVD, the best rank-``rank`` approximation (Eckart–Young). The SVD of the
  product is taken from the factors (QR of both, SVD of the small core), so it costs ``O((m+n)·R²)`` for
  ``R = Σ r_t`` instead of PEFT's dense ``O(m n min(m, n))``; at ``rank ≥ R`` it is exact.
* ``peft_linear`` — PEFT's ``linear``: ``A = Σ √|w_t s_t| sgn(w_t s_t) A_t``, ``B = Σ √|w_t s_t| B_t``. The
  product of these sums is *not* ``Σ w_t ΔW_t`` (cross terms ``B_i A_j``); PEFT's docs call it a rough
  approximation. Offered under its own name for compatibility; all inputs need the same rank.
"""

from __future__ import annotations

import torch

from .engine import Factors, LayerInputs, refactor
from .ties import factorwise_merge


def weighted_cat(inp: LayerInputs, weights=None) -> Factors:
    """``[w_1 B_1 | …] · [A_1; …]`` = ``Σ w_t ΔW_t`` exactly."""
    weights = inp.weights if weights is None else weights
    return Factors(torch.cat([w * f.B for w, f in zip(weights, inp.factors)], dim=1),
                   torch.cat([f.A for f in inp.factors], dim=0))


def linear(inp: LayerInputs, opts: dict, generator=None) -> Factors:
    f = weighted_cat(inp)
    return f if opts.get("rank") is None else refactor(f.B, f.A, opts["rank"], inp.shape)


def cat(inp: LayerInputs, opts: dict, generator=None) -> Factors:
    return weighted_cat(inp)


def svd(inp: LayerInputs, opts: dict, generator=None) -> Factors:
    f = weighted_cat(inp)
    rank = opts.get("rank") or opts["max_rank"]
    return refactor(f.B, f.A, rank, inp.shape)


METHODS = {
    "linear": (linear, {"rank": None}, "task arithmetic Σ w_t ΔW_t, exact (concatenated factors); rank= truncates"),
    "cat": (cat, {}, "concatenate the weighted factors: exact, rank Σ r_t (PEFT's cat)"),
    "svd": (svd, {"rank": None}, "Σ w_t ΔW_t re-factored by truncated SVD at rank (PEFT's svd)"),
    "peft_linear": (factorwise_merge("linear"), {}, "PEFT's 'linear': weighted sums of A and of B separately"),
}
