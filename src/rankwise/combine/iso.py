"""Isotropic merging: Iso-C and Iso-CTS (Marczak et al. 2025, "No Task Left Behind: Isotropic Model
Merging with Common and Task-Specific Subspaces", arXiv:2502.04959; reference code
github.com/danielm1405/iso-merging).

**Iso-C** (isotropic merging in the common subspace). With the task-arithmetic sum
``Δ_TA = Σ_t w_t ΔW_t = U Σ Vᵀ``, replace the spectrum by its mean::

    Δ_Iso-C = σ̄ · U_r V_rᵀ,        σ̄ = (1/r) Σ_{i≤r} σ_i

**Iso-CTS** (common and task-specific subspaces), with a common fraction ``f`` (default 0.8):

1. ``k = ⌊f r⌋``, then ``k`` is moved so that ``r − k`` splits evenly over the ``T`` tasks:
   ``s = round((r − k) / T)``, ``k = r − T s``; keep ``U_k, Σ_k, V_k`` of ``Δ_TA``.
2. For each task, the part outside the common subspace ``Δ̂_t = (I − U_k U_kᵀ) w_t ΔW_t`` and its top
   ``s`` singular triplets ``(U_t, Σ_t, V_t)``.
3. Stack ``U = [U_1 … U_T U_k]``, ``V = [V_1 … V_T V_k]`` and orthonormalize each by its polar factor
   (``X = P S Qᵀ → P Qᵀ``, the nearest orthonormal matrix, as the reference code does).
4. ``Δ_Iso-CTS = σ̄ · U Vᵀ`` with ``σ̄`` the mean of all kept singular values ``[Σ_1 … Σ_T Σ_k]``.

The paper scales the result by one ``α`` chosen on validation data; both merges are homogeneous
(``iso(αΔ) = α iso(Δ)`` for ``α > 0``), so equal weights ``w_t = α`` give exactly ``α · Δ_Iso``.

**Deviation for low-rank updates.** The paper works with full fine-tuning, where ``r = min(out, in)``.
A sum of LoRA updates has rank ``R ≤ Σ r_t``; the reference code would average ``min(out, in) − R``
zero singular values into ``σ̄`` and spread ``σ̄`` over arbitrary null-space directions. Here ``r`` is
the numerical rank of ``Δ_TA`` (singular values above ``σ_max · max(out, in) · ε``) — equal to
``min(out, in)`` for a full-rank update, so the paper's case is unchanged. All SVDs are taken from the
factors (QR + SVD of a small core, ``engine.svd_of_product``); nothing ``out × in`` is formed.
"""

from __future__ import annotations

import numbers

import torch

from ..errors import ConfigError
from .engine import Factors, LayerInputs, numerical_rank, svd_of_product
from .linear import weighted_cat


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor ``P Qᵀ`` of ``x = P S Qᵀ``."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def iso_c(inp: LayerInputs, opts: dict, generator=None) -> Factors:
    f = weighted_cat(inp)
    u, s, vh = svd_of_product(f.B, f.A)
    r = numerical_rank(s, inp.shape)
    if r == 0:
        return Factors(f.B[:, :0], f.A[:0])
    return Factors(u[:, :r] * s[:r].mean(), vh[:r])


def split_sizes(r: int, tasks: int, fraction: float) -> tuple[int, int]:
    """``(k, s)``: common-subspace size and directions per task, as the reference code computes them."""
    k = int(r * fraction)
    total = min(round((r - k) / tasks) * tasks, (r // tasks) * tasks)
    return r - total, total // tasks


def iso_cts(inp: LayerInputs, opts: dict, generator=None) -> Factors:
    f = weighted_cat(inp)
    u, s, vh = svd_of_product(f.B, f.A)
    r = numerical_rank(s, inp.shape)
    if r == 0:
        return Factors(f.B[:, :0], f.A[:0])
    k, per = split_sizes(r, len(inp.factors), opts["common_space_fraction"])
    uk, sk, vk = u[:, :k], s[:k], vh[:k]
    us, ss, vs = [], [], []
    if per > 0:
        for w, t in zip(inp.weights, inp.factors):
            b = w * t.B
            b = b - uk @ (uk.t() @ b)  # (I − U_k U_kᵀ) w_t B_t, so Δ̂_t = b A_t
            ut, st, vt = svd_of_product(b, t.A)
            us.append(ut[:, :per])
            ss.append(st[:per])
            vs.append(vt[:per])
    U = polar(torch.cat([*us, uk], dim=1))
    V = polar(torch.cat([*vs, vk], dim=0).t()).t()
    sigma = torch.cat([*ss, sk]).mean()
    return Factors(U * sigma, V)


def check_options(method: str, opts: dict) -> None:
    if "common_space_fraction" in opts:
        v = opts["common_space_fraction"]
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 1:
            raise ConfigError(f"common_space_fraction={v!r}: give the share of the rank kept for the common "
                              "subspace, a number in [0, 1] (the paper uses 0.8).")


METHODS = {
    "iso_c": (iso_c, {}, "Iso-C: flatten the spectrum of Σ w_t ΔW_t to its mean (Marczak et al. 2025)"),
    "iso_cts": (iso_cts, {"common_space_fraction": 0.8},
                "Iso-CTS: common subspace + task-specific directions, isotropic spectrum (Marczak et al. 2025)"),
}
