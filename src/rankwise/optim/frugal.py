"""FRUGAL: full-rank updates with gradient splitting.

Zmushko, Beznosikov, Takáč & Horváth, "FRUGAL: Memory-Efficient Optimization by Reducing State
Overhead for Scalable Training", ICML 2025 (arXiv:2411.07837; official code
github.com/philipzmushko/FRUGAL, not on PyPI).

Each projected matrix's gradient is split into a low-dimensional *state-full* part, optimized by
Adam with moments in the subspace, and the *state-free* residual, optimized by signSGD (or SGD),
so the update stays full-rank while the state is GaLore's:

    g_full = Pᵀ G                  (r × n; or G Q), P from the projector, refreshed every T steps
    g_free = G − P Pᵀ G            (the residual, never stored)
    m, v ← Adam moments of g_full  (reset to 0, with the bias correction restarted, at each refresh:
                                    ``subspace_change="reset"``, FRUGAL's ``reset_statistics=True``)
    W ← (1 − ηλ) W − η_a · P m̂/(√v̂ + ε) − η_f · sign(g_free)

with ``η_a = lr · proj_lr_scale`` and ``η_f = η_a · inactive_lr_scale`` (``inactive_update="sgd"``
uses ``g_free`` itself, ``"none"`` drops it: then FRUGAL is GaLore with reset moments). ``ε`` is
added after the bias correction, and the decay is applied before the update, as in the official
code (``adam_style="torch"``); non-projected parameters take the same AdamW step.

The projector is any kind of :mod:`rankwise.optim.projectors` (``"svd"`` as in the paper's main
results; ``"random"`` is drawn with orthonormal columns here, as FRUGAL's random projection is, so
``P Pᵀ`` is an orthogonal projection and ``g_free`` is exactly the part outside the subspace).
``rank`` may be a fraction of the projected dimension (FRUGAL's ``density``, e.g. 0.25).
At full rank (``r`` = the projected dimension, orthonormal basis) there is no residual and the
state-free step is skipped. FRUGAL's coordinate (RandK) and block (BAdam-style) selections are not
implemented.
State per ``m × n`` matrix: ``2·r·n`` moments and the ``m·r`` basis, as GaLore.
``tests/test_optim_more.py`` re-derives one step densely in float64.
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

__all__ = ["FRUGAL"]

INACTIVE_RULES = ("sign_sgd", "sgd", "none")


class FRUGAL(LowRankOptimizer):
    """FRUGAL(Adam, signSGD): Adam in a projected subspace, signSGD on the residual.

    Group keys (besides AdamW's and the low-rank keys ``rank``, ``update_proj_gap``, ``proj_type``,
    ``projector``): ``inactive_update`` ("sign_sgd" | "sgd" | "none"), ``inactive_lr_scale``,
    ``proj_lr_scale``. Defaults follow the official code: ``eps=1e-8``, ``update_proj_gap=200``,
    moments reset at every refresh.
    """

    owner = "FRUGAL"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 *, correct_bias: bool = True, rank: int | float | None = None, update_proj_gap: int = 200,
                 proj_type: str = "std", projector: str = "auto", projector_options: dict | None = None,
                 subspace_change: str = "reset", inactive_update: str = "sign_sgd", inactive_lr_scale: float = 1.0,
                 proj_lr_scale: float = 1.0):
        check_adam_args(self.owner, lr, betas, eps, weight_decay)
        defaults = dict(GROUP_DEFAULTS)
        defaults.update(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        rank=rank, update_proj_gap=update_proj_gap, scale=1.0, proj_type=proj_type,
                        projector=projector, projector_options=projector_options, subspace_change=subspace_change,
                        adam_style="torch", inactive_update=inactive_update, inactive_lr_scale=inactive_lr_scale,
                        proj_lr_scale=proj_lr_scale)
        super().__init__(params, defaults)

    def _check_group_extra(self, group):
        where = f"{self.owner} param group {group['_index']}"
        if group.get("inactive_update") not in INACTIVE_RULES:
            raise ConfigError(f"{where}: inactive_update={group.get('inactive_update')!r} must be one of "
                              f"{INACTIVE_RULES} (the rule for the gradient outside the subspace).")
        for key in ("inactive_lr_scale", "proj_lr_scale"):
            v = group.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"{where}: {key}={v!r} must be a number >= 0.")
        if group.get("scale", 1.0) != 1.0:
            raise ConfigError(f"{where}: scale={group.get('scale')!r}; FRUGAL has no projection scale, the "
                              "state-full part moves at lr * proj_lr_scale. Leave scale at 1.0.")

    def projector_kwargs(self, p, group, state=None):
        opts = super().projector_kwargs(p, group, state)
        if (group["projector"] if state is None else self.projector_kind(p, group, state)) == "random":
            opts.setdefault("orthonormalize", True)
        return opts

    def _low_rank_step(self, p, group, state):
        if "step" not in state:
            state["step"] = 0
        grad = as_matrix(p.grad)
        proj = self.refresh_projector(p, group, state, grad)
        low = proj.project(grad)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(low)
            state["exp_avg_sq"] = torch.zeros_like(low)
        state["step"] += 1
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        adam_moments_(state["exp_avg"], state["exp_avg_sq"], low, group["betas"], "torch")
        active = dict(group, lr=group["lr"] * group["proj_lr_scale"])
        direction, step_size = adam_direction(state["exp_avg"], state["exp_avg_sq"], self.bias_step(state), active,
                                              "torch")
        rule = group["inactive_update"]
        if rule == "none" or (proj.orthonormal and proj.effective_rank() >= proj.dim):
            # nothing outside the subspace (at full rank the residual is rounding noise, whose sign
            # would move every weight by the full state-free step)
            p.add_(proj.project_back(direction).view_as(p), alpha=-step_size)
            return
        # one back-projection of [direction, low] (P Pᵀ G is needed for the residual anyway)
        cat_dim = 1 if proj.side == "left" else 0
        both = proj.project_back(torch.cat([direction, low], dim=cat_dim))
        update, inside = both.chunk(2, dim=cat_dim)
        free = inside.neg_().add_(grad)                            # G − P Pᵀ G
        lr_free = active["lr"] * group["inactive_lr_scale"]
        p.add_(update.view_as(p), alpha=-step_size)
        p.add_((free.sign_() if rule == "sign_sgd" else free).view_as(p), alpha=-lr_free)
