"""Per-matrix spectral measures, batched over a model's layers.

For a matrix ``A (m × n)`` with singular values ``σ_1 ≥ … ≥ σ_p`` (``p = min(m, n)``):

* effective rank (Roy & Vetterli, 2007): ``exp(H(p))`` with ``p_i = σ_i / Σ_j σ_j`` and
  ``H(p) = -Σ p_i log p_i``. ``k`` equal non-zero singular values give exactly ``k``;
* stable rank: ``‖A‖_F² / ‖A‖_2² = Σ σ_i² / σ_1²`` (1 for a rank-1 matrix, ≤ rank);
* numerical rank at a tolerance: ``#{i : σ_i > tol}``, by default
  ``tol = σ_1 · max(m, n) · ε_float32`` (the ``numpy.linalg.matrix_rank`` rule);
* energy captured at rank ``r``: ``Σ_{i≤r} σ_i² / ‖A‖_F²``, and its inverse, the smallest rank
  that captures a fraction of the energy;
* nuclear ``Σ σ_i``, spectral ``σ_1`` and Frobenius ``(Σ σ_i²)^½`` norms.

Speed. Matrices of one shape are stacked and decomposed in one ``torch.linalg`` call; wide
matrices are transposed first (same singular values; LAPACK's SVD of a wide matrix is many
times slower on CPU). ``method="randomized"`` uses :func:`rankwise.linalg.randomized_svd` (Halko,
Martinsson & Tropp 2011, Alg. 4.4: seeded, ``q + 8`` test vectors, ``niter`` power iterations) for
the top ``q`` values.

Stated error of the randomized path. The values ``σ̂_i`` it returns are the singular values of
``QᵀA`` for an orthonormal ``Q``, so ``σ̂_i ≤ σ_i`` for every ``i`` (interlacing). ``‖A‖_F²`` is
always computed exactly from the entries, and :attr:`Spectrum.tail` ``= ‖A‖_F² - Σ σ̂_i²`` is
an upper bound on the energy the returned values miss (``≥ Σ_{i>q} σ_i²``). So: the spectral
norm is bracketed by ``σ̂_1 ≤ σ_1 ≤ (σ̂_1² + tail)^½``; stable rank from ``σ̂_1`` is an upper
bound; energy at rank ``r`` is a lower bound off by at most ``tail / ‖A‖_F²``. ``method="auto"``
accepts the randomized result only when ``tail / ‖A‖_F² ≤ rtol`` (the matrix is low-rank to
that accuracy, as every adapter update is) and otherwise recomputes that matrix exactly.

Threads. The decompositions run on :data:`LINALG_THREADS` intra-op threads (default None: torch's
own setting; set it to 1 on a machine shared with other busy processes). Measured
on 2 shared cores (MKL 2024.2): the thin SVD of 25 stacked 384×384 matrices takes 0.5–0.75 s on
one thread but 4–26 s on two while other processes load the cores (OpenMP threads wait on each
other), and 0.35 s on two idle cores: one thread is the robust choice under contention, torch's
default the faster one on idle cores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..linalg import randomized_svd

METHODS = ("full", "randomized", "auto")
EPS32 = torch.finfo(torch.float32).eps
# intra-op threads for the SVDs; None leaves torch's setting. (On an oversubscribed machine —
# more busy processes than cores — 1 thread was 5-40x faster for MiniLM's sizes; set it to 1 there.)
LINALG_THREADS: int | None = None


@contextlib.contextmanager
def linalg_threads(n: int | None = None):
    """Run the block on ``n`` (default :data:`LINALG_THREADS`) intra-op threads, then restore."""
    old = torch.get_num_threads()
    n = LINALG_THREADS if n is None else n
    if n and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


@dataclass
class Spectrum:
    """Singular values of one matrix (descending) with its exact squared Frobenius norm.

    ``exact`` is False when ``s`` holds only the top values of a randomized decomposition;
    then :attr:`tail` bounds what is missing (see the module docstring).
    """

    s: torch.Tensor
    fro2: float
    shape: tuple[int, int]
    exact: bool = True

    @property
    def tail(self) -> float:
        return 0.0 if self.exact else max(0.0, self.fro2 - float((self.s.double() ** 2).sum()))


# ---- measures on singular values (any leading batch dims) ---------------------------------------
def _fro2(s: torch.Tensor, fro2) -> torch.Tensor:
    if fro2 is None:
        return (s.double() ** 2).sum(-1)
    return torch.as_tensor(fro2, dtype=torch.float64)


def effective_rank(s: torch.Tensor) -> torch.Tensor:
    """``exp`` of the entropy of ``σ / Σσ`` (0 for the zero matrix)."""
    s = s.double().clamp_min(0)
    tot = s.sum(-1, keepdim=True)
    p = s / tot.clamp_min(torch.finfo(torch.float64).tiny)
    h = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)
    return torch.where(tot.squeeze(-1) > 0, h.exp(), torch.zeros_like(h))


def stable_rank(s: torch.Tensor, fro2=None) -> torch.Tensor:
    """``‖A‖_F² / σ_1²`` (0 for the zero matrix). Pass the exact ``fro2`` for truncated spectra."""
    s1 = s.double()[..., 0] ** 2
    f = _fro2(s, fro2)
    return torch.where(s1 > 0, f / s1.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(s1))


def default_tol(s: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return s.double()[..., 0] * max(shape) * EPS32


def numerical_rank(s: torch.Tensor, tol=None, shape: tuple[int, int] | None = None,
                   rtol: float | None = None) -> torch.Tensor:
    """Number of singular values above ``tol`` (absolute) or ``rtol · σ_1``; default: the
    ``numpy.linalg.matrix_rank`` rule ``σ_1 · max(m, n) · ε_float32``."""
    s = s.double()
    if tol is not None:
        t = torch.as_tensor(tol, dtype=torch.float64)
    elif rtol is not None:
        t = s[..., 0] * rtol
    else:
        if shape is None:
            raise ConfigError("numerical_rank: pass tol=, rtol= or the matrix shape= for the default tolerance.")
        t = default_tol(s, shape)
    return (s > t.unsqueeze(-1) if t.dim() else s > t).sum(-1)


def energy_at_rank(s: torch.Tensor, r: int, fro2=None) -> torch.Tensor:
    """Fraction ``Σ_{i≤r} σ_i² / ‖A‖_F²`` of the energy in the top ``r`` directions (1 for zero A)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ConfigError(f"energy_at_rank: r={r!r} must be a non-negative int.")
    s2 = s.double() ** 2
    f = _fro2(s, fro2)
    top = s2[..., :r].sum(-1)
    return torch.where(f > 0, top / f.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(top))


def rank_at_energy(s: torch.Tensor, frac: float = 0.9, fro2=None) -> torch.Tensor:
    """Smallest ``r`` with ``energy_at_rank(s, r) ≥ frac`` (0 for the zero matrix)."""
    if not 0 < frac <= 1:
        raise ConfigError(f"rank_at_energy: frac={frac!r} must be in (0, 1].")
    s2 = s.double() ** 2
    f = _fro2(s, fro2)
    cum = s2.cumsum(-1)
    need = f.unsqueeze(-1) * frac * (1 - 1e-12)
    r = (cum < need).sum(-1) + 1
    return torch.where(f > 0, r.clamp_max(s.shape[-1]), torch.zeros_like(r))


def norms(s: torch.Tensor, fro2=None) -> dict[str, torch.Tensor]:
    """Nuclear, spectral and Frobenius norms from the singular values."""
    s = s.double()
    return {"nuclear": s.sum(-1), "spectral": s[..., 0], "frobenius": _fro2(s, fro2).sqrt()}


# ---- batched decompositions ---------------------------------------------------------------------
def _as_dict(mats) -> dict[str, torch.Tensor]:
    if isinstance(mats, nn.Module):
        return layer_weights(mats)
    if isinstance(mats, torch.Tensor):
        if mats.dim() == 2:
            return {"0": mats}
        return {str(i): m for i, m in enumerate(mats)}
    if isinstance(mats, Mapping):
        return dict(mats)
    return {str(i): m for i, m in enumerate(mats)}


def _check(name: str, a: torch.Tensor) -> None:
    if not isinstance(a, torch.Tensor) or a.dim() != 2:
        raise ConfigError(f"matrix '{name}' has shape {tuple(getattr(a, 'shape', ()))}; the spectral "
                          "measures take 2-D matrices (reshape convolutions to (out, in·k) first).")
    if a.numel() == 0:
        raise ConfigError(f"matrix '{name}' is empty {tuple(a.shape)}; nothing to decompose.")
    if not torch.isfinite(a).all():
        raise ConfigError(f"matrix '{name}' {tuple(a.shape)} holds NaN or inf; the SVD is undefined.")


def group_by_shape(mats: Mapping[str, torch.Tensor]) -> dict[tuple[int, int], list[str]]:
    groups: dict[tuple[int, int], list[str]] = {}
    for name, a in mats.items():
        groups.setdefault(tuple(a.shape), []).append(name)
    return groups


def _stack(mats, names, dtype):
    return torch.stack([mats[n].detach().to(dtype) for n in names])


def svd(mats, k: int | None = None, method: str = "full", q: int = 32, niter: int = 4,
        rtol: float = 1e-5, seed: int = 0, dtype=torch.float32):
    """Thin SVD of each matrix, batched by shape: ``{name: (U, S, Vh)}`` plus a dict of
    :class:`Spectrum` (``{name: Spectrum}``) holding the exact Frobenius norms.

    ``k``: keep only the top ``k`` singular triplets of the result (``None``: all computed).
    ``method``: ``"full"`` (LAPACK), ``"randomized"`` (top ``q``, error stated in
    :class:`Spectrum`) or ``"auto"`` (randomized, exact recompute where ``tail/‖A‖_F² > rtol``).
    """
    if method not in METHODS:
        raise ConfigError(f"svd method={method!r}; choose one of {METHODS}.")
    if isinstance(q, bool) or not isinstance(q, int) or q < 1:
        raise ConfigError(f"svd q={q!r} must be a positive int (number of randomized singular values).")
    mats = _as_dict(mats)
    for name, a in mats.items():
        _check(name, a)
    with linalg_threads():
        return _svd(mats, k, method, q, niter, rtol, seed, dtype)


def _svd(mats, k, method, q, niter, rtol, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    out: dict[str, tuple] = {}
    spec: dict[str, Spectrum] = {}
    for shape, names in group_by_shape(mats).items():
        a = _stack(mats, names, dtype)
        wide = shape[0] < shape[1]
        if wide:
            a = a.mT  # same singular values; LAPACK is much faster on tall matrices
        fro2 = torch.linalg.matrix_norm(a).double() ** 2
        if method == "full" or q >= min(shape):
            u, s, vh = torch.linalg.svd(a, full_matrices=False)
            exact = [True] * len(names)
        else:
            u, s, vh = randomized_svd(a, q, niter=niter, generator=g, flip=False)
            u, s, vh = list(u), list(s), list(vh)
            exact = [False] * len(names)
            if method == "auto":
                miss = ((fro2 - (torch.stack(s).double() ** 2).sum(-1)).clamp_min(0) > rtol * fro2).nonzero()
                if len(miss):
                    idx = miss.flatten()
                    uf, sf, vhf = torch.linalg.svd(a[idx], full_matrices=False)
                    for j, i in enumerate(idx.tolist()):
                        u[i], s[i], vh[i], exact[i] = uf[j], sf[j], vhf[j], True
        for i, n in enumerate(names):
            ui, si, vhi = (u[i], s[i], vh[i]) if not wide else (vh[i].mT, s[i], u[i].mT)
            full = exact[i] and (k is None or k >= len(si))
            if k is not None:
                ui, si, vhi = ui[:, :k], si[:k], vhi[:k]
            out[n] = (ui, si, vhi)
            spec[n] = Spectrum(si, float(fro2[i]), shape, full)
    return out, spec


def singular_values(mats, method: str = "full", q: int = 32, niter: int = 4, rtol: float = 1e-5, seed: int = 0,
            dtype=torch.float32) -> dict[str, Spectrum]:
    """Singular values of each matrix, batched by shape (``svdvals`` for ``method="full"``)."""
    if method not in METHODS:
        raise ConfigError(f"singular_values method={method!r}; choose one of {METHODS}.")
    mats = _as_dict(mats)
    for name, a in mats.items():
        _check(name, a)
    if method != "full":
        return svd(mats, method=method, q=q, niter=niter, rtol=rtol, seed=seed, dtype=dtype)[1]
    res = {}
    for shape, names in group_by_shape(mats).items():
        a = _stack(mats, names, dtype)
        if shape[0] < shape[1]:
            a = a.mT
        with linalg_threads():
            s = torch.linalg.svdvals(a)
        fro2 = torch.linalg.matrix_norm(a).double() ** 2
        for i, n in enumerate(names):
            res[n] = Spectrum(s[i], float(fro2[i]), shape, True)
    return res


def measures(spec: Spectrum, r: int = 8, energy: float = 0.9, tol=None) -> dict[str, float]:
    """Every scalar measure of one spectrum (see the module docstring)."""
    s, f = spec.s, spec.fro2
    nrm = norms(s, f)
    out = {
        "effective_rank": float(effective_rank(s)),
        "stable_rank": float(stable_rank(s, f)),
        "numerical_rank": int(numerical_rank(s, tol=tol, shape=spec.shape)),
        f"energy@{r}": float(energy_at_rank(s, r, f)),
        f"rank@{energy:g}": int(rank_at_energy(s, energy, f)),
        "nuclear": float(nrm["nuclear"]),
        "spectral": float(nrm["spectral"]),
        "frobenius": float(nrm["frobenius"]),
    }
    if not spec.exact:
        out["tail_energy"] = spec.tail / f if f > 0 else 0.0
    return out


def matrix_measures(mats, r: int = 8, energy: float = 0.9, method: str = "full", q: int = 32,
                    niter: int = 4, tol=None, seed: int = 0) -> dict[str, dict[str, float]]:
    """``{name: {measure: value}}`` for a dict/list of matrices or every weight matrix of a model
    (linear, HF Conv1D and convolutions, seen as ``(out, in)``; embeddings left out)."""
    spec = singular_values(mats, method=method, q=q, niter=niter, seed=seed)
    return {n: measures(sp, r=r, energy=energy, tol=tol) for n, sp in spec.items()}


def layer_weights(model: nn.Module, kinds: Iterable[str] = ("linear", "hf_conv1d", "conv1d", "conv2d"),
                  ) -> dict[str, torch.Tensor]:
    """The canonical ``(out, in)`` weight of every layer of ``kinds`` in ``model`` (effective
    weights: an adapted layer counts with its active adapters)."""
    from .updates import effective_weight, layer_modules

    return {n: effective_weight(m) for n, m in layer_modules(model, kinds).items()}

