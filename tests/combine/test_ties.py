"""TIES / DARE / magnitude pruning: against PEFT's add_weighted_adapter (same RNG draws) and a transcription
of the TIES paper's algorithm."""

from __future__ import annotations

import contextlib

import pytest
import torch
from _combine_helpers import NAMES, delta, peft_copy, peft_delta, two_adapters

import rankwise as rw
from rankwise.combine.ties import drop, trim
from rankwise.errors import ConfigError

A, B = NAMES
W = [0.8, 0.6]


@contextlib.contextmanager
def reseed_peft_after_inject(seed: int):
    """PEFT builds the new adapter's layers (drawing their init from torch's global RNG) before the merge's
    Bernoulli draws; re-seed right after that, so both libraries start the draws from ``seed``."""
    from peft.tuners.lora.model import LoraModel

    original = LoraModel.inject_adapter

    def inject(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        torch.manual_seed(seed)
        return out

    LoraModel.inject_adapter = inject
    try:
        yield
    finally:
        LoraModel.inject_adapter = original


@pytest.mark.parametrize("method,density,rank", [
    ("ties_svd", 0.5, 4), ("magnitude_prune_svd", 0.3, 6), ("dare_linear_svd", 0.5, 4), ("dare_ties_svd", 0.6, 5),
    ("ties_svd", 0.5, None),
])
def test_svd_forms_match_peft(method, density, rank):
    model = two_adapters()
    pm = peft_copy(model, [A, B])
    with reseed_peft_after_inject(1234):
        pm.add_weighted_adapter([A, B], W, "merged", combination_type=method, density=density, svd_rank=rank)
    # rankwise: torch's global RNG, seeded the same way (and seed= gives the same stream)
    torch.manual_seed(1234)
    rw.combine(model, [A, B], W, "merged", method=method, density=density, rank=rank)
    rw.combine(model, [A, B], W, "seeded", method=method, density=density, rank=rank, seed=1234)
    want, got, seeded = peft_delta(pm, "merged"), delta(model, "merged"), delta(model, "seeded")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(seeded[k], got[k], atol=0, rtol=0)


@pytest.mark.parametrize("method", ["peft_ties", "peft_magnitude_prune", "peft_dare_linear", "peft_dare_ties"])
def test_peft_factorwise_variants_match_peft(method):
    model = two_adapters(ranks=(4, 4), alphas=(8.0, 2.0))
    pm = peft_copy(model, [A, B])
    with reseed_peft_after_inject(7):
        pm.add_weighted_adapter([A, B], W, "merged", combination_type=method[len("peft_"):], density=0.5)
    rw.combine(model, [A, B], W, "merged", method=method, density=0.5, seed=7)
    want, got = peft_delta(pm, "merged"), delta(model, "merged")
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4)


def ties_reference(deltas, weights, density):
    """Yadav et al. 2023, Algorithm 1, entry by entry: trim each τ_t to its top-k magnitudes, elect
    γ = sgn(Σ_t τ̂_t), average the weighted τ̂_t that agree with γ (zeros agree with nothing)."""
    flats = [d.flatten().tolist() for d in deltas]
    n = len(flats[0])
    k = int(density * n)
    trimmed = []
    for f in flats:
        keep = set(sorted(range(n), key=lambda i: -abs(f[i]))[:k])
        trimmed.append([f[i] if i in keep else 0.0 for i in range(n)])
    out = []
    for i in range(n):
        vals = [t[i] for t in trimmed]
        gamma = 1.0 if sum(vals) >= 0 else -1.0
        agree = [w * v for w, v in zip(weights, vals) if v != 0 and (v > 0) == (gamma > 0)]
        out.append(sum(agree) / len(agree) if agree else 0.0)
    return torch.tensor(out, dtype=deltas[0].dtype).reshape(deltas[0].shape)


def test_ties_follows_the_paper_on_the_dense_update():
    model = two_adapters()
    rw.combine(model, [A, B], W, "ties", method="ties", density=0.4)
    da, db, got = delta(model, A), delta(model, B), delta(model, "ties")
    for k in got:
        torch.testing.assert_close(got[k], ties_reference([da[k], db[k]], W, 0.4), atol=1e-5, rtol=1e-5)


def test_peft_ties_trims_factors_not_the_update():
    model = two_adapters(ranks=(4, 4))
    rw.combine(model, [A, B], W, "paper", method="ties", density=0.4)
    rw.combine(model, [A, B], W, "factors", method="peft_ties", density=0.4)
    paper, factors = delta(model, "paper"), delta(model, "factors")
    assert any((paper[k] - factors[k]).abs().max() > 1e-2 for k in paper)


def test_magnitude_prune_and_dare_kernels():
    t = torch.randn(7, 9, generator=torch.Generator().manual_seed(0))
    kept = trim(t, 0.3)
    assert int((kept != 0).sum()) == int(0.3 * t.numel())
    assert kept.abs().min() == 0 and kept[kept != 0].abs().min() >= t.abs().flatten().sort().values[-int(0.3 * 63)]
    d = drop(t, 0.5, torch.Generator().manual_seed(1))
    mask = d != 0
    torch.testing.assert_close(d[mask], t[mask] * 2)  # kept entries rescaled by 1 / density
    assert torch.equal(drop(t, 1.0), t) and torch.equal(trim(t, 1.0), t)


def test_dare_is_seeded_and_density_one_is_the_weighted_sum():
    model = two_adapters()
    rw.combine(model, [A, B], W, "d1", method="dare_ties", density=0.5, seed=3)
    rw.combine(model, [A, B], W, "d2", method="dare_ties", density=0.5, seed=3)
    rw.combine(model, [A, B], W, "d3", method="dare_ties", density=0.5, seed=4)
    rw.combine(model, [A, B], W, "full", method="dare_linear", density=1.0)
    d1, d2, d3, full = (delta(model, n) for n in ("d1", "d2", "d3", "full"))
    da, db = delta(model, A), delta(model, B)
    for k in d1:
        assert torch.equal(d1[k], d2[k]) and not torch.allclose(d1[k], d3[k])
        torch.testing.assert_close(full[k], W[0] * da[k] + W[1] * db[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1, "half", True])
def test_density_outside_0_1_is_refused(density):
    model = two_adapters()
    with pytest.raises(ConfigError, match="density"):
        rw.combine(model, [A, B], W, "x", method="ties", density=density)
    with pytest.raises(ConfigError, match="needs \\['density'\\]"):
        rw.combine(model, [A, B], W, "x", method="dare_ties")
    assert "x" not in rw.core.api.adapter_state(model)
