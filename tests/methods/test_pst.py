"""pst: the forward equals ``F.linear(x, Top_k(|W| + A_s B_s + R + C) ⊙ (W0 + s B A), b)`` computed densely
here (float64, so no ties), the score parameters get the straight-through gradient ``∂L/∂S = ∂L/∂W' ⊙ W``,
the sparsity follows the cubic schedule through ``rw.rank_step``, and the init is the base model.
Registry-wide properties: tests/core/test_method.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankwise as rw
from rankwise.errors import ConfigError
from rankwise.methods.pst import cubic_sparsity

pytestmark = pytest.mark.usefixtures("single_thread")


def _model(**kw):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6)).double()
    model = copy.deepcopy(base)
    kw = {"rank": 2, "alpha": 4.0, "score_rank": 3, "sparsity": 0.5, **kw}
    rw.adapt(model, "pst", targets=["0"], seed=0, **kw)
    return base, model, model[0].adapters["default"]


def _perturb(ad, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (ad.lora_A, ad.lora_B, ad.score_A, ad.score_B, ad.score_R, ad.score_C):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def test_init_is_identity_until_pruning_starts():
    base, model, ad = _model()
    x = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(model(x), base(x))
    assert torch.count_nonzero(ad.delta_weight()) == 0
    assert rw.parameter_count(model).trainable == (2 + 3) * (8 + 6) + 8 + 6


def test_forward_and_score_gradients_equal_the_formula():
    base, model, ad = _model()
    ad.finish_warmup()  # final sparsity 0.5
    _perturb(ad)
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = model(x)
    out.square().sum().backward()
    # oracle, transcribed: W = W0 + s B A; S = |W| + A_s B_s + R 1ᵀ + 1 Cᵀ; M = Top_k(S); W' = M ⊙ W
    w0 = base[0].weight.detach()
    w = w0 + 2.0 * ad.lora_B.detach() @ ad.lora_A.detach()
    s = w.abs() + ad.score_A.detach() @ ad.score_B.detach() + ad.score_R.detach()[:, None] + ad.score_C.detach()[None]
    k = 48 - round(0.5 * 48)
    m = torch.zeros(48, dtype=torch.float64)
    m[torch.argsort(s.flatten(), descending=True)[:k]] = 1.0
    m = m.reshape(6, 8).requires_grad_(True)
    want = F.linear(x, m * w, base[0].bias)
    torch.testing.assert_close(out, want)
    assert int(m.sum()) == 24
    want.square().sum().backward()
    g_s = m.grad  # straight-through: ∂L/∂S = ∂L/∂M = ∂L/∂W' ⊙ W
    torch.testing.assert_close(ad.score_R.grad, g_s.sum(1))
    torch.testing.assert_close(ad.score_C.grad, g_s.sum(0))
    torch.testing.assert_close(ad.score_A.grad, g_s @ ad.score_B.detach().T)
    torch.testing.assert_close(ad.score_B.grad, ad.score_A.detach().T @ g_s)


def test_cubic_schedule_through_rank_step():
    assert cubic_sparsity(0, 0.8, 100) == 0.0 and cubic_sparsity(100, 0.8, 100) == 0.8
    assert cubic_sparsity(5, 0.8, 100, warmup=10) == 0.0
    assert cubic_sparsity(3, 0.8, None) == 0.8
    _, model, ad = _model(sparsity=0.8, warmup_steps=2)
    for t in (1, 2, 5, 9, 12):
        info = rw.rank_step(model, t, total_steps=12)
        want = 0.0 if t <= 2 else (0.8 if t >= 12 else 0.8 * (1 - (1 - (t - 2) / (12 - 2)) ** 3))
        assert info["default"]["pst_sparsity"] == pytest.approx(want)
        keep = int(torch.count_nonzero(ad.delta_weight() + model[0].base.weight))
        assert keep == 48 - round(want * 48)


def test_bad_config_is_refused():
    for kw in ({"sparsity": 1.0}, {"score_rank": 0}, {"total_steps": 1, "warmup_steps": 3}):
        with pytest.raises(ConfigError):
            _model(**kw)
