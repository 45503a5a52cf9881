"""Fast, exact-enough linear algebra for low-rank inits, projectors and analysis.

Every function takes a matrix or a batch ``(..., m, n)`` and works on the whole batch at once
(one LAPACK/cuSOLVER call per step), so many layers of the same shape are factored together;
:func:`batched_map` groups a list of matrices by shape and does exactly that, in chunks of
bounded memory. Each approximation states its error below; ``tests/test_linalg.py`` checks
every statement against ``torch.linalg.svd``.

=========================== ============================================= ==========================
function                    what                                          error
=========================== ============================================= ==========================
:func:`truncated_svd`       top (or bottom) ``k`` SVD triplets, exact     Eckart–Young optimal
:func:`randomized_svd`      Halko–Martinsson–Tropp subspace iteration     ``σ_{k+1}·(1+C)^{1/(2q+1)}``
:func:`nystrom_psd`         Nyström for PSD matrices (stable, shifted)    ``(1 + k/(p-1))·tail``
:func:`nystrom_svd`         generalized Nyström for any matrix            near-optimal, see doc
:func:`cur_nystrom`         ``W[:, J] W[I, J]⁺ W[I, :]`` from landmarks   exact if rank ≤ |I| = |J|
:class:`IncrementalSVD`     streamed SVD/PCA of rows, ``O(k·n)`` memory   Σ discarded tails
:class:`StreamingMoments`   streamed exact mean and second moment         exact (fp accumulation)
=========================== ============================================= ==========================

Helpers: :func:`svd_flip` (a deterministic sign per triplet), :func:`qr_positive` (the unique
QR with ``diag(R) ≥ 0``), :func:`lu` (``P L U``), :func:`damped_inverse` (inverse of a PSD matrix
with the smallest sufficient ridge).

Compute precision: factorizations run in float32 (float64 for float64 input); half-precision
inputs are upcast, since LAPACK has no half-precision SVD/QR.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "IncrementalSVD",
    "StreamingMoments",
    "batched_map",
    "cur_nystrom",
    "damped_inverse",
    "lu",
    "nystrom_psd",
    "nystrom_svd",
    "qr_positive",
    "randomized_svd",
    "svd_flip",
    "truncated_svd",
]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 input, float32 for everything else."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _f(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == compute_dtype(t) else t.to(compute_dtype(t))


# ---- signs, QR, LU ----------------------------------------------------------------------------
def svd_flip(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix the sign of each singular pair: the largest-magnitude entry of each column of ``u``
    becomes positive (``vh``'s row flips with it, so ``u diag(s) vh`` is unchanged)."""
    idx = u.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(u, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, vh * sign.transpose(-1, -2)


def qr_positive(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR ``a = Q R`` with ``diag(R) ≥ 0``: the unique QR of a full-column-rank matrix
    (LAPACK's Householder QR may return either sign per column)."""
    q, r = torch.linalg.qr(_f(a), mode="reduced")
    d = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return q * d.unsqueeze(-2), r * d.unsqueeze(-1)


def lu(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``a = P L U`` with partial pivoting (``P`` a permutation, ``L`` unit lower, ``U`` upper)."""
    return torch.linalg.lu(_f(a))


def damped_inverse(c: torch.Tensor, damp: float = 0.01, tol: float = 0.05, max_tries: int = 60):
    """Inverse of a (batch of) symmetric PSD matrix with the smallest sufficient ridge.

    ``C' = C + d · mean(diag C) · I`` starting from ``d = damp`` and doubling ``d`` (per matrix)
    until ``‖C' C'⁻¹ − I‖_F < tol`` — the scheme of CorDA's reference code. Returns
    ``(C', C'⁻¹, d)``; ``d`` has the batch shape. The ridge is relative to ``mean(diag C)``, so
    ``t·C`` gets the same ``d`` (exactly for powers of two, otherwise up to rounding at the threshold).
    """
    c = _f(c)
    n = c.shape[-1]
    eye = torch.eye(n, dtype=c.dtype, device=c.device)
    scale = torch.diagonal(c, dim1=-2, dim2=-1).mean(-1)
    d = torch.full(c.shape[:-2], float(damp), dtype=c.dtype, device=c.device)
    for _ in range(max_tries):
        fixed = c + (d * scale)[..., None, None] * eye
        inv = torch.linalg.inv(fixed)
        err = torch.linalg.matrix_norm(fixed @ inv - eye)
        bad = ~(err < tol)
        if not bool(bad.any()):
            return fixed, inv, d
        d = torch.where(bad, d * 2, d)
    raise ValueError(
        f"damped_inverse: a {n}x{n} covariance stays singular after {max_tries} doublings of the ridge "
        f"(last relative ridge {float(d.max()):.3g}); it has non-finite entries or is zero. "
        "Check the calibration inputs."
    )


# ---- truncated SVD ------------------------------------------------------------------------------
def truncated_svd(a: torch.Tensor, k: int, *, smallest: bool = False, flip: bool = True):
    """The ``k`` largest (or, with ``smallest``, the ``k`` smallest) singular triplets, exactly.

    Returns ``U (…, m, k)``, ``S (…, k)`` (descending), ``Vh (…, k, n)``, computed with one full
    thin SVD (``O(m n min(m, n))``). Error (Eckart–Young–Mirsky): for the top ``k``,
    ``‖A − U diag(S) Vh‖₂ = σ_{k+1}`` and ``‖·‖_F = (Σ_{j>k} σ_j²)^{1/2}`` — the best rank-``k``
    approximation — up to LAPACK's backward error ``O(ε‖A‖)``. For the smallest ``k``,
    ``A − U diag(S) Vh`` is exactly the top ``min(m, n) − k`` part.
    ``flip`` applies :func:`svd_flip`, making the result independent of LAPACK's sign choice.
    """
    u, s, vh = torch.linalg.svd(_f(a), full_matrices=False)
    if smallest:
        u, s, vh = u[..., -k:], s[..., -k:], vh[..., -k:, :]
    else:
        u, s, vh = u[..., :k], s[..., :k], vh[..., :k, :]
    if flip:
        u, vh = svd_flip(u, vh)
    return u, s, vh


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced")[0]


def gaussian(shape, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal test matrix with ``like``'s dtype and device, drawn from ``generator``
    (on the generator's device, so a CPU generator gives the same numbers for any ``like``)."""
    dev = generator.device if generator is not None else like.device
    return torch.randn(*shape, generator=generator, dtype=like.dtype, device=dev).to(like.device)


def randomized_svd(a: torch.Tensor, k: int, *, oversample: int = 8, niter: int = 2,
                   generator: torch.Generator | None = None, flip: bool = True):
    """Approximate top-``k`` SVD by randomized subspace iteration (Halko, Martinsson & Tropp,
    SIAM Review 2011, Alg. 4.4), batched over leading dimensions.

    With ``l = k + p`` (``p = oversample``) Gaussian test vectors ``Ω``: ``Q = orth(A Ω)``, then
    ``niter = q`` rounds of ``Q = orth(A orth(Aᵀ Q))`` (re-orthonormalized each half step), then
    the exact SVD of the small ``l × n`` matrix ``Qᵀ A``, truncated to ``k``.
    Cost ``O((2q + 2) · m n l)``; randomness only from ``generator``.

    Error: ``‖A − U diag(S) Vh‖₂ ≤ σ_{k+1} + ‖(I − QQᵀ)A‖₂`` and, for ``p ≥ 4``, with
    probability at least ``1 − 6 p^{−p}`` (Halko et al. eq. 1.9 with Prop. 8.6 for the power
    scheme)::

        ‖(I − QQᵀ)A‖₂ ≤ (1 + 11 √(k+p) · √min(m, n))^{1/(2q+1)} · σ_{k+1}

    so each power iteration shrinks the excess over the optimum ``σ_{k+1}`` geometrically. When
    ``l ≥ min(m, n)`` the result is exact.
    """
    a = _f(a)
    m, n = a.shape[-2:]
    lim = min(m, n)
    if not 0 < k <= lim:
        raise ValueError(f"randomized_svd: k={k} must be in [1, {lim}] for a {m}x{n} matrix.")
    if oversample < 0 or niter < 0:
        raise ValueError(f"randomized_svd: oversample={oversample} and niter={niter} must be ≥ 0.")
    sk = min(k + oversample, lim)
    if sk == lim:  # the sketch would span the whole range: the exact SVD is as cheap and exact
        return truncated_svd(a, k, flip=flip)
    omega = gaussian((*a.shape[:-2], n, sk), a, generator)
    at = a.transpose(-1, -2)
    q = _orth(a @ omega)
    for _ in range(niter):
        q = _orth(a @ _orth(at @ q))
    b = q.transpose(-1, -2) @ a
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q @ ub[..., :k]
    s, vh = s[..., :k], vh[..., :k, :]
    if flip:
        u, vh = svd_flip(u, vh)
    return u, s, vh


# ---- Nyström ------------------------------------------------------------------------------------
def nystrom_psd(a: torch.Tensor, k: int, *, oversample: int = 8, generator: torch.Generator | None = None):
    """Rank-``k`` eigen-approximation ``A ≈ U diag(λ) Uᵀ`` of a symmetric PSD matrix from one
    sketch ``Y = A Ω`` (Gaussian ``Ω``, ``l = k + p`` columns): the numerically stable, shifted
    Nyström method of Tropp, Yurtsever, Udell & Cevher (SIMAX 2017, Alg. 3).

    ``Â = Y (Ωᵀ Y)⁺ Yᵀ`` is formed through a Cholesky factor of ``Ωᵀ(Y + νΩ)`` with a tiny shift
    ``ν = √n · eps · ‖Y‖``; it satisfies ``0 ≼ Â ≼ A`` (up to the shift), and reading ``A`` once
    suffices (it works on a stream of ``Y`` updates). Error of the rank-``k`` truncation
    (Tropp et al. Thm. 4.1): ``E ‖A − [Â]_k‖_* ≤ (1 + k/(p − 1)) · Σ_{j>k} λ_j(A)`` (nuclear
    norm, ``p ≥ 2``); exact when ``rank A ≤ l`` or ``l ≥ n``.
    Returns ``U (…, n, k)`` with orthonormal columns and ``λ (…, k)`` descending, ``≥ 0``.
    """
    a = _f(a)
    n = a.shape[-1]
    if not 0 < k <= n:
        raise ValueError(f"nystrom_psd: k={k} must be in [1, {n}] for a {n}x{n} matrix.")
    sk = min(k + oversample, n)
    omega = _orth(gaussian((*a.shape[:-2], n, sk), a, generator))
    y = a @ omega
    nu = math.sqrt(n) * torch.finfo(a.dtype).eps * torch.linalg.matrix_norm(y, ord=2)
    y_nu = y + nu[..., None, None] * omega
    core = omega.transpose(-1, -2) @ y_nu
    core = (core + core.transpose(-1, -2)) / 2
    c, info = torch.linalg.cholesky_ex(core)
    if bool((info != 0).any()):  # numerically indefinite core: fall back to an eigen-solve
        w, v = torch.linalg.eigh(core)
        w = w.clamp_min(torch.finfo(a.dtype).tiny)
        b = y_nu @ (v * w.rsqrt().unsqueeze(-2))
    else:
        b = torch.linalg.solve_triangular(c, y_nu.transpose(-1, -2), upper=False).transpose(-1, -2)
    u, s, _ = torch.linalg.svd(b, full_matrices=False)
    lam = (s * s - nu[..., None]).clamp_min(0)
    return u[..., :k], lam[..., :k]


def nystrom_svd(a: torch.Tensor, k: int, *, oversample: int = 8, generator: torch.Generator | None = None,
                flip: bool = True):
    """Approximate top-``k`` SVD by the generalized Nyström method (Nakatsukasa 2020, "Fast and
    stable randomized low-rank matrix approximation"): ``Â = (A X)(Yᵀ A X)⁺(Yᵀ A)`` with Gaussian
    ``X (n × l)``, ``Y (m × l')``, ``l = k + p``, ``l' = ⌈1.5 l⌉``. One pass over ``A`` (two
    independent sketches, no power iteration), cost ``O(m n (l + l'))`` plus ``O((m+n) l²)``.

    The small core ``Yᵀ A X`` is inverted as an ε-pseudo-inverse (singular values below
    ``10 · l' · eps`` relative are dropped), and the rank-``l`` product is re-factored into ``U diag(S) Vh`` and truncated
    to ``k``. Error: with ``Q = orth(A X)``, ``‖A − Â‖ ≤ (1 + ‖(YᵀQ)⁺ Yᵀ‖₂) · ‖(I − QQᵀ)A‖``
    (Nakatsukasa Lemma 2.1; the factor is O(1) w.h.p. for ``l' ≥ 1.5 l``, and the second factor
    is the range-finder error bounded in :func:`randomized_svd` with ``q = 0``); truncating to
    rank ``k`` adds at most ``σ_{k+1} + ‖A − Â‖`` (Weyl), so
    ``‖A − U diag(S) Vh‖ ≤ σ_{k+1} + 2‖A − Â‖``. Exact when ``rank A ≤ l``.
    """
    a = _f(a)
    m, n = a.shape[-2:]
    lim = min(m, n)
    if not 0 < k <= lim:
        raise ValueError(f"nystrom_svd: k={k} must be in [1, {lim}] for a {m}x{n} matrix.")
    sk = min(k + oversample, lim)
    sk2 = min(math.ceil(1.5 * sk), m)
    x = gaussian((*a.shape[:-2], n, sk), a, generator)
    y = gaussian((*a.shape[:-2], m, sk2), a, generator)
    ax = a @ x  # m × l
    ya = y.transpose(-1, -2) @ a  # l' × n
    core = y.transpose(-1, -2) @ ax  # l' × l
    # ε-pseudo-inverse of the core (Nakatsukasa's stabilization): its numerically zero singular
    # values, which appear when rank A < l, are dropped
    uc, sc, vch = torch.linalg.svd(core, full_matrices=False)
    keep = sc > sc[..., :1] * (sk2 * torch.finfo(a.dtype).eps * 10)
    inv = torch.where(keep, 1.0 / torch.where(keep, sc, torch.ones_like(sc)), torch.zeros_like(sc))
    left = (ax @ vch.transpose(-1, -2)) * inv.unsqueeze(-2)  # m × l
    right = uc.transpose(-1, -2) @ ya  # l × n ; Â = left @ right
    q1, r1 = torch.linalg.qr(left, mode="reduced")
    q2, r2 = torch.linalg.qr(right.transpose(-1, -2), mode="reduced")
    us, s, vhs = torch.linalg.svd(r1 @ r2.transpose(-1, -2), full_matrices=False)
    u = q1 @ us[..., :k]
    vh = vhs[..., :k, :] @ q2.transpose(-1, -2)
    s = s[..., :k]
    if flip:
        u, vh = svd_flip(u, vh)
    return u, s, vh


def cur_nystrom(a: torch.Tensor, rows: Sequence[int] | torch.Tensor, cols: Sequence[int] | torch.Tensor,
                rcond: float | None = None):
    """Landmark Nyström / CUR factors of ``A``: ``C = A[:, J]``, ``N = A[I, J]⁺``, ``R = A[I, :]``
    with ``A ≈ C N R``. Exact when ``rank A = |I| = |J|`` and ``A[I, J]`` is invertible; in
    general ``‖A − CNR‖`` is bounded by the error of the best approximation from those rows and
    columns times ``‖A[I,J]⁺‖``-dependent factors (it can be large for an ill-conditioned
    intersection; ``rcond`` truncates its small singular values, default ``max(I,J)·eps``).
    """
    a = _f(a)
    rows = torch.as_tensor(rows, device=a.device)
    cols = torch.as_tensor(cols, device=a.device)
    c = a.index_select(-1, cols)
    r = a.index_select(-2, rows)
    w = r.index_select(-1, cols)
    kw = {} if rcond is None else {"rtol": rcond}
    return c, torch.linalg.pinv(w, **kw), r


# ---- streams -------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class StreamingMoments:
    """Exact running count, mean and (uncentered) second moment of a stream of rows.

    ``update(X)`` returns a new object (the old one is unchanged), so identical states can be
    shared and compared by identity. Memory ``O(n²)``; accumulation in float32 (float64 input:
    float64). ``second = Σ xᵢ xᵢᵀ / N``; :meth:`covariance` gives ``E[(x−μ)(x−μ)ᵀ]``.
    """

    n: int = 0
    sum: torch.Tensor | None = None
    gram: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> StreamingMoments:
        x = _f(x.reshape(-1, x.shape[-1]))
        if x.shape[0] == 0:
            return self
        s, g = x.sum(0), x.transpose(0, 1) @ x
        if self.n:
            s, g = self.sum + s, self.gram + g
        return StreamingMoments(self.n + x.shape[0], s, g)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    @property
    def second(self) -> torch.Tensor:
        return self.gram / self.n

    def covariance(self) -> torch.Tensor:
        mu = self.mean
        return self.second - torch.outer(mu, mu)


@dataclass(frozen=True, eq=False)
class IncrementalSVD:
    """Streamed truncated SVD of a tall matrix given as row blocks ``X₁, X₂, …`` (optionally
    centered: incremental PCA, Ross et al. 2008 / scikit-learn's ``IncrementalPCA``).

    The state is the rank-``q`` factorization ``S Vh`` (``q = k + oversample``) of all rows seen
    so far (centered at their running mean when ``center``). ``update(X)`` stacks
    ``[diag(S) Vh; X − mean_X; √(n b / (n+b)) (mean_old − mean_X)]`` — whose Gram matrix is exactly
    the scatter matrix of old and new rows together — takes its SVD and keeps ``q`` triplets.
    Memory ``O(q · n_features)``; rows are never stored. ``update`` returns a new object.

    Error: every truncation drops a PSD part of the Gram matrix of norm ``σ²_{q+1}`` of that
    step, so ``0 ≼ XcᵀXc − Vhᵀ S² Vh ≼ Σ_steps σ²_{q+1}(step) · I``: exact whenever
    ``q ≥ n_features`` or the data has rank ≤ ``q``; otherwise the leading ``k`` components are
    perturbed by at most that sum relative to the spectral gap (Davis–Kahan). ``total`` is
    exact (the sum of squared deviations), so :attr:`explained_variance_ratio` is relative to
    the true total variance.
    """

    k: int
    oversample: int = 0
    center: bool = True
    n: int = 0
    mean: torch.Tensor | None = None
    s: torch.Tensor | None = None
    vh: torch.Tensor | None = None
    total: float = 0.0  # Σ ‖x − mean‖² (or Σ ‖x‖² when not centered)

    def update(self, x: torch.Tensor) -> IncrementalSVD:
        x = _f(x.reshape(-1, x.shape[-1]))
        b = x.shape[0]
        if b == 0:
            return self
        parts, mean, total = [], None, self.total
        if self.center:
            mb = x.mean(0)
            xc = x - mb
            total += float((xc * xc).sum())
            if self.n:
                nn = self.n + b
                corr = math.sqrt(self.n * b / nn) * (self.mean - mb)
                mean = self.mean + (mb - self.mean) * (b / nn)
                total += float((corr * corr).sum())
                parts = [self.s[:, None] * self.vh, xc, corr[None]]
            else:
                mean, parts = mb, [xc]
        else:
            total += float((x * x).sum())
            parts = [x] if not self.n else [self.s[:, None] * self.vh, x]
        m = torch.cat(parts, 0)
        if m.shape[0] > m.shape[1]:  # tall: the R factor has the same singular values and Vh
            m = torch.linalg.qr(m, mode="r")[1]
        _, s, vh = torch.linalg.svd(m, full_matrices=False)
        q = self.k + self.oversample
        s, vh = s[:q], vh[:q]
        vh = svd_flip(vh.transpose(0, 1), vh)[0].transpose(0, 1)  # canonical sign per component
        return IncrementalSVD(self.k, self.oversample, self.center, self.n + b, mean, s, vh, total)

    @property
    def components(self) -> torch.Tensor:
        """The top ``k`` right singular vectors (principal axes), ``(k, n_features)``."""
        return self.vh[: self.k]

    @property
    def singular_values(self) -> torch.Tensor:
        return self.s[: self.k]

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        """``σᵢ² / total`` for the top ``k`` components."""
        sv = self.singular_values
        return sv * sv / self.total if self.total > 0 else torch.zeros_like(sv)


# ---- batching over layers ---------------------------------------------------------------------------
def batched_map(fn: Callable[[torch.Tensor], object], mats: Sequence[torch.Tensor], max_bytes: int = 1 << 28):
    """``[fn(m) for m in mats]`` computed on stacks of equal-shape (and dtype, device) matrices.

    ``fn`` gets a ``(b, m, n)`` stack and returns a tensor or a tuple of tensors with the batch in
    the first dimension; results are split back in the input order. Stacks hold at most
    ``max_bytes`` of input (at least one matrix), so peak memory stays bounded.
    """
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
    out: list[object] = [None] * len(mats)
    for (shape, dtype, _), idx in groups.items():
        per = max(1, int(max_bytes // max(1, math.prod(shape) * torch.empty((), dtype=dtype).element_size())))
        for start in range(0, len(idx), per):
            chunk = idx[start:start + per]
            res = fn(torch.stack([mats[i] for i in chunk]))
            for j, i in enumerate(chunk):
                out[i] = tuple(r[j] for r in res) if isinstance(res, tuple) else res[j]
    return out
