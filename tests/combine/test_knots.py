"""KnOTS: joint SVD alignment, then TIES/DARE on the aligned updates; against a dense re-derivation."""

from __future__ import annotations

import pytest
import torch
from _combine_helpers import NAMES, delta, two_adapters

import rankwise as rw
from rankwise.errors import ConfigError

A, B = NAMES
W = [0.8, 0.6]


def ties_dense(tensors, weights, density):
    """TIES (trim top-k per task, elect by summed mass, disjoint weighted mean), vectorized independently."""
    out = []
    for t in tensors:
        k = int(density * t.numel())
        thresh = t.abs().flatten().sort(descending=True).values[k - 1]
        out.append(torch.where(t.abs() >= thresh, t, torch.zeros_like(t)))
    st = torch.stack(out)
    gamma = torch.where(st.sum(0) >= 0, 1.0, -1.0).to(st)
    agree = (torch.sign(st) == gamma).to(st)
    w = torch.tensor(weights, dtype=st.dtype)[:, None, None]
    return (w * st * agree).sum(0) / agree.sum(0).clamp(min=1)


def knots_dense(deltas, weights, density):
    """Stoica et al. 2025: [Δ_1 | … | Δ_T] = U Σ [V_1ᵀ | … ]; merge the Σ V_tᵀ by TIES; ΔW = U · merged."""
    cat = torch.cat(deltas, dim=1)
    u, s, vh = torch.linalg.svd(cat, full_matrices=False)
    k = int((s > s.max() * max(cat.shape) * torch.finfo(torch.float32).eps).sum())
    u, s, vh = u[:, :k], s[:k], vh[:k]
    n = deltas[0].shape[1]
    sv = [s[:, None] * vh[:, i * n:(i + 1) * n] for i in range(len(deltas))]
    return u @ ties_dense(sv, weights, density)


def test_knots_ties_matches_dense_rederivation():
    model = two_adapters()
    rw.combine(model, [A, B], W, "knots", method="knots", density=0.5)
    da, db, got = delta(model, A), delta(model, B), delta(model, "knots")
    for k in got:
        want = knots_dense([da[k].double(), db[k].double()], W, 0.5).float()
        torch.testing.assert_close(got[k], want, atol=3e-5, rtol=1e-4)


def test_knots_linear_is_task_arithmetic():
    # U Σ_t w_t (Σ V_tᵀ) = Σ_t w_t ΔW_t: alignment loses nothing
    model = two_adapters()
    rw.combine(model, [A, B], W, "kl", method="knots", merge="linear")
    da, db, got = delta(model, A), delta(model, B), delta(model, "kl")
    for k in got:
        torch.testing.assert_close(got[k], W[0] * da[k] + W[1] * db[k], atol=1e-5, rtol=1e-5)


def test_knots_dare_is_seeded_and_merge_is_checked():
    model = two_adapters()
    rw.combine(model, [A, B], W, "k1", method="knots", merge="dare_ties", density=0.5, seed=0)
    rw.combine(model, [A, B], W, "k2", method="knots", merge="dare_ties", density=0.5, seed=0)
    for k, d in delta(model, "k1").items():
        assert torch.equal(d, delta(model, "k2")[k])
    with pytest.raises(ConfigError, match="knots merge"):
        rw.combine(model, [A, B], W, "x", method="knots", merge="mean")
