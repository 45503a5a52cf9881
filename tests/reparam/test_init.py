"""rw.init.low_rank_ / aligned_low_rank_: the rank, the norm and the subspaces against an independent
re-draw of the same Gaussian matrix (same generator seed) and its SVD, and the aligned variant's
subspaces against the target's (principal angles)."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw
from rankwise.analysis import principal_angles
from rankwise.errors import ConfigError, ShapeMismatchError

pytestmark = pytest.mark.usefixtures("single_thread")


def redraw(m, n, seed, std=1.0):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * std


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_low_rank_has_the_rank_norm_and_top_subspace_of_the_draw(rank):
    w = torch.empty(9, 7)
    rw.init.low_rank_(w, rank, std=0.3, generator=torch.Generator().manual_seed(4))
    g = redraw(9, 7, 4, 0.3)
    assert torch.linalg.matrix_rank(w) == rank  # float32 tolerance: w is stored in float32
    torch.testing.assert_close(w.double().norm(), g.norm(), rtol=1e-5, atol=0)
    u, s, vh = torch.linalg.svd(g)
    uw, sw, vhw = torch.linalg.svd(w.double())
    assert principal_angles(uw[:, :rank], u[:, :rank]).max() < 1e-3
    assert principal_angles(vhw[:rank].T, vh[:rank].T).max() < 1e-3
    # the spectrum is the draw's top-r, scaled up uniformly to the full norm
    c = g.norm() / s[:rank].norm()
    torch.testing.assert_close(sw[:rank], s[:rank] * c, rtol=1e-5, atol=1e-6)
    if rank == 7:  # full rank: the draw itself
        torch.testing.assert_close(w.double(), g, rtol=1e-5, atol=1e-6)


def test_spectral_norm_matches_the_draws_top_singular_value():
    w = torch.empty(12, 10)
    rw.init.low_rank_(w, 2, std=1.0, norm="spectral", generator=torch.Generator().manual_seed(1))
    g = redraw(12, 10, 1)
    s_w, s_g = torch.linalg.svdvals(w.double()), torch.linalg.svdvals(g)
    torch.testing.assert_close(s_w[0], s_g[0], rtol=1e-5, atol=0)
    assert w.double().norm() < g.norm()  # same top gain, less energy than the full-rank draw


def test_std_none_keeps_the_tensor_norm_and_conv_kernels_work():
    w = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(0)) * 5
    before = w.norm()
    rw.init.low_rank_(w, 2, generator=torch.Generator().manual_seed(1))
    assert w.shape == (6, 3, 2, 2)
    torch.testing.assert_close(w.norm(), before, rtol=1e-5, atol=0)
    assert torch.linalg.matrix_rank(w.reshape(6, -1)) == 2


def test_bfloat16_and_seeded():
    a, b = torch.empty(8, 8, dtype=torch.bfloat16), torch.empty(8, 8, dtype=torch.bfloat16)
    rw.init.low_rank_(a, 2, std=1.0, generator=torch.Generator().manual_seed(3))
    rw.init.low_rank_(b, 2, std=1.0, generator=torch.Generator().manual_seed(3))
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    s = torch.linalg.svdvals(a.float())
    assert s[2] < 0.02 * s[0]  # rank 2 up to bfloat16 rounding


def test_aligned_takes_the_subspaces_of_the_target():
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(10, 2, generator=g), torch.randn(6, 2, generator=g)
    target = left @ right.T  # rank 2
    w = torch.empty(10, 6)
    rw.init.aligned_low_rank_(w, target, std=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.linalg.matrix_rank(w) == 2  # rank=None: the target's numerical rank
    u, _, vh = torch.linalg.svd(w.double())
    assert principal_angles(u[:, :2], left.double()).max() < 1e-3
    assert principal_angles(vh[:2].T, right.double()).max() < 1e-3
    torch.testing.assert_close(w.double().norm(), redraw(10, 6, 7, 0.5).norm(), rtol=1e-5, atol=0)
    one = torch.empty(10, 6)
    rw.init.aligned_low_rank_(one, target, rank=1, std=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.linalg.matrix_rank(one) == 1
    u_t = torch.linalg.svd(target.double())[0][:, :1]
    assert principal_angles(torch.linalg.svd(one.double())[0][:, :1], u_t).max() < 1e-3
    # a rank above the target's is capped at it (the target has no more directions)
    capped = torch.empty(10, 6)
    rw.init.aligned_low_rank_(capped, target, rank=5, std=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.linalg.matrix_rank(capped) == 2


@pytest.mark.parametrize("call,err,words", [
    (lambda w: rw.init.low_rank_(w, 0), ConfigError, "rank=0"),
    (lambda w: rw.init.low_rank_(w, 2, norm="nuc"), ConfigError, "norm='nuc'"),
    (lambda w: rw.init.low_rank_(w, 2, std=-1.0), ConfigError, "std=-1.0"),
    (lambda w: rw.init.low_rank_(w[0], 2), ShapeMismatchError, "at least 2 dimensions"),
    (lambda w: rw.init.aligned_low_rank_(w, torch.ones(3, 3)), ShapeMismatchError, r"\(4, 5\)"),
    (lambda w: rw.init.aligned_low_rank_(w, torch.zeros(4, 5)), ConfigError, "zero matrix"),
])
def test_bad_input_is_refused_and_the_tensor_unchanged(call, err, words):
    w = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    before = w.clone()
    with pytest.raises(err, match=words):
        call(w)
    assert torch.equal(w, before)
