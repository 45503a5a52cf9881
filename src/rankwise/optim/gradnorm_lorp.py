"""GradNormLoRP: weight-normalized training with low-rank gradient projection.

Huang, Shen, Zhu, Rudinac & Kanoulas, "Gradient Weight-normalized Low-rank Projection for
Efficient LLM Training", AAAI 2025 (arXiv:2412.19616).

Each weight matrix is trained in the weight-normalized parametrization (Salimans & Kingma, 2016)
``W = diag(g) · V / ‖V‖_row`` — a magnitude ``g_i`` and a direction ``V_i`` per output row, the
``‖·‖_c`` of the paper in torch's ``(out, in)`` layout — which conditions the gradient, and the
direction's gradient is optimized by Adam in a low-rank subspace (GaLore projection):

    V̂ = W / g                                          (current unit rows)
    ∇g = rowsum(G ⊙ V̂)                                 (m numbers)
    ∇V = (g / ‖V‖) ⊙ (G − ∇g ⊙ V̂)                      (the part of G orthogonal to each row)
    R = Pᵀ ∇V  (or ∇V Q),  P refreshed every T steps from ∇V (SVD by default)
    m, v ← Adam moments of R;  mg, vg ← Adam moments of ∇g          (one shared step count)
    V ← V − η_t · α · P m/(√v + ε),   g ← (1 − ηλ) g − η_t · mg/(√vg + ε),   η_t = η √(1−β₂ᵗ)/(1−β₁ᵗ)
    W ← diag(g) · V / ‖V‖_row

``V`` is never stored: ``V = W ⊙ (‖V‖_row / g)`` is rebuilt from the weight and the two row
vectors kept in the state (``wn_mag`` = g, ``wn_vnorm`` = ‖V‖_row), so the state of an ``m × n``
matrix is GaLore's (``2·r·n`` moments + the ``m·r`` basis) plus ``4·m`` numbers. Weight decay acts
on the magnitude (decaying ``W`` is decaying ``g``). Both factors start from ``W₀``
(``g = ‖W₀‖_row``, ``V = W₀``). Other parameters take the plain AdamW step.

Not the authors' code: their ``LowRankWeightNormAdamW`` (GitHub, not on PyPI) keeps a full copy
of ``V``, leaves out the ``−∇g V̂`` term of the direction gradient, and overwrites the learned
magnitude with ``‖V‖`` every step; this file implements the algorithm as the paper states it.
The paper's 8-bit variant is not implemented. ``tests/test_optim_more.py`` re-derives a step with
autograd on the explicit ``(g, V)`` parametrization in float64.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ._common import (
    GROUP_DEFAULTS,
    LowRankOptimizer,
    adam_direction,
    adam_moments_,
    as_matrix,
    check_adam_args,
)

__all__ = ["GradNormLoRP"]


class GradNormLoRP(LowRankOptimizer):
    """AdamW on the weight-normalized ``(g, V)`` parametrization with GaLore-projected ``∇V``.

    Group keys as :class:`rankwise.optim.GaLoreAdamW` (``rank``, ``update_proj_gap``, ``scale``,
    ``proj_type``, ``projector``, ``projector_options``, ``subspace_change``); ``norm_eps`` guards
    rows whose magnitude is 0.
    """

    owner = "GradNormLoRP"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 *, correct_bias: bool = True, rank: int | float | None = None, update_proj_gap: int = 200,
                 scale: float = 1.0, proj_type: str = "std", projector: str = "auto",
                 projector_options: dict | None = None, subspace_change: str = "keep", norm_eps: float = 1e-12):
        check_adam_args(self.owner, lr, betas, eps, weight_decay)
        if not isinstance(norm_eps, (int, float)) or not norm_eps > 0:
            raise ConfigError(f"{self.owner}: norm_eps={norm_eps!r} must be > 0 (guards rows of zero norm).")
        defaults = dict(GROUP_DEFAULTS)
        defaults.update(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                        projector=projector, projector_options=projector_options, subspace_change=subspace_change,
                        adam_style="hf", norm_eps=float(norm_eps))
        super().__init__(params, defaults)

    def _check_group_extra(self, group):
        if group.get("adam_style", "hf") != "hf":
            raise ConfigError(f"{self.owner} param group {group['_index']}: adam_style must be 'hf'.")

    def _low_rank_step(self, p, group, state):
        w = as_matrix(p)
        grad = as_matrix(p.grad)
        work = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
        w, grad = w.to(work), grad.to(work)
        tiny = group["norm_eps"]
        if "step" not in state:
            state["step"] = 0
            norms = w.norm(dim=1)
            state["wn_mag"] = norms.clone()
            state["wn_vnorm"] = norms.clone()
        mag = state["wn_mag"].unsqueeze(1)
        vnorm = state["wn_vnorm"].unsqueeze(1).clamp_min(tiny)
        inv_mag = 1.0 / torch.where(mag.abs() > tiny, mag, torch.full_like(mag, tiny))
        # V̂ = W / g;  ∇g = rowsum(G ⊙ V̂);  ∇V = (g/‖V‖)(G − ∇g V̂) = (g/‖V‖) G − (∇g/‖V‖) W
        grad_mag = (grad * w).sum(dim=1, keepdim=True).mul_(inv_mag)
        grad_v = torch.addcmul(grad * (mag / vnorm), w, grad_mag / vnorm, value=-1.0)

        proj = self.refresh_projector(p, group, state, grad_v)
        low = proj.project(grad_v)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(low)
            state["exp_avg_sq"] = torch.zeros_like(low)
            state["mag_exp_avg"] = torch.zeros_like(state["wn_mag"])
            state["mag_exp_avg_sq"] = torch.zeros_like(state["wn_mag"])
        state["step"] += 1
        t = self.bias_step(state)
        adam_moments_(state["exp_avg"], state["exp_avg_sq"], low, group["betas"], "hf")
        direction, step_size = adam_direction(state["exp_avg"], state["exp_avg_sq"], t, group, "hf")
        # V_new = V − η_t ΔV with V = W ⊙ (‖V‖/g), written into ΔV's buffer
        v = proj.project_back(direction).mul_(-step_size).addcmul_(w, vnorm * inv_mag)

        adam_moments_(state["mag_exp_avg"], state["mag_exp_avg_sq"], grad_mag.squeeze(1), group["betas"], "hf")
        mdir, mstep = adam_direction(state["mag_exp_avg"], state["mag_exp_avg_sq"], t, group, "hf")
        new_mag = state["wn_mag"]
        if group["weight_decay"]:
            new_mag.mul_(1 - group["lr"] * group["weight_decay"])
        new_mag.add_(mdir, alpha=-mstep)
        new_vnorm = v.norm(dim=1)
        state["wn_vnorm"].copy_(new_vnorm)
        torch.mul(v, (new_mag / new_vnorm.clamp_min(tiny)).unsqueeze(1), out=v)
        p.copy_(v.view_as(p))
