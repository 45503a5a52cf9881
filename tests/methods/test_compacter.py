"""Compacter: ΔW as a sum of Kronecker products (torch.kron), rules shared by every layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _factored_helpers import ATOL, _layers, _perturb
from torch import nn

import rankwise as rw

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("shape", [(8, 12), (7, 10)])  # divisible by n = 4, and padded/cropped
def test_compacter_is_a_sum_of_kronecker_products(shape):
    n_out, n_in = shape
    net = nn.Sequential(nn.Linear(n_in, n_out))
    rw.adapt(net, "compacter", phm_dim=4, phm_rank=2, targets=["0"], seed=0)
    ad = net[0].adapters["default"]
    _perturb(ad.parameters(), seed=4)
    a, s, t = ad.rules.phm_rule.detach(), ad.compacter_S.detach(), ad.compacter_T.detach()
    dense = sum(torch.kron(a[i], s[i] @ t[i].t()) for i in range(4))[:n_out, :n_in]
    torch.testing.assert_close(net[0].delta_weight(), dense, atol=1e-6, rtol=0)
    x = torch.randn(3, 5, n_in, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(x), F.linear(x, net[0].base.weight + dense, net[0].base.bias),
                                   atol=ATOL, rtol=ATOL)
    p, q = -(-n_out // 4), -(-n_in // 4)
    assert rw.parameter_count(net).trainable == 4 ** 3 + 4 * 2 * (p + q)


def test_compacter_rules_shared_by_layers_of_every_shape(bert):
    model = bert()
    rw.adapt(model, "compacter", phm_dim=4, phm_rank=1, seed=0)  # all-linear: 32x32, 64x32 and 32x64 layers
    layers = _layers(model)
    rules = {id(layer.adapters["default"].rules.phm_rule) for layer in layers.values()}
    assert len(rules) == 1
    own = sum(4 * 1 * (-(-layer.view.out_features // 4) + -(-layer.view.in_features // 4))
              for layer in layers.values())
    assert rw.parameter_count(model).trainable == 4 ** 3 + own


def test_compacter_registered_with_docs():
    doc = __import__("rankwise.methods.compacter", fromlist=["_"]).__doc__
    assert "arXiv" in doc and "Parameters" in doc
    cls = rw.get_method("compacter")
    assert cls.summary and cls.default_lr > 0


def _reference_phm_linear(x, phm_rule, w_left, w_right):
    """The authors' factorized ``PHMLinear.forward`` (github.com/rabeehk/compacter,
    ``seq2seq/hypercomplex/layers.py``, ``kronecker.py``), transcribed, bias 0: ``W = bmm(W_left, W_right)``,
    ``H = Σ_i kron(phm_rule_i, W_i)`` by their batched einsum, ``y = x @ H``."""
    w = torch.bmm(w_left, w_right)
    a, b = phm_rule, w
    h = torch.einsum("bac,bkp->bakcp", a, b).reshape(a.size(0), a.size(1) * b.size(1), a.size(2) * b.size(2)).sum(0)
    return torch.matmul(x, h)


def test_compacter_is_the_authors_phm_layer_on_delta_w():
    """ΔW is the reference's PHM weight ``H`` (in × out) transposed, with ``phm_rule_i = A_iᵀ``,
    ``W_left_i = T_i`` and ``W_right_i = S_iᵀ``; the init is rankwise's stated choice (rule std 1/√n, not
    the reference's 0.01; S = 0 so the adapted model is the base)."""
    n, r = 4, 2
    net = nn.Sequential(nn.Linear(16, 12))
    rw.adapt(net, "compacter", phm_dim=n, phm_rank=r, targets=["0"], seed=0)
    ad = net[0].adapters["default"]
    assert torch.count_nonzero(ad.compacter_S) == 0
    _perturb(ad.parameters(), seed=4)
    a, s, t = ad.rules.phm_rule.detach(), ad.compacter_S.detach(), ad.compacter_T.detach()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    ref = _reference_phm_linear(x, a.transpose(1, 2), t, s.transpose(1, 2))
    with torch.no_grad():
        torch.testing.assert_close(net(x) - net[0].base(x), ref, atol=1e-5, rtol=1e-5)
    big = rw.adapt(nn.Sequential(nn.Linear(16, 16)), "compacter", phm_dim=8, targets=["0"], seed=0)
    rule = big[0].adapters["default"].rules.phm_rule.detach()
    assert abs(rule.std() - 8 ** -0.5) < 0.2 * 8 ** -0.5  # N(0, 1/n): the stated choice, 35x the reference's 0.01
