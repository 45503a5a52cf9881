"""KnOTS (Stoica et al. 2025, "Model merging with SVD to tie the KnOTS", arXiv:2410.19735; reference code
github.com/gstoica27/KnOTS).

LoRA updates of different tasks live in unaligned subspaces, so merging them entry by entry (TIES,
DARE) mixes unrelated coordinates. KnOTS first puts all tasks in one basis. Per module, concatenate the
updates side by side and take one SVD::

    [ΔW_1 | … | ΔW_T] = U Σ [V_1ᵀ | … | V_Tᵀ],     so  ΔW_t = U (Σ V_tᵀ)

``U`` (out × k) is shared; each task is now the ``k × in`` matrix ``Σ V_tᵀ`` (``s_on_V`` in the reference).
These are merged by an element-wise method — TIES (default), DARE-TIES, DARE-linear, magnitude pruning
or linear (``ties.merge_tensors``; option ``merge``) — with the task weights and ``density``, and the result
is ``ΔW = U · merged``: a LoRA of rank ``k ≤ Σ r_t`` with ``B = U``, ``A = merged``.

In factor space: ``[B_1 A_1 | … ] = [B_1 … B_T] · blockdiag(A_1, …, A_T)``; with ``[B_1 … B_T] = Q R`` and
``A_tᵀ = Q_t R_t`` the SVD comes from the small core ``R · blockdiag(R_tᵀ)``, and
``V_tᵀ = V_cᵀ[:, block t] Q_tᵀ`` — nothing ``out × T·in`` is formed.

Deviations from the reference code: (1) TIES / DARE run per module (as PEFT's merges), where the
reference trims the top-k of each task's vector over the whole model at once; (2) the support of the
SVD keeps singular values above ``σ_max · max(out, T·in) · ε`` instead of an absolute ``1e-5``;
(3) each task's weight multiplies its aligned update before the merge (the reference multiplies every
task by the first weight).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .engine import Factors, LayerInputs, numerical_rank
from .ties import KERNELS, merge_tensors


def aligned(inp: LayerInputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(U, [Σ V_1ᵀ, …, Σ V_Tᵀ])`` of the joint SVD of ``[ΔW_1 | … | ΔW_T]``, from the factors."""
    qb, rb = torch.linalg.qr(torch.cat([f.B for f in inp.factors], dim=1), mode="reduced")
    qas, ras = zip(*(torch.linalg.qr(f.A.t(), mode="reduced") for f in inp.factors))
    core = rb @ torch.block_diag(*[ra.t() for ra in ras])
    uc, s, vch = torch.linalg.svd(core, full_matrices=False)
    k = numerical_rank(s, (inp.shape[0], inp.shape[1] * len(inp.factors)))
    u, s, vch = qb @ uc[:, :k], s[:k], vch[:k]
    sv, start = [], 0
    for qa in qas:
        width = qa.shape[1]
        sv.append(s[:, None] * (vch[:, start:start + width] @ qa.t()))
        start += width
    return u, sv


def knots(inp: LayerInputs, opts: dict, generator=None) -> Factors:
    u, sv = aligned(inp)
    merged = merge_tensors(sv, inp.weights, opts["merge"], opts["density"], opts["majority_sign_method"],
                           generator)
    return Factors(u, merged)


def check_options(method: str, opts: dict) -> None:
    if method == "knots" and opts.get("merge") not in KERNELS:
        raise ConfigError(f"knots merge={opts.get('merge')!r}: use one of {KERNELS} (the merge applied to the "
                          "aligned task updates).")


METHODS = {
    "knots": (knots, {"merge": "ties", "density": 1.0, "majority_sign_method": "total"},
              "KnOTS: joint SVD of the updates, then TIES/DARE in the shared basis (Stoica et al. 2025)"),
}
