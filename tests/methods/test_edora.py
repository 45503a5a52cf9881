"""edora (Nasiri & Garraghan 2025): the authors' ``forward_edora`` re-derived densely
(``W0 + s·B R A`` with ``B = U_r``, ``A = diag(S_r) V_rᵀ``, norm detached), truncated-SVD factors
checked by Eckart–Young, and the exact identity at ``init_std = 0``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _dora_helpers import adapter, net, randomize
from torch import nn

import rankwise as rw

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


def test_edora_factors_are_truncated_svd_and_only_core_and_magnitude_train():
    torch.manual_seed(0)
    layer = nn.Linear(12, 9)
    model = rw.adapt(net(layer), "edora", rank=4, targets=["0"], seed=0)
    ad = adapter(model, "0")
    w = layer.weight.detach().double()
    s = torch.linalg.svdvals(w)
    b, a = ad.edora_B.double(), ad.edora_A.double()
    torch.testing.assert_close(b.t() @ b, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)  # orthonormal U_r
    # Eckart–Young: ‖W0 − B A‖_F² = Σ_{j>r} σ_j² (B A is the best rank-r approximation)
    torch.testing.assert_close(torch.linalg.norm(w - b @ a) ** 2, (s[4:] ** 2).sum(), atol=1e-4, rtol=1e-4)
    assert {n for n, p in ad.named_parameters()} == {"edora_R", "magnitude"}
    assert rw.parameter_count(model).trainable == 4 * 4 + 9  # r² + out
    assert ad.edora_R.abs().max() < 1e-4  # N(0, 1e-5²)
    torch.testing.assert_close(ad.magnitude, torch.linalg.norm(layer.weight, dim=1), atol=1e-6, rtol=1e-6)


def _dense_edora(layer, ad, x):
    v = layer.weight + ad.scale * ad.edora_B @ ad.edora_R @ ad.edora_A
    w = (ad.magnitude / torch.linalg.norm(v, dim=1).detach())[:, None] * v
    return F.linear(x, w, layer.bias)


def test_edora_matches_dense_formula_and_gradients():
    torch.manual_seed(1)
    layer = nn.Linear(10, 8).double()
    model = rw.adapt(net(layer), "edora", rank=3, alpha=6.0, targets=["0"], seed=0)
    ad = adapter(model, "0")
    randomize(ad.parameters(), seed=5, std=0.5)
    x = torch.randn(5, 10, dtype=torch.float64)
    ref = _dense_edora(layer, ad, x)
    out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    go = torch.autograd.grad(out.square().sum(), [ad.edora_R, ad.magnitude])
    gr = torch.autograd.grad(ref.square().sum(), [ad.edora_R, ad.magnitude])
    for o, r in zip(go, gr):
        torch.testing.assert_close(o, r, atol=1e-10, rtol=1e-10)


def test_edora_dropout_is_doras():
    """Dropout (DoRA/PEFT's semantics): ``y = W0 x + b + (g−1)⊙W0 drop(x) + g⊙s·B R A drop(x)``."""
    torch.manual_seed(1)
    layer = nn.Linear(10, 8).double()
    model = rw.adapt(net(layer), "edora", rank=3, dropout=0.5, targets=["0"], seed=0)
    ad = adapter(model, "0")
    randomize(ad.parameters(), seed=5, std=0.5)
    x = torch.randn(5, 10, dtype=torch.float64)
    model.train()
    torch.manual_seed(3)
    out = model(x)
    with torch.no_grad():
        v = layer.weight + ad.scale * ad.edora_B @ ad.edora_R @ ad.edora_A
        g = ad.magnitude / torch.linalg.norm(v, dim=1)
        torch.manual_seed(3)
        xd = F.dropout(x, 0.5, training=True)
        ref = F.linear(x, layer.weight, layer.bias) + F.linear(xd, g[:, None] * v - layer.weight)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_edora_zero_init_std_is_identity():
    layer = nn.Linear(6, 5)
    model = rw.adapt(net(copy.deepcopy(layer)), "edora", rank=2, init_std=0.0, targets=["0"], seed=0)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(model(x), layer(x))
