"""linear / cat / svd / peft_linear: exact task arithmetic in factor space, against dense sums and PEFT."""

from __future__ import annotations

import pytest
import torch
from _combine_helpers import NAMES, add_lora, base, delta, peft_copy, peft_delta, perturb, two_adapters

import rankwise as rw
from rankwise.errors import ConfigError

A, B = NAMES
W = [0.7, -0.4]


def _weighted(model, weights, names=NAMES):
    ds = [delta(model, n) for n in names]
    keys = set().union(*ds)
    return {k: sum(w * d[k] for w, d in zip(weights, ds) if k in d) for k in keys}


@pytest.mark.parametrize("method,opts", [("linear", {}), ("cat", {}), ("svd", {"rank": 8}),
                                         ("dare_linear", {"density": 1.0}),
                                         ("magnitude_prune", {"density": 1.0})])
def test_weights_one_zero_give_the_first_adapter(method, opts):
    model = two_adapters()
    rw.combine(model, [A, B], [1.0, 0.0], "first", method=method, **opts)
    want, got = delta(model, A), delta(model, "first")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-5)


def test_cat_equals_the_weighted_sum_exactly_with_mixed_ranks_kinds_and_methods():
    # ranks 3 and 5, scales 2 and 0.5, an embedding (transposed layout), one adapter on fewer modules,
    # and a DoRA adapter read through its weight view
    model = base()
    add_lora(model, A, 3, 6.0, 1, targets=["emb", "q", "v", "up"])
    add_lora(model, B, 5, 2.5, 2, targets=["q", "up"])
    rw.adapt(model, "dora", name="dora", rank=2, targets=["v", "up"], seed=3)
    perturb(model, "dora")
    names, weights = [A, B, "dora"], [0.7, -0.4, 1.3]
    rw.combine(model, names, weights, "sum", method="cat")
    want, got = _weighted(model, weights, names), delta(model, "sum")
    assert set(got) == set(want) == {"emb", "q", "v", "up"}
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    # the result is a plain LoRA of rank Σ r (3 + 5 at q and up; DoRA's thin SVD adds its numerical rank)
    state = rw.core.api.adapter_state(model)["sum"]
    assert state["config"].method == "lora" and state["config"].scale == 1.0


def test_linear_is_task_arithmetic_and_rank_truncates_it():
    model = two_adapters()
    rw.combine(model, [A, B], W, "ta", method="linear")
    rw.combine(model, [A, B], W, "ta2", method="linear", rank=2)
    want = _weighted(model, W)
    for k, d in delta(model, "ta").items():
        torch.testing.assert_close(d, want[k], atol=1e-5, rtol=1e-5)
        # rank 2: the Eckart–Young truncation of the dense sum (torch.linalg.svd as the oracle)
        u, s, vh = torch.linalg.svd(want[k], full_matrices=False)
        torch.testing.assert_close(delta(model, "ta2")[k], (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=1e-4)


def test_svd_at_full_rank_is_exact():
    model = two_adapters()
    rw.combine(model, [A, B], W, "full", method="svd", rank=8)  # 3 + 5
    want = _weighted(model, W)
    for k, d in delta(model, "full").items():
        torch.testing.assert_close(d, want[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,opts,peft_opts", [
    ("cat", {}, {}),
    ("svd", {"rank": 4}, {"svd_rank": 4}),
    ("svd", {}, {}),  # default rank: the largest input rank, as PEFT
])
def test_matches_peft_add_weighted_adapter(method, opts, peft_opts):
    model = two_adapters()
    pm = peft_copy(model, [A, B])
    pm.add_weighted_adapter([A, B], W, "merged", combination_type=method, **peft_opts)
    rw.combine(model, [A, B], W, "merged", method=method, **opts)
    want, got = peft_delta(pm, "merged"), delta(model, "merged")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4)


def test_peft_linear_matches_peft_and_differs_from_task_arithmetic():
    model = two_adapters(ranks=(4, 4), alphas=(8.0, 2.0))
    pm = peft_copy(model, [A, B])
    pm.add_weighted_adapter([A, B], W, "merged", combination_type="linear")
    rw.combine(model, [A, B], W, "merged", method="peft_linear")
    rw.combine(model, [A, B], W, "paper", method="linear")
    want, got, paper = peft_delta(pm, "merged"), delta(model, "merged"), delta(model, "paper")
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4)
        assert (paper[k] - got[k]).abs().max() > 1e-2  # PEFT's factor mixing has cross terms B_i A_j


def test_peft_linear_needs_one_rank_and_cat_takes_no_rank():
    model = two_adapters()
    before = rw.core.api.adapter_state(model).copy()
    with pytest.raises(ConfigError, match="same rank"):
        rw.combine(model, [A, B], W, "x", method="peft_linear")
    with pytest.raises(ConfigError, match="no option"):
        rw.combine(model, [A, B], W, "x", method="cat", rank=3)
    assert rw.core.api.adapter_state(model).keys() == before.keys()
