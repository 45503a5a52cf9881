"""APOLLO with every projector kind on its default options.

Oracle for the SVD-based kinds: the paper's first step written out densely here (Zhu et al.,
arXiv:2412.05270, Alg. 1, channel-wise scaling, as the rankwise docstring states it): with the
projection ``R = G Q`` (``Q`` the top-r right singular vectors of ``G``, for ``m ≥ n``) or
``R = Pᵀ G`` (``m < n``), Adam's first step ``Ñ = m₁/(√v₁ + ε)``, the channel factors
``s_c = ‖Ñ_c‖ / (‖R_c‖ + 1e-8)`` over the unprojected side, and
``W₁ = W₀ − lr·√(1−β₂)/(1−β₁) · √α · G ⊙ s`` (no norm-growth limiting at the first step).
``online_pca`` starts from the same SVD basis, so its first step is the same.
"""

from __future__ import annotations

import math

import pytest
import torch
from _optim_helpers import _max_rel, _trajectory
from torch import nn

import rankwise.optim as ro
from rankwise.optim import APOLLO, param_groups
from rankwise.optim._common import RECIPE_TARGETS
from rankwise.optim.projectors import KINDS

LR, RANK = 1e-2, 4


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 16)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(48, 32, generator=g, dtype=torch.float64), torch.randn(48, 16, generator=g,
                                                                               dtype=torch.float64)


def _loss(model, x, y):
    return (model(x) - y).pow(2).mean()


def _apollo_first_step(w, g, rank, lr, betas=(0.9, 0.999), eps=1e-6, alpha=1.0):
    b1, b2 = betas
    m, n = g.shape
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    if m >= n:  # right projection, channels are rows
        r = g @ vh[:rank].T
        dim = 1
    else:
        r = u[:, :rank].T @ g
        dim = 0
    m1, v1 = (1 - b1) * r, (1 - b2) * r * r
    n1 = m1 / (v1.sqrt() + eps)
    s = n1.norm(dim=dim, keepdim=True) / (r.norm(dim=dim, keepdim=True) + 1e-8)
    return w - lr * math.sqrt(1 - b2) / (1 - b1) * math.sqrt(alpha) * g * s


@pytest.mark.parametrize("kind", KINDS)
def test_apollo_every_projector_kind_steps_on_default_options(kind, single_thread):
    """The constructor's projector (and a group that overrides it) work with no projector_options:
    only the seeded kinds get apollo-torch's default seed."""
    x, y = _data()
    for how in ("constructor", "group"):
        model = _model()
        if how == "constructor":
            opt = APOLLO(param_groups(model, rank=RANK, update_proj_gap=5), lr=LR, projector=kind)
        else:
            opt = APOLLO(param_groups(model, rank=RANK, update_proj_gap=5, projector=kind), lr=LR)
        assert opt.param_groups[-1]["projector"] == kind
        w0 = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
        loss = _loss(model, x, y)
        loss.backward()
        grads = [model[0].weight.grad.clone(), model[2].weight.grad.clone()]
        opt.step()
        opt.zero_grad()
        if kind in ("svd", "online_pca"):
            for lin, w, g in zip((model[0], model[2]), w0, grads):
                torch.testing.assert_close(lin.weight.detach(), _apollo_first_step(w, g, RANK, LR),
                                           rtol=1e-10, atol=1e-12)
        losses = [loss.item()]
        for _ in range(14):
            loss = _loss(model, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert losses[-1] < 0.9 * losses[0], (kind, how, losses)


# ---------------------------------------------------------------------------------------- APOLLO
@pytest.mark.parametrize("mini", [False, True], ids=["apollo", "apollo_mini"])
def test_apollo_matches_apollo_torch(single_thread, mini, llama):
    """50 steps, same param groups and seeds, refreshes every 10 steps, weight decay: the same losses."""
    from apollo_torch import APOLLOAdamW

    rank, scale, scale_type = (1, 128.0, "tensor") if mini else (4, 2.0, "channel")

    def reference(model):
        groups = ro.param_groups(model, rank=rank, update_proj_gap=10, scale=scale)
        groups[-1].update(proj="random", scale_type=scale_type, proj_type="std")
        return APOLLOAdamW(groups, lr=1e-2, weight_decay=0.01)

    def ours(model):
        groups = ro.param_groups(model, rank=rank, update_proj_gap=10, scale=scale)
        if mini:
            return ro.APOLLOMini(groups, lr=1e-2, weight_decay=0.01)
        return ro.APOLLO(groups, lr=1e-2, weight_decay=0.01, scale_type="channel")

    ref, _, _ = _trajectory(llama, reference)
    got, model, opt = _trajectory(llama, ours)
    assert ref[-1] < ref[0] - 0.3  # it trains
    assert _max_rel(got, ref) < 1e-9
    # the random projection is regenerated, not stored: state = 2 moments + one norm per matrix
    sb = ro.state_bytes(opt, model)
    for name, p in ro.matrix_parameters(model, targets=RECIPE_TARGETS):  # param_groups' default
        m, n = p.shape
        low = rank * n if m < n else m * rank
        assert sb[f"{name}.exp_avg"] + sb[f"{name}.exp_avg_sq"] == 2 * low * 8
        assert sb[f"{name}.scaled_grad"] == 8
        assert f"{name}.proj_basis" not in sb


def test_apollo_stored_projection_and_scale_front(single_thread, llama):
    """``store_projection`` changes memory, not the trajectory; ``scale_front`` matches apollo-torch."""
    from apollo_torch import APOLLOAdamW

    def reference(model):
        groups = ro.param_groups(model, rank=4, update_proj_gap=7, scale=4.0)
        groups[-1].update(proj="random", scale_type="channel", proj_type="std")
        return APOLLOAdamW(groups, lr=5e-3, scale_front=True)

    def ours(store):
        return lambda model: ro.APOLLO(ro.param_groups(model, rank=4, update_proj_gap=7, scale=4.0), lr=5e-3,
                                       scale_front=True, store_projection=store)

    ref, _, _ = _trajectory(llama, reference, steps=20)
    a, _, _ = _trajectory(llama, ours(False), steps=20)
    b, model, opt = _trajectory(llama, ours(True), steps=20)
    assert _max_rel(a, ref) < 1e-9 and _max_rel(b, ref) < 1e-9
    assert any(k.endswith("proj_basis") for k in ro.state_bytes(opt, model))
