"""rankwise.analysis.routing: entropy and load against a re-computation from each layer's own input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.analysis.routing import routing_table
from rankwise.core.api import adapted_layers

pytestmark = pytest.mark.usefixtures("single_thread")


def model_with(router, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).eval()
    rw.adapt(model, "mole", rank=2, experts=3, router=router, targets=["0", "2"], seed=0, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in rw.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def layer_inputs(model, batches):
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, layer in adapted_layers(model)]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def batches():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(4, 3, 6, generator=g) for _ in range(3)]


@pytest.mark.parametrize("router,k", [("topk", 1), ("topk", 2), ("token", 1)])
def test_entropy_and_load_match_a_recomputation(router, k):
    model = model_with(router, top_k=k)
    table = routing_table(model, batches())
    assert [r["module"] for r in table] == ["0", "2"]
    xs = layer_inputs(model, batches())
    for row in table:
        ad = dict(adapted_layers(model))[row["module"]].adapters["default"]
        p = torch.softmax(xs[row["module"]] @ ad.router_weight.t(), dim=-1)
        n = p.shape[0]
        assert row["tokens"] == n == 36
        ent = float(-(p * p.log()).sum(-1).mean().detach())
        assert row["entropy"] == pytest.approx(ent, rel=1e-5)
        assert row["norm_entropy"] == pytest.approx(ent / math.log(3), rel=1e-5)
        chosen = p.topk(k, dim=-1).indices
        counts = torch.tensor([float((chosen == e).any(-1).sum()) for e in range(3)])
        load = counts / counts.sum()
        assert row["load"] == pytest.approx(load.tolist(), abs=1e-6)
        assert row["imbalance"] == pytest.approx(3 * float(load.max()), abs=1e-6)


def test_layer_gates_report_their_own_entropy_and_the_counters_reset():
    model = model_with("layer")
    routing_table(model, batches())
    table = routing_table(model, batches())  # reset before running: not twice the tokens
    for row in table:
        g = torch.softmax(dict(adapted_layers(model))[row["module"]].adapters["default"].gate_logits.detach(), 0)
        assert row["tokens"] == 36
        assert row["entropy"] == pytest.approx(float(-(g * g.log()).sum()), rel=1e-5)
        assert row["load"] == pytest.approx(g.tolist(), abs=1e-6)
    text = str(table)
    assert "norm_entropy" in text and "imbalance" in text
    assert table.markdown().startswith("| module")


def test_training_forwards_count_and_a_model_without_mixtures_gives_an_empty_table():
    model = model_with("topk", top_k=2)
    model.train()
    model(batches()[0])
    assert [r["tokens"] for r in routing_table(model)] == [12, 12]
    plain = nn.Sequential(nn.Linear(6, 5))
    rw.adapt(plain, "lora", rank=2, targets=["0"])
    assert routing_table(plain, batches()) == []
