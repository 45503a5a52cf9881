"""Shared pieces of the SVD/LDU-based methods (``lora_xs``, ``svft``, ``svfit``, ``spectral``,
``sorsa``, ``salt``, ``loldu``, ``singlora``, ``lorma``).

* :func:`weight_svd` — the thin SVD ``W0 = U diag(S) Vᵀ`` of a layer's canonical ``(out, in)``
  matrix, optionally truncated to the top ``rank`` triplets, with a canonical sign per triplet.
* :func:`cayley` — an orthogonal ``r × r`` matrix from ``r(r-1)/2`` free parameters.

Frozen factors computed from ``W0`` are registered as *non-persistent* buffers by the methods:
they are a deterministic function of the base weight (LAPACK's SVD / LU on the same input,
same build and thread count gives the same bits), so ``rw.save`` stores only what is trained and
``rw.load`` recomputes the factors from the fresh base model. Sign canonicalization makes the
factors independent of LAPACK's sign choice; exactly repeated singular values (a rotation
ambiguity no convention can fix) are the one case where another LAPACK build could pick other
vectors. Cost: one thin SVD of ``W0`` per adapted layer at adapt/load time,
``O(out · in · min(out, in))`` — a fraction of a second per BERT-base-sized layer on one CPU
core (``torch.linalg.svd``; the top-``r`` methods could use a randomized SVD, not done here
because it would make the factors depend on a random sketch that ``rw.load`` cannot replay).
"""

from __future__ import annotations

import torch

from ..core.layers import LayerView
from ..linalg import compute_dtype


@torch.no_grad()
def weight_svd(view: LayerView, rank: int | None = None):
    """``(U, S, Vt)`` of ``W0 = U diag(S) Vt`` (thin SVD, descending ``S``), top ``rank`` only.

    ``U`` is ``(out, k)``, ``S`` ``(k,)``, ``Vt`` ``(k, in)`` with ``k = min(out, in)`` or ``rank``.
    Computed in float32 (float64 for float64 weights) on the weight's device and returned in
    ``view.param_dtype``.
    Signs are canonical: the largest-magnitude entry of every column of ``U`` is positive.
    """
    w = view.weight2d().detach()
    w = w.to(compute_dtype(w))
    u, s, vt = torch.linalg.svd(w, full_matrices=False)
    if rank is not None:
        u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    pick = u.abs().argmax(dim=0)
    sign = torch.sign(u[pick, torch.arange(u.shape[1], device=u.device)])
    sign[sign == 0] = 1
    u, vt = u * sign, vt * sign[:, None]
    dt = view.param_dtype
    return u.to(dt).contiguous(), s.to(dt).contiguous(), vt.to(dt).contiguous()


def num_skew(r: int) -> int:
    """Free parameters of an ``r × r`` skew-symmetric matrix."""
    return r * (r - 1) // 2


def cayley(free: torch.Tensor, r: int) -> torch.Tensor:
    """Orthogonal ``R = (I - Q)⁻¹ (I + Q)`` with skew ``Q`` built from ``free`` (its strict upper
    triangle, ``r(r-1)/2`` entries). ``free = 0`` gives exactly ``I``; ``det R = +1`` always.
    Solved in float32 for half-precision ``free`` (no half LU on CPU), returned in ``free``'s dtype."""
    dt = free.dtype
    if dt in (torch.float16, torch.bfloat16):
        free = free.float()
    eye = torch.eye(r, dtype=free.dtype, device=free.device)
    if r < 2:
        return (eye + 0 * free.sum()).to(dt)  # keeps ``free`` (empty) in the graph
    iu = torch.triu_indices(r, r, offset=1, device=free.device)
    upper = torch.zeros(r, r, dtype=free.dtype, device=free.device).index_put((iu[0], iu[1]), free)
    q = upper - upper.t()
    return torch.linalg.solve(eye - q, eye + q).to(dt)


def check_rank_fits(view: LayerView, rank: int | None, limit: int | None = None) -> int:
    """``rank`` clamped to ``limit`` (default ``min(out, in)``); ``None`` means the limit."""
    lim = min(view.out_features, view.in_features) if limit is None else limit
    return lim if rank is None else min(rank, lim)
