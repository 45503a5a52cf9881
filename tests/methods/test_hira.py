"""hira (HiRA, Huang et al. 2025): PEFT 0.21 oracle, explicit Hadamard products in float64, and the
``computes_base`` path stacked with another adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from _structured_helpers import (
    cases,
    check_config_round_trip,
    check_gradients_equal_dense_weight_view,
    check_peft_round_trip,
    check_same_as_peft,
    linear,
    randomize,
)
from torch import nn

import rankwise as rw

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("single_thread")]


@pytest.mark.parametrize("case", cases("hira"))
def test_same_weights_as_peft_same_outputs_and_gradients(case, request, token_batch):
    check_same_as_peft(case, request, token_batch)


@pytest.mark.parametrize("case", [c for c in cases("hira") if c != "hira-conv"])
def test_gradients_equal_dense_weight_view(case, request, token_batch):
    check_gradients_equal_dense_weight_view(case, request, token_batch)


@pytest.mark.parametrize("case", cases("hira"))
def test_export_import_peft_round_trip(case, request, token_batch, tmp_path):
    check_peft_round_trip(case, request, token_batch, tmp_path)


def test_is_a_hadamard_high_rank_update():
    m, n, r = 10, 12, 1
    net = linear(m, n)
    model = rw.adapt(copy.deepcopy(net), "hira", rank=r, seed=0)
    ad = model[0].adapters["default"]
    randomize(ad.parameters(), seed=1, std=1.0)
    dw = ad.delta_weight()
    ref = torch.empty(m, n, dtype=torch.float64)
    for p in range(m):
        for q in range(n):
            ref[p, q] = net[0].weight[p, q] * (ad.hira_B[p, 0] * ad.hira_A[0, q])
    torch.testing.assert_close(dw, ref, atol=1e-12, rtol=1e-10)
    assert torch.linalg.matrix_rank(dw) == min(m, n) > r, "rank-1 B A still gives a full-rank update"


def test_computes_base_stacks_with_other_adapters_and_merges():
    """A computes_base adapter (hira) first, LoRA second, and the reverse order, and with hira merged:
    the layer equals the dense weight view W0 + ΔW_hira + ΔW_lora (float64)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(7, 5)).double()
    x = torch.randn(4, 7, dtype=torch.float64)
    for order in (("h", "l"), ("l", "h")):
        model = copy.deepcopy(net)
        for name in order:
            rw.adapt(model, "hira" if name == "h" else "lora", rank=2, targets=["0"], name=name, seed=1)
        randomize([p for p in model.parameters() if p.requires_grad], seed=2)
        rw.set_active(model, list(order))
        layer = model[0]
        assert layer.active == list(order)
        with torch.no_grad():
            ref = nn.functional.linear(x, net[0].weight + layer.delta_weight(), net[0].bias)
            torch.testing.assert_close(model(x), ref, atol=1e-12, rtol=1e-10)
            layer.merge(["h"])  # merged, hira no longer runs: the other adapter sees the merged weight
            torch.testing.assert_close(model(x), ref, atol=1e-12, rtol=1e-10)
            layer.unmerge()
            torch.testing.assert_close(layer.base.weight, net[0].weight, atol=1e-12, rtol=0)
        out = model(x)
        out.sum().backward()
        assert all(p.grad is not None for p in layer.adapters.parameters())


def test_dropout_path_matches_reference():
    """Training with dropout: op(x, W0) + op(drop(x), W0 ⊙ BA), the same mask re-drawn from the seed."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4)).double()
    model = rw.adapt(copy.deepcopy(net), "hira", rank=2, dropout=0.5, seed=0).train()
    ad = model[0].adapters["default"]
    randomize(ad.parameters(), seed=1)
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)
    xd = nn.functional.dropout(x, 0.5, training=True)
    ref = net(x) + xd @ ad.delta_weight().t()
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    assert not torch.allclose(out, model.eval()(x))


def test_config_round_trips_and_rejects_bad_values():
    check_config_round_trip("hira", {"dropout": 1.0})
