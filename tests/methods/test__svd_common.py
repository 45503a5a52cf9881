"""``methods/_svd_common.py`` (the SVD factors, Cayley rotations) and the helpers the SVD-family test
files share (``test_lora_xs.py``, ``test_salt.py``, … import them from here).

None of the family is in PEFT 0.21, so the oracles are closed forms and dense re-derivations from an
independent float64 decomposition of the base weight (``torch.linalg.svd`` / ``lu`` computed in the
tests, never the adapters' own buffers), and the authors' reference code transcribed into the tests.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core.layers import LayerView
from rankwise.methods._svd_common import cayley, weight_svd

pytestmark = pytest.mark.usefixtures("single_thread")


class Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def linear_net(n_out: int, n_in: int, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(nn.Linear(n_in, n_out))


def adapt_layer(net, method, seed=0, **kw):
    rw.adapt(net, method, targets=["layer"], seed=seed, **kw)
    return net.layer.adapters["default"]


def nudge(params, seed, std=0.3):
    """Add seeded N(0, std²) noise to every tensor of ``params`` (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def w_adapted(net) -> torch.Tensor:
    """``W0 + ΔW`` of the adapted layer as float64 ``(out, in)``."""
    layer = net.layer
    return (layer.base.weight + layer.delta_weight()).detach().double()


def svd64(w: torch.Tensor):
    return torch.linalg.svd(w.detach().double(), full_matrices=False)


def canonical_svd64(w: torch.Tensor):
    """float64 thin SVD with the sign convention rankwise documents (the largest-magnitude entry of
    every left singular vector positive), for oracles that depend on the vectors' signs."""
    u, s, vt = svd64(w)
    sign = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True)))[0]
    return u * sign, s, vt * sign[:, None]


def x_of(n_in, seed=1, rows=5):
    return torch.randn(rows, n_in, generator=torch.Generator().manual_seed(seed))


def finish_warmups(model):
    for m in model.modules():
        for ad in getattr(m, "adapters", {}).values():
            ad.finish_warmup()


def check_gpt2_merge(method, make_gpt2, token_batch, **kw):
    """Merged logits equal unmerged ones on GPT-2's HF Conv1D layers; unmerge restores them."""
    model = make_gpt2(seed=0)
    rw.adapt(model, method, targets=["c_attn", "c_fc"], seed=0, **kw)
    finish_warmups(model)
    nudge([p for p in model.parameters() if p.requires_grad], 11, std=0.05)
    with torch.no_grad():
        unmerged = model(**token_batch).logits
        rw.merge(model)
        merged = model(**token_batch).logits
        rw.unmerge(model)
        again = model(**token_batch).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, unmerged, atol=1e-4, rtol=1e-4)


def check_short_training(method, lr=1e-2, **kw):
    """Student–teacher regression: the teacher is the same method with perturbed parameters
    (merged into a plain layer), so the target is reachable; a short Adam run must close most of
    the gap from the base layer."""
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    teacher = Net(copy.deepcopy(base))
    adapt_layer(teacher, method, **kw)
    finish_warmups(teacher)
    nudge([p for p in teacher.parameters() if p.requires_grad], 12, std=0.1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 16, generator=g)
    with torch.no_grad():
        y = teacher(x)
    net = Net(copy.deepcopy(base))
    adapt_layer(net, method, **kw)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    net.train()
    losses = []
    for _ in range(80):
        loss = (net(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1e-4, "the teacher should differ from the base layer"
    assert losses[-1] < 0.05 * losses[0], losses[::10]


def check_param_count(method, m, n, expected, **kw):
    net = linear_net(m, n)
    ad = adapt_layer(net, method, **kw)
    assert rw.parameter_count(net).trainable == expected, (method, kw)
    assert type(ad).num_params(net.layer.view, ad.config) == expected, (method, kw)


# ---- tests of _svd_common ----------------------------------------------------------------------------
@pytest.mark.parametrize("m,n", [(7, 11), (11, 7)])
def test_weight_svd_reconstructs_w0_with_canonical_signs(m, n):
    torch.manual_seed(0)
    layer = nn.Linear(n, m)
    u, s, vt = weight_svd(LayerView(layer, "x"))
    torch.testing.assert_close((u * s) @ vt, layer.weight.detach(), atol=1e-5, rtol=1e-5)
    ref_u, ref_s, _ = canonical_svd64(layer.weight)
    torch.testing.assert_close(s.double(), ref_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u.double(), ref_u, atol=1e-5, rtol=1e-5)
    top = weight_svd(LayerView(layer, "x"), 3)
    assert [t.shape for t in top] == [(m, 3), (3,), (3, n)]


def test_cayley_is_a_rotation_and_identity_at_zero():
    free = torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = cayley(free, 5)
    torch.testing.assert_close(r.T @ r, torch.eye(5, dtype=torch.float64))
    assert torch.linalg.det(r).item() == pytest.approx(1.0)
    # (I − Q)⁻¹ (I + Q) with Q skew from the strict upper triangle, written out densely
    q = torch.zeros(5, 5, dtype=torch.float64)
    iu = torch.triu_indices(5, 5, 1)
    q[iu[0], iu[1]] = free
    q = q - q.T
    eye = torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(r, torch.linalg.inv(eye - q) @ (eye + q))
    assert torch.equal(cayley(torch.zeros(10), 5), torch.eye(5))
