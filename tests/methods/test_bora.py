"""bora (Wang et al. 2024; no reference code published): the paper's two normalizations re-derived
densely (rows, then columns; norms detached) with their gradients, the magnitudes' init, the
column-norm property, and the dropout semantics rankwise chose (DoRA/PEFT's)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _dora_helpers import adapter, net, randomize
from torch import nn

import rankwise as rw

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


def _dense_bora(w0, a, b, m_row, m_col, s):
    v = w0 + s * b @ a
    h = (m_row / torch.linalg.norm(v, dim=1).detach())[:, None] * v
    return h * (m_col / torch.linalg.norm(h, dim=0).detach())[None, :]


def test_bora_matches_dense_formula_gradients_and_column_norms():
    torch.manual_seed(2)
    layer = nn.Linear(7, 9).double()
    model = rw.adapt(net(layer), "bora", rank=3, alpha=4.0, targets=["0"], seed=0)
    ad = adapter(model, "0")
    assert rw.parameter_count(model).trainable == 3 * (7 + 9) + 9 + 7
    randomize(ad.parameters(), seed=8, std=0.5)
    with torch.no_grad():
        ad.m_row.abs_()
        ad.m_col.abs_()
    x = torch.randn(4, 7, dtype=torch.float64)
    params = list(ad.parameters())
    w_ref = _dense_bora(layer.weight, ad.lora_A, ad.lora_B, ad.m_row, ad.m_col, ad.scale)
    ref = F.linear(x, w_ref, layer.bias)
    out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    # the defining property: every input column of the adapted weight has norm m_col
    w = layer.weight + ad.delta_weight()
    torch.testing.assert_close(torch.linalg.norm(w, dim=0), ad.m_col.detach(), atol=1e-10, rtol=1e-10)
    for o, r in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)):
        torch.testing.assert_close(o, r, atol=1e-9, rtol=1e-9)
    # the order (rows, then columns) is a choice the docstring states: the other order differs
    with torch.no_grad():
        v = layer.weight + ad.scale * ad.lora_B @ ad.lora_A
        c = v * (ad.m_col / torch.linalg.norm(v, dim=0))[None, :]
        cols_first = c * (ad.m_row / torch.linalg.norm(c, dim=1))[:, None]
        assert (cols_first - w).abs().max() > 1e-3


def test_bora_magnitudes_init_to_row_and_column_norms():
    layer = nn.Linear(6, 4)
    ad = adapter(rw.adapt(net(layer), "bora", rank=2, targets=["0"], seed=0), "0")
    torch.testing.assert_close(ad.m_row, torch.linalg.norm(layer.weight, dim=1))
    torch.testing.assert_close(ad.m_col, torch.linalg.norm(layer.weight, dim=0))


@pytest.mark.parametrize("first", [True, False])
def test_bora_dropout_drops_the_update_input_only(first):
    """``y = W0 x + b + (W − W0) drop(x)`` in training (as the first adapter of the layer, which
    otherwise computes ``W x`` in one product, and after another adapter)."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).double()
    model = net(layer)
    if not first:
        rw.adapt(model, "lora", rank=2, targets=["0"], name="l", seed=1)
    rw.adapt(model, "bora", rank=2, dropout=0.5, targets=["0"], name="b", seed=0)
    rw.set_active(model, ["b"] if first else ["l", "b"])
    ad = model[0].adapters["b"]
    randomize([ad.lora_A, ad.lora_B], seed=3, std=0.5)
    x = torch.randn(8, 6, dtype=torch.float64)
    model.train()
    torch.manual_seed(5)
    out = model(x)
    with torch.no_grad():
        delta = ad.delta_weight()
        others = model[0].adapters["l"].delta_weight() if not first else 0
        torch.manual_seed(5)
        ref = F.linear(x, layer.weight + others, layer.bias) + F.linear(F.dropout(x, 0.5, training=True), delta)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(out, F.linear(x, layer.weight + others + delta, layer.bias))
