"""FLoRA (Tucker over the weight's own modes): Tucker reconstruction by explicit outer products,
the convolution with W0 + ΔW, parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _factored_helpers import ATOL, _perturb
from torch import nn

import rankwise as rw

pytestmark = pytest.mark.usefixtures("single_thread")


def _tucker_by_sums(core, factors):
    """Σ_{idx} G[idx] · U_0[:, i0] ∘ U_1[:, i1] ∘ … — the Tucker reconstruction by explicit outer products."""
    out = torch.zeros(*[f.shape[0] for f in factors], dtype=core.dtype)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in core.shape]).reshape(-1, core.dim()).tolist():
        term = core[tuple(idx)]
        vecs = [f[:, i] for f, i in zip(factors, idx)]
        outer = vecs[0]
        for vec in vecs[1:]:
            outer = torch.tensordot(outer, vec, dims=0)
        out += term * outer
    return out


def test_flora_conv2d_is_tucker_of_the_kernel_tensor():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(5, 6, (3, 2), stride=2, padding=1, padding_mode="circular"))
    rw.adapt(net, "flora_tucker", rank=3, kernel_rank=2, scale=0.5, targets=["0"], seed=0)
    layer = net[0]
    ad = layer.adapters["default"]
    assert tuple(ad.flora_G.shape) == (3, 3, 2, 2)
    assert [tuple(f.shape) for f in ad.factors] == [(6, 3), (5, 3), (3, 2), (2, 2)]
    _perturb(ad.parameters(), seed=1)
    dense = 0.5 * _tucker_by_sums(ad.flora_G.detach(), [f.detach() for f in ad.factors])
    torch.testing.assert_close(layer.delta_weight(), dense, atol=1e-6, rtol=0)
    # the defining property: each mode unfolding of ΔW has rank ≤ that mode's Tucker rank
    for mode, r in enumerate((3, 3, 2, 2)):
        unfold = torch.movedim(dense, mode, 0).reshape(dense.shape[mode], -1)
        assert torch.linalg.matrix_rank(unfold) <= r
    # and the activation view is the convolution with W0 + ΔW (circular padding, stride 2)
    x = torch.randn(2, 5, 9, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), layer.base.weight + dense, layer.base.bias, stride=2)
        torch.testing.assert_close(layer(x), ref, atol=ATOL, rtol=ATOL)
    n = rw.get_method("flora_tucker").num_params(layer.view, ad.config)
    assert n == 3 * 3 * 2 * 2 + 6 * 3 + 5 * 3 + 3 * 2 + 2 * 2 == rw.parameter_count(net).trainable


def test_flora_linear_counts_and_kernel_rank_default():
    lin = nn.Sequential(nn.Linear(10, 7))
    rw.adapt(lin, "flora_tucker", rank=4, targets=["0"], seed=0)
    assert rw.parameter_count(lin).trainable == 4 * 4 + 7 * 4 + 10 * 4
    conv = nn.Sequential(nn.Conv1d(3, 4, 5))
    rw.adapt(conv, "flora_tucker", rank=8, targets=["0"], seed=0)  # ranks clamp to the modes: 4, 3, k=5
    ad = conv[0].adapters["default"]
    assert tuple(ad.flora_G.shape) == (4, 3, 5)
    assert rw.parameter_count(conv).trainable == 4 * 3 * 5 + 4 * 4 + 3 * 3 + 5 * 5


def test_flora_tucker_registered_with_docs():
    doc = __import__("rankwise.methods.flora_tucker", fromlist=["_"]).__doc__
    assert "arXiv" in doc and "Parameters" in doc
    cls = rw.get_method("flora_tucker")
    assert cls.summary and cls.default_lr > 0
