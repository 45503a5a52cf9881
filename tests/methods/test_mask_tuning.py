"""mask_tuning: the forward equals ``F.linear(x, W0 ⊙ 1[M > α], b)`` built here, the scores' gradient is the
straight-through estimate ``∂L/∂W ⊙ W0`` (a dense re-computation with the mask as a leaf), the gradient
dropout multiplies it by the Bernoulli draw of the equation, eval mode is unaffected, and the init is the
base model. Registry-wide properties: tests/core/test_method.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankwise as rw
from rankwise.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


def _model(**kw):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(7, 5))
    model = copy.deepcopy(base)
    rw.adapt(model, "mask_tuning", targets=["0"], seed=0, **kw)
    return base, model, model[0].adapters["default"]


def _scatter_scores(ad, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # scores on both sides of α = 5e-3
        ad.mask_scores.copy_(torch.rand(ad.mask_scores.shape, generator=g) * 2e-2 - 5e-3)


def test_init_is_identity():
    base, model, ad = _model()
    x = torch.randn(3, 7)
    assert torch.equal(model(x), base(x))
    assert torch.count_nonzero(ad.delta_weight()) == 0
    assert rw.parameter_count(model).trainable == 35


def test_forward_and_straight_through_gradient_equal_the_formula():
    base, model, ad = _model()
    _scatter_scores(ad)
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(2))
    out = model(x)
    out.square().sum().backward()
    # oracle: the binary mask as a leaf, W = W0 ⊙ M_bin
    m_bin = (ad.mask_scores.detach() > 5e-3).float().requires_grad_(True)
    w0 = base[0].weight.detach()
    want = F.linear(x, w0 * m_bin, base[0].bias)
    torch.testing.assert_close(out, want)
    assert 0 < int(m_bin.sum()) < m_bin.numel()
    want.square().sum().backward()
    torch.testing.assert_close(ad.mask_scores.grad, m_bin.grad)  # ∂L/∂M := ∂L/∂M_bin = ∂L/∂W ⊙ W0


def test_gradient_dropout_is_a_bernoulli_keep_mask_on_the_score_gradient():
    base, model, ad = _model(grad_dropout=0.4)
    _scatter_scores(ad)
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(3))
    model.train()
    torch.manual_seed(11)
    model(x).square().sum().backward()
    torch.manual_seed(11)
    keep = torch.rand(ad.mask_scores.shape) >= 0.4  # ξ ~ Bernoulli(1 − p), drawn in forward
    m_bin = (ad.mask_scores.detach() > 5e-3).float().requires_grad_(True)
    F.linear(x, base[0].weight.detach() * m_bin, base[0].bias).square().sum().backward()
    torch.testing.assert_close(ad.mask_scores.grad, m_bin.grad * keep)
    assert 0 < int(keep.sum()) < keep.numel()
    # eval mode: no dropout, the plain straight-through gradient
    ad.mask_scores.grad = None
    model.eval()
    model(x).square().sum().backward()
    torch.testing.assert_close(ad.mask_scores.grad, m_bin.grad)


def test_merge_zeroes_the_masked_weights():
    base, model, ad = _model()
    _scatter_scores(ad)
    m_bin = ad.mask_scores.detach() > 5e-3
    rw.merge(model)
    assert torch.equal(model[0].base.weight, base[0].weight.detach() * m_bin)
    rw.unmerge(model)
    assert torch.equal(model[0].base.weight, base[0].weight)


def test_bad_config_is_refused():
    for kw in ({"init": 1e-3}, {"grad_dropout": 1.0}, {"threshold": float("nan")}):
        with pytest.raises(ConfigError):
            _model(**kw)
