"""pego: the forward equals ``F.linear(x, W0 + s Σ_i B_i A_i, b)`` formed densely here, the regularizer equals
the reference code's ``λ Σ_layers [Σ_i ‖W0 ΔW_iᵀ‖_1 + Σ_{i<j} ‖ΔW_i ΔW_jᵀ‖_1]`` with dense ``ΔW_i``, it is 0
at init (``B_i = 0``) and reaches every factor. Registry-wide properties: tests/core/test_method.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankwise as rw
from rankwise.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(9, 7)
        self.fc2 = nn.Linear(7, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _adapt(**kw):
    base = Two()
    model = copy.deepcopy(base)
    kw = {"rank": 2, "alpha": 3.0, "num_loras": 3, **kw}
    rw.adapt(model, "pego", targets=["fc1", "fc2"], seed=0, **kw)
    return base, model


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in ("fc1", "fc2"):
            ad = getattr(model, n).adapters["default"]
            for p in (ad.pego_A, ad.pego_B):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _deltas(model, name):
    """The members' ``ΔW_i = s B_i A_i``, dense, one by one."""
    ad = getattr(model, name).adapters["default"]
    s = 3.0 / 2
    return [s * ad.pego_B[i].detach() @ ad.pego_A[i].detach() for i in range(3)]


def test_init_is_identity_and_regularizer_zero():
    base, model = _adapt(ortho_weight=0.1)
    x = torch.randn(4, 9)
    assert torch.equal(model(x), base(x))
    assert float(rw.rank_regularization(model).detach()) == 0.0
    assert rw.parameter_count(model).trainable == 3 * 2 * (9 + 7) + 3 * 2 * (7 + 4)


def test_forward_equals_dense_sum_of_members():
    base, model = _adapt()
    _perturb(model)
    w1 = base.fc1.weight.detach() + sum(_deltas(model, "fc1"))
    w2 = base.fc2.weight.detach() + sum(_deltas(model, "fc2"))
    x = torch.randn(5, 9, generator=torch.Generator().manual_seed(3))
    want = F.linear(torch.relu(F.linear(x, w1, base.fc1.bias)), w2, base.fc2.bias)
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_regularizer_equals_the_reference_equation():
    base, model = _adapt(ortho_weight=0.01)
    _perturb(model)
    want = 0.0
    for name in ("fc1", "fc2"):
        w0 = getattr(base, name).weight.detach()
        d = _deltas(model, name)
        want += sum((w0 @ d[i].T).abs().sum() for i in range(3))
        want += sum((d[i] @ d[j].T).abs().sum() for i in range(3) for j in range(i + 1, 3))
    reg = rw.rank_regularization(model)
    torch.testing.assert_close(reg, 0.01 * want, atol=1e-4, rtol=1e-5)
    reg.backward()
    for name in ("fc1", "fc2"):
        ad = getattr(model, name).adapters["default"]
        assert ad.pego_A.grad.abs().sum() > 0 and ad.pego_B.grad.abs().sum() > 0
    _, off = _adapt(ortho_weight=0.0)
    assert rw.rank_regularization(off) is None


def test_one_member_has_only_the_preserve_term():
    base = Two()
    model = copy.deepcopy(base)
    rw.adapt(model, "pego", rank=2, num_loras=1, ortho_weight=1.0, targets=["fc1"], seed=0)
    ad = model.fc1.adapters["default"]
    with torch.no_grad():
        ad.pego_B.normal_(generator=torch.Generator().manual_seed(4))
    d = ad.pego_B[0].detach() @ ad.pego_A[0].detach()
    torch.testing.assert_close(rw.rank_regularization(model), (base.fc1.weight.detach() @ d.T).abs().sum())


def test_bad_config_is_refused():
    for kw in ({"num_loras": 0}, {"ortho_weight": -1.0}):
        with pytest.raises(ConfigError):
            _adapt(**kw)
