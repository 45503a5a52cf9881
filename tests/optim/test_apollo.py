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
from torch import nn

from rankwise.optim import APOLLO, param_groups
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
