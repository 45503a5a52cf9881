"""rankwise.linalg against torch.linalg: every stated error bound is checked on seeded matrices."""

from __future__ import annotations

import math

import pytest
import torch

from rankwise import linalg as L

pytestmark = pytest.mark.usefixtures("single_thread")


def _spectrum_matrix(m, n, s, seed=0, dtype=torch.float64):
    """``U diag(s) Vᵀ`` with Haar-random orthonormal ``U, V`` and the given singular values."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=dtype))[0]
    v = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=dtype))[0]
    return (u * torch.as_tensor(s, dtype=dtype)) @ v.T


def _svals(a):
    return torch.linalg.svdvals(a.double())


def _norm2(a):
    return torch.linalg.matrix_norm(a.double(), ord=2).item()


# ---- exact truncated SVD ---------------------------------------------------------------------
@pytest.mark.parametrize("smallest", [False, True])
def test_truncated_svd_is_eckart_young_optimal(smallest):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 9, 6, generator=g, dtype=torch.float64)  # a batch of three matrices
    k = 2
    u, s, vh = L.truncated_svd(a, k, smallest=smallest)
    assert u.shape == (3, 9, k) and s.shape == (3, k) and vh.shape == (3, k, 6)
    for i in range(3):
        sv = _svals(a[i])
        ref = sv[-k:] if smallest else sv[:k]
        torch.testing.assert_close(s[i], ref)
        rest = a[i] - (u[i] * s[i]) @ vh[i]
        # Eckart–Young: the top-k residual has spectral norm σ_{k+1}; the bottom-k residual is the top part
        expected = sv[:-k] if smallest else sv[k:]
        torch.testing.assert_close(_svals(rest)[: len(expected)], expected)
        # the largest-magnitude entry of each left vector is positive (deterministic signs)
        pick = u[i].abs().argmax(0)
        assert (u[i][pick, torch.arange(k)] > 0).all()


def test_svd_flip_keeps_product():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(7, 5, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    fu, fvh = L.svd_flip(-u, -vh)
    torch.testing.assert_close((fu * s) @ fvh, a)
    torch.testing.assert_close(fu.abs(), u.abs())


# ---- randomized SVD --------------------------------------------------------------------------
@pytest.mark.parametrize("niter", [0, 1, 2])
def test_randomized_svd_error_bound(niter):
    m, n, k, p = 80, 60, 5, 5
    s = torch.logspace(0, -2, 60).tolist()  # slowly decaying: the approximation is not exact
    a = _spectrum_matrix(m, n, s, seed=3)
    sigma = _svals(a)
    factor = (1 + 11 * math.sqrt(k + p) * math.sqrt(min(m, n))) ** (1 / (2 * niter + 1))
    errs = []
    for seed in range(5):
        u, sv, vh = L.randomized_svd(a, k, oversample=p, niter=niter, generator=torch.Generator().manual_seed(seed))
        err = _norm2(a - (u * sv) @ vh)
        assert err <= sigma[k].item() + factor * sigma[k].item()
        assert err >= sigma[k].item() * (1 - 1e-9)  # never better than the optimum
        errs.append(err)
    if niter == 2:  # two power iterations: within 5% of the optimum here
        assert max(errs) <= 1.05 * sigma[k].item()


def test_randomized_svd_power_iterations_help_and_exact_cases():
    a = _spectrum_matrix(50, 40, torch.logspace(0, -1, 40).tolist(), seed=4)
    k, best = 4, _svals(a)[4].item()
    errs = [_norm2(a - (lambda t: (t[0] * t[1]) @ t[2])(
        L.randomized_svd(a, k, oversample=2, niter=q, generator=torch.Generator().manual_seed(0)))) - best
        for q in (0, 1, 3)]
    assert errs[0] > errs[1] > errs[2] >= -1e-12
    # exact when the matrix has rank ≤ k + p
    low = _spectrum_matrix(30, 20, [3.0, 2.0, 1.0], seed=5)
    u, sv, vh = L.randomized_svd(low, 3, oversample=2, niter=0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close((u * sv) @ vh, low)
    torch.testing.assert_close(sv, _svals(low)[:3])
    # and when the sketch spans min(m, n): the exact SVD
    u, sv, vh = L.randomized_svd(a, 4, oversample=100, niter=0)
    torch.testing.assert_close(sv, _svals(a)[:4])


def test_randomized_svd_batched_and_seeded():
    g = torch.Generator().manual_seed(6)
    a = torch.randn(4, 30, 20, generator=g, dtype=torch.float64)
    r1 = L.randomized_svd(a, 3, oversample=4, niter=2, generator=torch.Generator().manual_seed(1))
    r2 = L.randomized_svd(a, 3, oversample=4, niter=2, generator=torch.Generator().manual_seed(1))
    for x, y in zip(r1, r2):
        assert torch.equal(x, y)
    u, s, vh = r1
    k, p = 3, 4
    factor = (1 + 11 * math.sqrt(k + p) * math.sqrt(20)) ** (1 / 5)
    for i in range(4):
        sk = _svals(a[i])[k].item()
        assert _norm2(a[i] - (u[i] * s[i]) @ vh[i]) <= sk + factor * sk
    with pytest.raises(ValueError, match="k=21"):
        L.randomized_svd(a, 21)


# ---- Nyström -----------------------------------------------------------------------------------
def test_nystrom_psd_error_bound_and_exactness():
    n, k, p = 60, 5, 6
    lam = torch.logspace(0, -3, n, dtype=torch.float64)
    q = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64))[0]
    a = (q * lam) @ q.T
    tail = lam[k:].sum().item()
    errs = []
    for seed in range(8):
        u, lk = L.nystrom_psd(a, k, oversample=p, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=torch.float64))
        assert (lk >= 0).all()
        errs.append(torch.linalg.matrix_norm(a - (u * lk) @ u.T, ord="nuc").item())
        assert errs[-1] >= tail * (1 - 1e-9)  # never better than the optimal rank-k error
    # Tropp et al. Thm 4.1 is a bound in expectation: check the sample mean
    assert sum(errs) / len(errs) <= (1 + k / (p - 1)) * tail
    # rank ≤ sketch size: exact
    low = q[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ q[:, :3].T
    u, lk = L.nystrom_psd(low, 3, oversample=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close((u * lk) @ u.T, low)


def test_nystrom_svd_error_bound():
    m, n, k, p = 70, 50, 4, 4
    a = _spectrum_matrix(m, n, torch.logspace(0, -2, 50).tolist(), seed=8)
    sigma = _svals(a)
    for seed in range(4):
        # redraw the sketches from the same generator state to evaluate the stated bound
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, k + p, generator=g, dtype=torch.float64)
        y = torch.randn(m, math.ceil(1.5 * (k + p)), generator=g, dtype=torch.float64)
        qx = torch.linalg.qr(a @ x)[0]
        range_err = _norm2(a - qx @ (qx.T @ a))
        factor = 1 + _norm2(torch.linalg.pinv(y.T @ qx) @ y.T)
        # untruncated (k = l): Â itself
        u, s, vh = L.nystrom_svd(a, k + p, oversample=0, generator=torch.Generator().manual_seed(seed))
        full_err = _norm2(a - (u * s) @ vh)
        assert full_err <= factor * range_err * (1 + 1e-6)
        # truncated to k: ≤ σ_{k+1} + 2‖A − Â‖
        u, s, vh = L.nystrom_svd(a, k, oversample=p, generator=torch.Generator().manual_seed(seed))
        assert _norm2(a - (u * s) @ vh) <= sigma[k].item() + 2 * full_err * (1 + 1e-6)
    low = _spectrum_matrix(40, 30, [5.0, 1.0], seed=9)
    u, s, vh = L.nystrom_svd(low, 2, oversample=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close((u * s) @ vh, low)
    torch.testing.assert_close(s, _svals(low)[:2])


def test_cur_nystrom_exact_for_low_rank():
    low = _spectrum_matrix(12, 9, [4.0, 2.0, 1.0], seed=10)
    c, nmid, r = L.cur_nystrom(low, [0, 1, 2], [0, 1, 2])
    torch.testing.assert_close(c @ nmid @ r, low)
    assert c.shape == (12, 3) and nmid.shape == (3, 3) and r.shape == (3, 9)
    torch.testing.assert_close(nmid, torch.linalg.inv(low[:3, :3]))


# ---- QR, LU, damped inverse --------------------------------------------------------------------
def test_qr_positive_is_the_unique_qr_and_lu():
    g = torch.Generator().manual_seed(11)
    a = torch.randn(2, 8, 5, generator=g, dtype=torch.float64)
    q, r = L.qr_positive(a)
    torch.testing.assert_close(q @ r, a)
    torch.testing.assert_close(q.transpose(-1, -2) @ q, torch.eye(5, dtype=torch.float64).expand(2, 5, 5))
    assert (torch.diagonal(r, dim1=-2, dim2=-1) >= 0).all()
    assert torch.equal(torch.triu(r), r)
    q2, r2 = torch.linalg.qr(a)
    torch.testing.assert_close(q.abs(), q2.abs())  # the same QR up to column signs
    q3, r3 = L.qr_positive(a @ torch.diag(torch.tensor([1.0, -1, 1, -1, 1], dtype=torch.float64)))
    torch.testing.assert_close(q3.abs(), q.abs())
    p, lo, up = L.lu(a[0, :5])
    torch.testing.assert_close(p @ lo @ up, a[0, :5])
    assert torch.equal(torch.tril(lo), lo) and torch.equal(torch.triu(up), up)


def test_damped_inverse_smallest_sufficient_ridge():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 10, generator=g, dtype=torch.float64)
    c = x.T @ x  # rank 4 of 10: singular
    c = torch.stack([c, torch.eye(10, dtype=torch.float64)])
    fixed, inv, d = L.damped_inverse(c, damp=1e-20, tol=0.05)
    eye = torch.eye(10, dtype=torch.float64)
    for i in range(2):
        scale = torch.diagonal(c[i]).mean()
        torch.testing.assert_close(fixed[i], c[i] + d[i] * scale * eye)
        assert torch.linalg.matrix_norm(fixed[i] @ inv[i] - eye) < 0.05
    assert d[1].item() == 1e-20  # already fine: no doubling
    # half the ridge would not have passed (the doubling stops at the first sufficient value)
    assert d[0].item() > 1e-20  # the singular matrix needed a larger ridge
    half = c[0] + d[0] / 2 * torch.diagonal(c[0]).mean() * eye
    assert torch.linalg.matrix_norm(half @ torch.linalg.inv(half) - eye) >= 0.05
    # scale invariance
    _, _, d2 = L.damped_inverse(c * 32.0, damp=1e-20, tol=0.05)  # exact scaling
    assert torch.equal(d, d2)


# ---- streams -------------------------------------------------------------------------------------
def _stream(seed=13, rows=300, feats=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, feats, generator=g, dtype=torch.float64) @ torch.randn(feats, feats, generator=g,
                                                                                    dtype=torch.float64)
    return x + 2.0


def test_streaming_moments_exact():
    x = _stream()
    st = L.StreamingMoments()
    for blk in x.split(41):
        st = st.update(blk)
    assert st.n == 300
    torch.testing.assert_close(st.mean, x.mean(0))
    torch.testing.assert_close(st.second, x.T @ x / 300)
    torch.testing.assert_close(st.covariance(), torch.cov(x.T, correction=0))


@pytest.mark.parametrize("center", [True, False])
def test_incremental_svd_exact_when_it_keeps_everything(center):
    x = _stream()
    inc = L.IncrementalSVD(k=4, oversample=8, center=center)  # 4 + 8 = 12 = n_features: exact
    for blk in x.split(41):
        inc = inc.update(blk)
    xc = x - x.mean(0) if center else x
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    torch.testing.assert_close(inc.singular_values, s[:4])
    torch.testing.assert_close(inc.components.abs(), vh[:4].abs())
    torch.testing.assert_close(inc.explained_variance_ratio, s[:4] ** 2 / (xc**2).sum())
    if center:
        torch.testing.assert_close(inc.mean, x.mean(0))


def test_incremental_svd_truncation_error_bound():
    x = _stream(rows=400, feats=16)
    q, steps = 5, 0
    inc = L.IncrementalSVD(k=3, oversample=2, center=True)
    for blk in x.split(50):
        inc = inc.update(blk)
        steps += 1
    xc = x - x.mean(0)
    gram = xc.T @ xc
    approx = inc.vh.T @ torch.diag(inc.s**2) @ inc.vh
    err = gram - approx
    ev = torch.linalg.eigvalsh(err)
    assert ev.min() >= -1e-8 * ev.abs().max()  # the error is PSD: truncation only drops energy
    sigma = _svals(xc)
    assert ev.max() <= steps * sigma[q].item() ** 2  # ≤ Σ_steps σ²_{q+1}(step) ≤ T · σ²_{q+1}(X)
    torch.testing.assert_close(torch.tensor(inc.total, dtype=torch.float64), (xc**2).sum())


# ---- batching over layers ----------------------------------------------------------------------------
def test_batched_map_groups_by_shape_in_order():
    g = torch.Generator().manual_seed(14)
    mats = [torch.randn(*sh, generator=g) for sh in [(5, 4), (3, 6), (5, 4), (5, 4), (3, 6)]]
    calls = []

    def fn(stack):
        calls.append(stack.shape[0])
        return torch.linalg.svd(stack, full_matrices=False)

    out = L.batched_map(fn, mats, max_bytes=2 * 5 * 4 * 4)  # at most two 5x4 fp32 matrices per call
    assert sorted(calls) == [1, 2, 2]
    for m, (u, s, vh) in zip(mats, out):
        torch.testing.assert_close((u * s) @ vh, m, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s, torch.linalg.svdvals(m))
