"""Fira: full-rank training under a low-rank constraint (Chen et al., 2024, arXiv:2410.01623).

GaLore (see :mod:`rankwise.optim.galore`) discards the part of the gradient outside the subspace.
Fira adds it back, rescaled by how much Adam rescaled the subspace part. With the projected
gradient ``R = Pᵀ G`` (left; right is symmetric), the Adam direction ``N = m / (√v + ε)`` in the
subspace, and ``α`` the projector's ``scale``::

    φ_j   = ‖N_{:,j}‖ / (‖R_{:,j}‖ + 1e-8)          column norms (left), row norms (right)
    S     = (G − α P R) · φ                           norm-based scaling of the residual
    S     ← S / max(‖S‖ / (‖S_{t−1}‖ + 1e-8), γ) · γ  norm-growth limiter, γ = 1.01
    W     ← W − lr · √(1−β₂ᵗ)/(1−β₁ᵗ) · (α P N + S),   then  W ← W − lr·λ·W

``‖S_{t−1}‖`` is the limited norm of the previous step (state ``residual_norm``); on the first step
the limiter is off. The residual subtracts ``α P R`` (the projected-back gradient with the scale)
as the reference package ``fira`` 1.0.2 does, so it is the true out-of-subspace residual only for
``α = 1``. State per matrix: GaLore's (moments ``2·r·n`` + projector ``m·r``) plus one scalar.

Param groups and hyperparameters are those of :class:`~rankwise.optim.galore.GaLoreAdamW` plus
``limiter_gamma`` (γ). The oracle test checks the loss trajectory against ``fira.FiraAdamW``.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ._common import apply_update_, as_matrix
from .galore import GaLoreAdamW


class Fira(GaLoreAdamW):
    """GaLore-AdamW plus the norm-scaled out-of-subspace residual and the norm-growth limiter."""

    owner = "Fira"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 *, limiter_gamma: float = 1.01, **kw):
        super().__init__(params, lr, betas, eps, weight_decay, limiter_gamma=limiter_gamma, **kw)

    def _check_group_extra(self, group):
        gamma = group.get("limiter_gamma")
        if not isinstance(gamma, (int, float)) or not gamma >= 1:
            raise ConfigError(f"Fira param group {group['_index']}: limiter_gamma={gamma!r} must be ≥ 1 "
                              "(the largest allowed growth of the residual norm per step).")

    def _low_rank_step(self, p, group, state):
        if "step" not in state:
            state["step"] = 0
        grad = as_matrix(p.grad)
        proj = self.refresh_projector(p, group, state, grad, self.moment_keys)
        low = proj.project(grad)
        direction, step_size = self._adam_low_rank(state, low, group)

        # norm-based scaling: per column (left, low is r×n) or per row (right, low is m×r)
        norm_dim = 0 if direction.shape[0] < direction.shape[1] else 1
        factor = torch.linalg.vector_norm(direction, dim=norm_dim) / (
            torch.linalg.vector_norm(low, dim=norm_dim) + 1e-8)
        if norm_dim == 1:
            factor = factor.unsqueeze(1)
        residual = (grad - proj.project_back(low)) * factor

        # norm-growth limiter
        gamma = group["limiter_gamma"]
        rnorm = torch.linalg.vector_norm(residual)
        if "residual_norm" in state:
            ratio = rnorm / (state["residual_norm"] + 1e-8)
            limiter = torch.where(ratio > gamma, ratio / gamma, torch.ones_like(ratio))
            residual = residual / limiter
            state["residual_norm"] = rnorm / limiter
        else:
            state["residual_norm"] = rnorm

        update = proj.project_back(direction) + residual
        apply_update_(p, update, step_size, group, "after" if group["adam_style"] == "hf" else "before")
