"""APOLLO and APOLLO-Mini: SGD-like memory, AdamW-level performance.

Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025 (arXiv:2412.05270).
Reference implementation: ``apollo-torch`` 1.0.3 on PyPI (``apollo_torch.APOLLOAdamW``).

AdamW's element-wise learning rate is replaced by a *structured* one (per channel, or per
tensor) estimated in a random low-rank auxiliary space. For ``W ∈ R^{m×n}`` with gradient ``G``:

    R   = Pᵀ G   (r × n, when m < n)   or   G Pᵀ  (m × r, when m ≥ n)     P ~ N(0, 1/r), resampled
                                                                        every T steps from a seed
    m, v ← Adam moments of R;   Ñ = m̂ / (√v̂ + ε)                      (state: 2·r·n, not 2·m·n)
    s_c = ‖Ñ_{:,c}‖ / (‖R_{:,c}‖ + 1e-8)  for each channel c (the unprojected side; "channel")
    s   = ‖Ñ‖ / (‖R‖ + 1e-8)                                           (one number; "tensor")
    U   = √α · G ⊙ s                                                  (α = ``scale``)
    U   ← U / max(1, ‖U‖ / (1.01 γ_{t-1})),   γ_t = ‖U‖               (Fira's norm-growth limiter)
                                      (U is never formed: ‖U‖ comes from the channel norms of G, and
                                       the update is one fused W ← W − η_t·G⊙(√α·s/limiter))
    W   ← W − lr · √(1−β₂ᵗ)/(1−β₁ᵗ) · U,   then   W ← W − lr·λ·W      (decoupled decay)

``scale_front=True`` multiplies by ``√α`` before the limiter instead of after;
``disable_nl=True`` skips the limiter. APOLLO-Mini is rank 1 with tensor-wise scaling and
``α = 128``. The random projection is never stored: it is regenerated from its integer seed at
every step (the seed advances with :func:`rankwise.optim.projectors.next_seed` at every refresh,
as apollo-torch does), so the state of a matrix is the two ``r``-row moments plus one number —
``APOLLO-Mini`` keeps ``2·n + 1`` floats for an ``m × n`` matrix. ``store_projection=True`` keeps
the matrix instead (trades ``m·r`` floats for the regeneration; measured on llama-tiny: the
default's step is 1.17x apollo-torch's at 0.79x its state, ``store_projection=True`` is 0.94x at
equal state). Other projector kinds
(``projector="svd"`` is the paper's APOLLO-SVD ablation) keep their basis in the state.

Seeds: parameter number ``i`` (0-based over all param groups, in order) starts from seed
``projector_options["seed"] + i`` (default seed 1, which is apollo-torch's 1-based numbering; only
the seeded kinds ``random`` / ``randomized_svd`` get a seed), so with the same param groups the loss
trajectory equals apollo-torch's; ``tests/test_optim_more.py`` checks 50 steps of APOLLO and
APOLLO-Mini against it, ``tests/optim/test_apollo.py`` every projector kind on default options. Non-matrix parameters take the plain AdamW
step of apollo-torch (``ε`` outside the bias correction, decay after the update).
"""

from __future__ import annotations

import math

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
from .projectors import next_seed, resolve_side, stable_randn

__all__ = ["APOLLO", "APOLLOMini"]

SCALE_TYPES = ("channel", "tensor")


class APOLLO(LowRankOptimizer):
    """APOLLO: AdamW with channel-wise (or tensor-wise) gradient scaling from a random low-rank space.

    Group keys (besides AdamW's): ``rank`` (None: plain AdamW for this group), ``update_proj_gap``
    (T, default 200), ``scale`` (α), ``scale_type`` ("channel" | "tensor"), ``proj_type``
    ("std": project the smaller side), ``projector`` ("random" default; any kind of
    :mod:`rankwise.optim.projectors`), ``projector_options`` (the kind's options; the seeded kinds
    ``random`` / ``randomized_svd`` start from ``seed`` 1 unless it is given).
    """

    owner = "APOLLO"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 *, correct_bias: bool = True, rank: int | float | None = None, update_proj_gap: int = 200,
                 scale: float = 1.0, scale_type: str = "channel", proj_type: str = "std", projector: str = "random",
                 projector_options: dict | None = None, scale_front: bool = False, disable_nl: bool = False,
                 store_projection: bool = False):
        check_adam_args(self.owner, lr, betas, eps, weight_decay)
        opts = None if projector_options is None else dict(projector_options)
        defaults = dict(GROUP_DEFAULTS)
        defaults.update(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        rank=rank, update_proj_gap=update_proj_gap, scale=scale, scale_type=scale_type,
                        proj_type=proj_type, projector=projector, projector_options=opts, adam_style="hf",
                        scale_front=bool(scale_front), disable_nl=bool(disable_nl),
                        store_projection=bool(store_projection))
        super().__init__(params, defaults)

    def _check_group_extra(self, group):
        where = f"{self.owner} param group {group['_index']}"
        if group.get("scale_type") not in SCALE_TYPES:
            raise ConfigError(f"{where}: scale_type={group.get('scale_type')!r} must be 'channel' (APOLLO) or "
                              "'tensor' (APOLLO-Mini).")
        if group.get("subspace_change") != "keep":
            raise ConfigError(f"{where}: subspace_change={group.get('subspace_change')!r}; APOLLO keeps its "
                              "moments across projection refreshes (only 'keep' is supported).")
        if group.get("adam_style", "hf") != "hf":
            raise ConfigError(f"{where}: adam_style must be 'hf' (apollo-torch's AdamW arithmetic).")

    def projector_kwargs(self, p, group, state=None):
        """As the base class, but the seeded kinds (``random``, ``randomized_svd``) start from seed 1
        when the options give none (apollo-torch's numbering); other kinds take no seed."""
        kind = group["projector"] if state is None else self.projector_kind(p, group, state)
        if kind in ("random", "randomized_svd") and "seed" not in (group.get("projector_options") or {}):
            group = dict(group, projector_options={**(group.get("projector_options") or {}), "seed": 1})
        return super().projector_kwargs(p, group, state)

    # ------------------------------------------------------------------ regenerated random projection
    def _random_low(self, p, group, state, grad):
        """Project with a Gaussian matrix regenerated from the current seed (refresh every T steps)."""
        side = resolve_side(group["proj_type"], grad.shape)
        if "proj_seed" not in state or (state["step"] - self.refresh_offset(p, group, state)) % group["update_proj_gap"] == 0:
            seed = state.get("proj_next_seed", self.projector_kwargs(p, group)["seed"])
            state["proj_seed"], state["proj_next_seed"] = seed, next_seed(seed)
            state.pop("proj_basis", None)
        thin = state.get("proj_basis")
        if thin is None:
            r = _rank(group["rank"], grad.shape, side)
            shape = (grad.shape[0], r) if side == "left" else (r, grad.shape[1])
            # drawn in float32 whatever the gradient's dtype (as apollo-torch), so fp64 and bf16 runs
            # see the same matrix
            thin = (stable_randn(shape, state["proj_seed"], device=grad.device, dtype=torch.float32)
                    / math.sqrt(r)).to(grad.dtype)
            if group["store_projection"]:
                state["proj_basis"] = thin
        return (thin.t() @ grad if side == "left" else grad @ thin.t()), side

    def _low_rank_step(self, p, group, state):
        if "step" not in state:
            state["step"] = 0
        grad = as_matrix(p.grad)
        if group["projector"] == "random":
            low, side = self._random_low(p, group, state, grad)
        else:
            proj = self.refresh_projector(p, group, state, grad)
            low, side = proj.project(grad), proj.side
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(low)
            state["exp_avg_sq"] = torch.zeros_like(low)
        state["step"] += 1
        adam_moments_(state["exp_avg"], state["exp_avg_sq"], low, group["betas"], "hf")
        norm_grad, step_size = adam_direction(state["exp_avg"], state["exp_avg_sq"], state["step"], group, "hf")

        # channels are the side that is not projected: columns for a left projection, rows for a right one.
        # U = √α·G⊙s is never formed: its norm is √(Σ_c s_c² ‖G_c‖²) from the channel norms of G, and
        # the weight update is one fused W ← W − η_t·G⊙(s·√α/limiter).
        root_scale = math.sqrt(group["scale"])
        front = root_scale if group["scale_front"] else 1.0
        if group["scale_type"] == "channel":
            dim = 0 if side == "left" else 1
            factor = norm_grad.norm(dim=dim) / (low.norm(dim=dim) + 1e-8)
            factor = factor.unsqueeze(0) if side == "left" else factor.unsqueeze(1)
            if not group["disable_nl"]:
                channel_norms = grad.norm(dim=dim, keepdim=True)
                norm = (factor * channel_norms).norm() * front
        else:
            factor = norm_grad.norm() / (low.norm() + 1e-8)
            if not group["disable_nl"]:
                norm = factor * grad.norm() * front
        mult = factor * front
        if not group["disable_nl"]:
            if "scaled_grad" in state:
                limiter = torch.clamp(norm / (state["scaled_grad"] + 1e-8), min=1.01) / 1.01
                mult = mult / limiter
                state["scaled_grad"] = norm / limiter
            else:
                state["scaled_grad"] = norm
        if not group["scale_front"]:
            mult = mult * root_scale
        w = p if p.ndim == 2 else p.view(grad.shape)
        w.addcmul_(grad, mult.to(w.dtype), value=-step_size)
        if group["weight_decay"]:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])


class APOLLOMini(APOLLO):
    """APOLLO-Mini: tensor-wise scaling with ``scale=128`` by default; give the projected groups
    rank 1 (``rw.optim.param_groups(model, rank=1)``), the paper's setting."""

    owner = "APOLLOMini"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 *, scale: float = 128.0, scale_type: str = "tensor", **kw):
        super().__init__(params, lr, betas, eps, weight_decay, scale=scale, scale_type=scale_type, **kw)


def _rank(rank, shape, side: str) -> int:
    dim = shape[0] if side == "left" else shape[1]
    r = rank if isinstance(rank, int) else max(1, round(rank * dim))  # as Projector.effective_rank
    return max(1, min(r, shape[0], shape[1]))
