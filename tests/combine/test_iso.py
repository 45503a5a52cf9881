"""Iso-C and Iso-CTS against a dense re-derivation of Marczak et al. 2025's equations."""

from __future__ import annotations

import pytest
import torch
from _combine_helpers import NAMES, delta, two_adapters

import rankwise as rw
from rankwise.combine.iso import split_sizes
from rankwise.errors import ConfigError

A, B = NAMES
W = [0.9, 0.5]


def _rank(s, shape):
    """Numerical rank at float32 precision (the adapters' own), whatever dtype the SVD ran in."""
    return int((s > s.max() * max(shape) * torch.finfo(torch.float32).eps).sum())


def iso_c_dense(deltas, weights):
    """Δ_TA = Σ w_t Δ_t = U Σ Vᵀ;  Δ = mean(σ_1..σ_r) · U_r V_rᵀ  (r = rank of Δ_TA)."""
    ta = sum(w * d for w, d in zip(weights, deltas))
    u, s, vh = torch.linalg.svd(ta, full_matrices=False)
    r = _rank(s, ta.shape)
    return s[:r].mean() * u[:, :r] @ vh[:r]


def polar(x):
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def iso_cts_dense(deltas, weights, fraction):
    ta = sum(w * d for w, d in zip(weights, deltas))
    u, s, vh = torch.linalg.svd(ta, full_matrices=False)
    r, T = _rank(s, ta.shape), len(deltas)
    k = int(r * fraction)
    per = round((r - k) / T)
    k = r - T * per
    uk = u[:, :k]
    cols, rows, sig = [uk], [vh[:k]], [s[:k]]
    for w, d in zip(weights, deltas):
        hat = w * d - uk @ uk.T @ (w * d)  # the task's part outside the common subspace
        ut, st, vt = torch.linalg.svd(hat, full_matrices=False)
        cols.append(ut[:, :per])
        rows.append(vt[:per])
        sig.append(st[:per])
    U, V = polar(torch.cat(cols, 1)), polar(torch.cat(rows, 0))
    return torch.cat(sig).mean() * U @ V


@pytest.mark.parametrize("ranks", [(3, 5), (1, 2)])  # Δ_TA full rank (the paper's case) / low rank
def test_iso_c_matches_dense_rederivation(ranks):
    model = two_adapters(ranks=ranks).double()  # float64: the comparison is not limited by conditioning
    rw.combine(model, [A, B], W, "iso", method="iso_c")
    da, db, got = delta(model, A), delta(model, B), delta(model, "iso")
    for k in got:
        torch.testing.assert_close(got[k], iso_c_dense([da[k], db[k]], W), atol=1e-9, rtol=1e-9)
        sv = torch.linalg.svdvals(got[k].double())
        r = _rank(sv, got[k].shape)
        assert torch.allclose(sv[:r], sv[0].expand(r), rtol=1e-4)  # a flat spectrum


@pytest.mark.parametrize("ranks,fraction", [((3, 5), 0.8), ((2, 3), 0.5), ((2, 2), 0.0)])
def test_iso_cts_matches_dense_rederivation(ranks, fraction):
    # float64: the polar factors of nearly dependent stacked directions amplify float32 rounding
    model = two_adapters(ranks=ranks).double()
    rw.combine(model, [A, B], W, "cts", method="iso_cts", common_space_fraction=fraction)
    da, db, got = delta(model, A), delta(model, B), delta(model, "cts")
    for k in got:
        torch.testing.assert_close(got[k], iso_cts_dense([da[k], db[k]], W, fraction), atol=1e-9, rtol=1e-9)


def test_equal_weights_scale_the_isotropic_merge():
    model = two_adapters().double()
    rw.combine(model, [A, B], [1.0, 1.0], "one", method="iso_cts")
    rw.combine(model, [A, B], [0.3, 0.3], "alpha", method="iso_cts")
    one, alpha = delta(model, "one"), delta(model, "alpha")
    for k in one:
        torch.testing.assert_close(alpha[k], 0.3 * one[k], atol=1e-10, rtol=1e-9)


def test_split_sizes_follow_the_reference_and_stay_in_range():
    assert split_sizes(100, 8, 0.8) == (84, 2)   # int(80) → 20 / 8 rounds to 2 per task
    assert split_sizes(8, 2, 0.8) == (6, 1)
    for r in range(1, 12):
        for t in range(1, 5):
            for f in (0.0, 0.3, 0.8, 1.0):
                k, per = split_sizes(r, t, f)
                assert 0 <= k <= r and per >= 0 and k + t * per == r


def test_common_space_fraction_is_checked():
    model = two_adapters()
    with pytest.raises(ConfigError, match="common_space_fraction"):
        rw.combine(model, [A, B], W, "x", method="iso_cts", common_space_fraction=1.5)
