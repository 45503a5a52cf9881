"""Model soups over adapters: uniform average, and the greedy recipe against a re-derivation of the paper's
Recipe 1 with the same validation callback."""

from __future__ import annotations

import pytest
import torch
from _combine_helpers import add_lora, base, delta

import rankwise as rw
from rankwise.errors import ConfigError


def four_adapters():
    model = base()
    for i in range(4):
        add_lora(model, f"t{i}", 2 + i % 2, 4.0, 10 + i, targets=["q", "up"])
    return model


def test_uniform_soup_is_the_average():
    model = four_adapters()
    names = [f"t{i}" for i in range(4)]
    rw.combine(model, names, None, "soup", method="soup")
    ds = [delta(model, n) for n in names]
    for k, d in delta(model, "soup").items():
        torch.testing.assert_close(d, sum(x[k] for x in ds) / 4, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="no weights"):
        rw.combine(model, names, [1, 1, 1, 1], "x", method="soup")


def test_greedy_soup_follows_recipe_1():
    model = four_adapters()
    names = [f"t{i}" for i in range(4)]
    ds = {n: delta(model, n) for n in names}
    # a validation score of the active update: closeness to a target that favours t1 and t3
    target = {k: 0.5 * (ds["t1"][k] + ds["t3"][k]) + 0.2 * ds["t0"][k] for k in ds["t0"]}

    def score_of(update):
        return -sum(float((update[k] - target[k]).norm()) for k in target)

    @torch.no_grad()
    def score(m):
        layers = dict(rw.core.api.adapted_layers(m))
        return score_of({k: layers[k].delta_weight() for k in target})

    active_before = rw.active_adapters(model)
    rw.combine(model, names, None, "greedy", method="greedy_soup", score=score)

    # Recipe 1 (Wortsman et al. 2022), re-derived on the dense updates
    single = {n: score_of(ds[n]) for n in names}
    order = sorted(names, key=lambda n: -single[n])
    soup, best = [order[0]], single[order[0]]
    for n in order[1:]:
        cand = soup + [n]
        s = score_of({k: sum(ds[c][k] for c in cand) / len(cand) for k in target})
        if s >= best:
            soup, best = cand, s
    rec = rw.core.api.adapter_state(model)["greedy"]["combine"]
    assert rec["ingredients"] == soup and 1 < len(soup) < 4
    for k, d in delta(model, "greedy").items():
        torch.testing.assert_close(d, sum(ds[c][k] for c in soup) / len(soup), atol=1e-5, rtol=1e-5)
    assert rw.active_adapters(model) == ["greedy"]
    assert set(rw.core.api.adapter_state(model)) == set(names) | {"greedy"}  # no candidate left behind
    assert active_before == ["t3"]


def test_greedy_soup_restores_the_model_when_score_fails():
    model = four_adapters()
    rw.set_active(model, ["t0", "t2"])
    calls = []

    def score(m):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("validation crashed")
        return float(len(calls))

    with pytest.raises(RuntimeError, match="validation crashed"):
        rw.combine(model, [f"t{i}" for i in range(4)], None, "g", method="greedy_soup", score=score)
    assert sorted(rw.core.api.adapter_state(model)) == ["t0", "t1", "t2", "t3"]
    assert rw.active_adapters(model) == ["t0", "t2"]
    with pytest.raises(ConfigError, match="score"):
        rw.combine(model, ["t0", "t1"], None, "g", method="greedy_soup", score=3)
