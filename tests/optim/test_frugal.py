"""FRUGAL against a dense float64 re-derivation of its state-full/state-free split."""

from __future__ import annotations

import pytest
import torch
from _optim_helpers import _trajectory

import rankwise.optim as ro


# ---------------------------------------------------------------------------------------- FRUGAL
def _adam_torch(m, v, g, t, lr, betas, eps):
    m = betas[0] * m + (1 - betas[0]) * g
    v = betas[1] * v + (1 - betas[1]) * g * g
    upd = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    return m, v, lr * upd


@pytest.mark.parametrize("shape,rule", [((6, 10), "sign_sgd"), ((10, 6), "sign_sgd"), ((6, 10), "sgd")])
def test_frugal_matches_dense_rederivation(shape, rule):
    """Three steps with refreshes at 0 and 2 (moments reset there): SVD subspace Adam + signSGD residual."""
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    lr, wd, betas, eps, r = 0.01, 0.1, (0.9, 0.999), 1e-8, 2
    p = torch.nn.Parameter(w0.clone())
    opt = ro.FRUGAL([{"params": [p], "rank": r, "update_proj_gap": 2}], lr=lr, weight_decay=wd, betas=betas,
                    eps=eps, inactive_update=rule, inactive_lr_scale=0.5)
    for gr in grads:
        p.grad = gr.clone()
        opt.step()

    w = w0.clone()
    left = shape[0] < shape[1]
    for k, gr in enumerate(grads):
        if k % 2 == 0:  # refresh: top-r singular vectors of the current gradient, moments reset
            u, _, vh = torch.linalg.svd(gr)
            basis = u[:, :r] if left else vh[:r].t()
            m = v = 0.0
            t = 0
        low = basis.t() @ gr if left else gr @ basis
        t += 1
        m, v, upd = _adam_torch(m, v, low, t, lr, betas, eps)
        inside = basis @ low if left else low @ basis.t()
        resid = gr - inside
        w = w * (1 - lr * wd) - (basis @ upd if left else upd @ basis.t())
        w = w - 0.5 * lr * (resid.sign() if rule == "sign_sgd" else resid)
    torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-13)


def test_frugal_full_rank_svd_has_no_residual_and_trains(single_thread, llama):
    """At full rank ``G − P Pᵀ G = 0``: signSGD and SGD on the residual change nothing (the sign of the
    rounding noise must not move the weights), so every rule equals inactive_update='none'."""
    g = torch.Generator().manual_seed(6)
    w0 = torch.randn(5, 8, generator=g, dtype=torch.float64)
    grads = [torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    outs = []
    for rule in ("sign_sgd", "sgd", "none"):
        p = torch.nn.Parameter(w0.clone())
        opt = ro.FRUGAL([{"params": [p], "rank": 5}], lr=0.01, inactive_update=rule)
        for gr in grads:
            p.grad = gr.clone()
            opt.step()
        outs.append(p.detach())
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)
    torch.testing.assert_close(outs[1], outs[2], rtol=0, atol=0)
    losses, _, _ = _trajectory(llama,
                               lambda m: ro.FRUGAL(ro.param_groups(m, rank=0.25, update_proj_gap=10, targets="all"),
                                                   lr=1e-2),
                               steps=20)
    assert losses[-1] < losses[0] - 0.1
