"""GradNormLoRP against autograd on the explicit weight-normalized parametrization."""

from __future__ import annotations

import math

import torch

import rankwise.optim as ro


# ---------------------------------------------------------------------------------------- GradNormLoRP
def test_gradnorm_lorp_matches_autograd_on_explicit_weight_norm():
    """The oracle keeps ``g`` and ``V`` explicitly, gets ``∇g, ∇V`` from autograd through
    ``W = g V/‖V‖_row``, projects ``∇V`` on its top-r singular vectors and runs Adam; the optimizer
    keeps only ``W`` and two row vectors. Three steps, refresh every 2, weight decay on ``g``."""
    g = torch.Generator().manual_seed(7)
    m, n, r = 6, 9, 3
    lr, wd, betas, eps = 0.02, 0.05, (0.9, 0.99), 1e-6
    w0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    xs = [torch.randn(n, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    ys = [torch.randn(m, 5, generator=g, dtype=torch.float64) for _ in range(3)]

    def loss_of(w, k):
        return 0.5 * ((w @ xs[k] - ys[k]) ** 2).sum()

    p = torch.nn.Parameter(w0.clone())
    opt = ro.GradNormLoRP([{"params": [p], "rank": r, "update_proj_gap": 2}], lr=lr, betas=betas, eps=eps,
                          weight_decay=wd)
    for k in range(3):
        opt.zero_grad()
        loss_of(p, k).backward()
        opt.step()

    mag = w0.norm(dim=1).clone()
    vdir = w0.clone()
    mv = vv = 0.0
    mg = vg = torch.zeros(m, dtype=torch.float64)
    for k in range(3):
        gm = mag.clone().requires_grad_(True)
        vd = vdir.clone().requires_grad_(True)
        loss_of(gm.unsqueeze(1) * vd / vd.norm(dim=1, keepdim=True), k).backward()
        if k % 2 == 0:
            u = torch.linalg.svd(vd.grad)[0]
            basis = u[:, :r]  # m < n: left projection
        low = basis.t() @ vd.grad
        t = k + 1
        mv = betas[0] * mv + (1 - betas[0]) * low
        vv = betas[1] * vv + (1 - betas[1]) * low * low
        mg = betas[0] * mg + (1 - betas[0]) * gm.grad
        vg = betas[1] * vg + (1 - betas[1]) * gm.grad ** 2
        step = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        vdir = vdir - step * basis @ (mv / (vv.sqrt() + eps))
        mag = mag * (1 - lr * wd) - step * mg / (vg.sqrt() + eps)
    w_ref = mag.unsqueeze(1) * vdir / vdir.norm(dim=1, keepdim=True)
    torch.testing.assert_close(p.detach(), w_ref, rtol=1e-11, atol=1e-12)
    # state: GaLore's (2·r·n moments + m·r basis) plus 4 row vectors
    sb = ro.state_bytes(opt)
    assert sb["total"] == (2 * r * n + m * r + 4 * m) * 8
