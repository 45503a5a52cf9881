"""sara: the support is the k smallest |W0| entries, the forward equals ``F.linear(x, W0 + P_Ω(δ), b)`` built
densely here, the nuclear-norm term equals ``λ · mean_l ‖P_Ω(W0|_Ω + δ)‖_*`` (singular values of the dense
masked matrix), the progressive step freezes exactly the entries that grew past the threshold, and the
init is the base model. Registry-wide properties: tests/core/test_method.py."""

from __future__ import annotations

import copy
import math

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
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _adapt(fraction=0.25, **kw):
    base = Two()
    model = copy.deepcopy(base)
    rw.adapt(model, "sara", fraction=fraction, targets=["fc1", "fc2"], seed=0, **kw)
    return base, model


def _smallest(w: torch.Tensor, k: int) -> torch.Tensor:
    """The flat positions of the k smallest |w|, in increasing position order (the oracle's own sort)."""
    flat = w.detach().flatten()
    order = sorted(range(flat.numel()), key=lambda i: abs(float(flat[i])))
    return torch.tensor(sorted(order[:k]))


def test_init_is_identity_and_support_is_smallest_magnitudes():
    base, model = _adapt()
    x = torch.randn(4, 8)
    assert torch.equal(model(x), base(x))
    for name in ("fc1", "fc2"):
        w0 = getattr(base, name).weight
        ad = getattr(model, name).adapters["default"]
        k = math.ceil(0.25 * w0.numel())
        assert ad.sara_delta.numel() == k
        assert torch.equal(ad.sara_index, _smallest(w0, k))
        assert torch.count_nonzero(ad.delta_weight()) == 0


def test_forward_equals_dense_formula():
    base, model = _adapt()
    g = torch.Generator().manual_seed(1)
    dense = {}
    for name in ("fc1", "fc2"):
        ad = getattr(model, name).adapters["default"]
        with torch.no_grad():
            ad.sara_delta.copy_(torch.randn(ad.sara_delta.shape, generator=g))
        w = getattr(base, name).weight.detach().clone()
        idx = _smallest(w, ad.sara_delta.numel())
        flat = w.flatten()
        for j, i in enumerate(idx.tolist()):  # W0 + P_Ω(δ), entry by entry
            flat[i] = flat[i] + ad.sara_delta[j].item()
        dense[name] = flat.reshape(w.shape)
    x = torch.randn(3, 8, generator=g)
    want = F.linear(torch.tanh(F.linear(x, dense["fc1"], base.fc1.bias)), dense["fc2"], base.fc2.bias)
    torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-6)


def test_nuclear_term_equals_its_equation_and_reaches_the_values():
    base, model = _adapt(nuclear_weight=0.3)
    g = torch.Generator().manual_seed(2)
    norms = []
    for name in ("fc1", "fc2"):
        ad = getattr(model, name).adapters["default"]
        with torch.no_grad():
            ad.sara_delta.copy_(torch.randn(ad.sara_delta.shape, generator=g))
        w0 = getattr(base, name).weight.detach().double()
        mask = torch.zeros(w0.numel(), dtype=torch.float64)
        mask[_smallest(w0, ad.sara_delta.numel())] = 1.0
        mask = mask.reshape(w0.shape)
        trained = w0 + ad.delta_weight().detach().double()  # W0 + P_Ω(δ)
        norms.append(torch.linalg.svdvals(trained * mask).sum())  # ‖M ⊙ W‖_* = Σ σ
    reg = rw.rank_regularization(model)
    torch.testing.assert_close(reg.double(), 0.3 * torch.stack(norms).mean(), atol=1e-5, rtol=1e-5)
    reg.backward()
    assert all(getattr(model, n).adapters["default"].sara_delta.grad.abs().sum() > 0 for n in ("fc1", "fc2"))
    _, off = _adapt(nuclear_weight=0.0)
    assert rw.rank_regularization(off) is None


def test_progressive_step_freezes_entries_past_the_threshold():
    base, model = _adapt(progressive_step=3)
    ad = model.fc1.adapters["default"]
    w0 = base.fc1.weight.detach().flatten()[ad.sara_index]
    tau = w0.abs().max()
    with torch.no_grad():  # half the entries jump far past τ, the rest stay below it
        big = torch.arange(ad.sara_delta.numel()) % 2 == 0
        ad.sara_delta.copy_(torch.where(big, 10 * tau + 1.0, torch.zeros(())))
    before = ad.delta_weight().detach().clone()
    assert rw.rank_step(model, 2) == {}  # not yet
    info = rw.rank_step(model, 3)
    assert info["default"]["sara_support"] == sum(
        getattr(model, n).adapters["default"].sara_index.numel() for n in ("fc1", "fc2"))
    assert torch.equal(ad.sara_active, ~big)
    assert torch.equal(ad.delta_weight(), before)  # frozen entries keep their trained value
    with torch.no_grad():
        ad.sara_delta.add_(5.0)  # moving δ now changes only the still-active entries
    moved = (ad.delta_weight() - before).flatten()[ad.sara_index]
    assert torch.all(moved[big] == 0) and torch.all(moved[~big] == 5.0)
    model(torch.randn(2, 8)).sum().backward()
    assert torch.all(ad.sara_delta.grad[big] == 0)


def test_progressive_step_defaults_to_half_the_loop():
    _, model = _adapt()
    assert rw.rank_step(model, 5, total_steps=10)["default"]["sara_reselected"] >= 0
    assert rw.rank_step(model, 4, total_steps=10) == {}


def test_bad_config_is_refused():
    for kw in ({"fraction": 0.0}, {"fraction": 1.5}, {"nuclear_weight": -1.0}, {"progressive_step": -2}):
        with pytest.raises(ConfigError):
            _adapt(**kw)
