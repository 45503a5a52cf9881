"""GaLore: memory-efficient training by gradient low-rank projection (Zhao et al., 2024, arXiv:2403.03507).

For a weight matrix ``W ∈ R^{m×n}`` with gradient ``G_t``, every ``T`` steps (``update_proj_gap``;
at steps 0, T, 2T, …) a projector is recomputed from the current gradient — by default the top-``r``
singular vectors of the smaller side (``P = U[:, :r]`` when ``m < n``, else ``Q = V[:, :r]``). Adam
then runs on the projected gradient ``R_t = Pᵀ G_t`` (``r × n``) or ``G_t Q`` (``m × r``)::

    m_t = β₁ m_{t−1} + (1 − β₁) R_t,     v_t = β₂ v_{t−1} + (1 − β₂) R_t²
    N_t = m_t / (√v_t + ε)                                    (adam_style="hf", galore-torch)
    W  ← W − lr · √(1−β₂ᵗ)/(1−β₁ᵗ) · α · P N_t   (or α · N_t Qᵀ)
    W  ← W − lr · λ · W                                       (decoupled weight decay, after)

so the optimizer state per matrix is ``2·r·n`` moment entries plus the ``m·r`` projector (left
case) instead of AdamW's ``2·m·n``. Parameters that are not matrices, or sit in a group without
``rank``, take the plain AdamW step. The moments are kept across a subspace change, as in the paper
(``subspace_change="keep"``; see :mod:`rankwise.optim._common` for ``reset`` / ``reproject``).

Equivalent to galore-torch 1.0's ``GaLoreAdamW`` with the same param groups (``rank``,
``update_proj_gap``, ``scale``, ``proj_type``) — the oracle test checks the loss trajectory. Any
projector of :mod:`rankwise.optim.projectors` can replace the SVD (group key ``projector``).

``GaLoreAdamW8bit`` stores both moments in 8 bits, block-wise (``block_size`` consecutive values
share one float32 absmax; signed dynamic map for ``m``, unsigned for ``v``; Dettmers et al., 2022,
arXiv:2110.02861), in pure torch — or with bitsandbytes' kernels (``backend="bnb"``, default
when bitsandbytes is importable and the parameter is on CUDA). State per matrix: ``2·r·n`` bytes
plus ``2·⌈r·n/block_size⌉·4`` bytes of absmax, plus the projector. Tensors smaller than
``min_8bit_size`` elements keep float32 moments, as in bitsandbytes. Arithmetic follows
galore-torch's ``GaLoreAdamW8bit`` (bitsandbytes' Adam: ``ε`` added after the bias correction;
decay on projected weights after the update, on the others before).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ._common import (
    ADAM_STYLES,
    GROUP_DEFAULTS,
    ROUNDINGS,
    LowRankOptimizer,
    adam_direction,
    adam_moments_,
    apply_update_,
    as_matrix,
    check_adam_args,
    dequantize_blockwise,
    qmap,
    quantize_blockwise,
)


class GaLoreAdamW(LowRankOptimizer):
    """AdamW with GaLore gradient projection for param groups that set ``rank``.

    Args:
        params: parameters or param groups (``torch.optim`` style). Group keys: ``rank``,
            ``update_proj_gap``, ``scale``, ``proj_type`` (galore-torch's names), ``projector``,
            ``projector_options``, ``subspace_change``, ``adam_style``, and AdamW's keys.
        lr, betas, eps, weight_decay, correct_bias: AdamW hyperparameters (galore-torch defaults:
            ``eps=1e-6``).
        rank ... adam_style: defaults for every group (``rank=None``: groups project only if they
            set ``rank``).
    """

    owner = "GaLoreAdamW"
    default_style = "hf"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 *, correct_bias: bool = True, rank: int | float | None = None, update_proj_gap: int = 200,
                 scale: float = 1.0, proj_type: str = "std", projector: str = "auto",
                 projector_options: dict | None = None, subspace_change: str = "keep",
                 adam_style: str | None = None, **extra):
        check_adam_args(self.owner, lr, betas, eps, weight_decay)
        style = self.default_style if adam_style is None else adam_style
        if style not in ADAM_STYLES:
            raise ConfigError(f"{self.owner}: adam_style={style!r} must be one of {ADAM_STYLES}.")
        defaults = dict(GROUP_DEFAULTS)
        defaults.update(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                        projector=projector, projector_options=projector_options,
                        subspace_change=subspace_change, adam_style=style, **extra)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ moments (fp32 here)
    moment_keys = ("exp_avg", "exp_avg_sq")

    def _moments(self, state: dict, like: torch.Tensor, group: dict):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(like)
            state["exp_avg_sq"] = torch.zeros_like(like)
        return state["exp_avg"], state["exp_avg_sq"]

    def _store_moments(self, state: dict, exp_avg, exp_avg_sq, group: dict) -> None:
        """Moments are updated in place in float32; 8-bit subclasses re-quantize here."""

    def _adam_low_rank(self, state: dict, low: torch.Tensor, group: dict):
        """Adam on the projected gradient ``low``: returns ``(direction, step_size)``."""
        style = group["adam_style"]
        exp_avg, exp_avg_sq = self._moments(state, low, group)
        state["step"] += 1
        adam_moments_(exp_avg, exp_avg_sq, low, group["betas"], style)
        direction, step_size = adam_direction(exp_avg, exp_avg_sq, self.bias_step(state), group, style)
        self._store_moments(state, exp_avg, exp_avg_sq, group)
        return direction, step_size

    def _low_rank_step(self, p, group, state):
        if "step" not in state:
            state["step"] = 0
        grad = as_matrix(p.grad)
        proj = self.refresh_projector(p, group, state, grad, self.moment_keys)
        low = proj.project(grad)
        direction, step_size = self._adam_low_rank(state, low, group)
        update = proj.project_back(direction)
        apply_update_(p, update, step_size, group, "after" if group["adam_style"] == "hf" else "before")


    def _sharded_low_rank_step(self, p, group, state) -> bool:
        """One step of an FSDP2 shard (``Shard(0)`` on a 1-D mesh: this rank holds rows ``R`` of ``W``
        and of ``G``) without gathering ``W`` or ``G`` between refreshes::

            right (m ≥ n, Q n×r):  low_R = G_R Q          (local, m_R × r; moments sharded like W)
                                    ΔW_R  = s · N_R Qᵀ     (local)
            left  (m < n, P m×r):  low   = Σ_ranks P_Rᵀ G_R  (one all-reduce of r × n; moments replicated)
                                    ΔW_R  = s · P_R N      (local)

        On a refresh step the gradient is all-gathered once and every rank computes the same basis
        from it. The arithmetic is the single-process step's, rows apart (the tests compare). Only for
        float32 moments (``type(self)`` is ``GaLoreAdamW``) and ``subspace_change="keep"`` with a
        refreshed (not ``online_pca``) basis; otherwise ``False``: the step runs on the whole matrix."""
        from torch.distributed.tensor import DTensor, Shard

        from ..core.distributed import shard_like

        if (type(self) is not GaLoreAdamW or group["subspace_change"] != "keep"
                or group["projector"] == "online_pca" or p.device_mesh.ndim != 1
                or tuple(p.placements) != (Shard(0),) or tuple(p.grad.placements) != (Shard(0),)):
            return False
        if "step" not in state:
            state["step"] = 0
        shape = (p.shape[0], p.numel() // p.shape[0])
        local = p.grad.to_local().reshape(p.grad.to_local().shape[0], -1)
        proj = self.projector(p, group, state)
        if proj._side is None:
            proj._bind_shape(shape)
        if proj.due(state["step"]):  # the same on every rank: same step, same offsets
            whole = p.grad.full_tensor()
            self.refresh_projector(p, group, state, whole.reshape(shape), self.moment_keys)
        thin = proj._thin().to(local.dtype)
        if proj.side == "left":
            rows = shard_like(thin, p).to_local()  # this rank's rows of P
            low = rows.t() @ local
            torch.distributed.all_reduce(low, group=p.device_mesh.get_group())
        else:
            low = local @ thin.t()
        if "exp_avg" not in state:
            for k in self.moment_keys:
                zeros = torch.zeros_like(low)
                state[k] = zeros if proj.side == "left" else DTensor.from_local(
                    zeros, p.device_mesh, [Shard(0)], shape=(shape[0], low.shape[1]),
                    stride=(low.shape[1], 1))
        exp_avg, exp_avg_sq = (state[k] if proj.side == "left" else state[k].to_local() for k in self.moment_keys)
        style = group["adam_style"]
        state["step"] += 1
        adam_moments_(exp_avg, exp_avg_sq, low, group["betas"], style)
        direction, step_size = adam_direction(exp_avg, exp_avg_sq, self.bias_step(state), group, style)
        update = rows @ direction if proj.side == "left" else direction @ thin
        if proj.scale != 1.0:
            update = update * proj.scale
        apply_update_(p.to_local(), update, step_size, group, "after" if style == "hf" else "before")
        return True


class GaLoreAdamW8bit(GaLoreAdamW):
    """:class:`GaLoreAdamW` with block-wise 8-bit moments (pure torch, or bitsandbytes kernels).

    Extra args: ``block_size`` (256 — bitsandbytes' block for 8-bit optimizers — or 2048),
    ``min_8bit_size`` (tensors with fewer elements keep float32 moments; 4096 as bitsandbytes),
    ``backend`` (``"auto"``: bitsandbytes for CUDA tensors when importable, else torch;
    ``"torch"``; ``"bnb"``), ``rounding`` of the torch backend (``"nearest"`` code, as bitsandbytes'
    CUDA kernel; ``"lut"``: bitsandbytes' CPU kernel, bit-exact with it — see
    :func:`rankwise.optim._common.quantize_blockwise`). Default ``eps=1e-8`` as galore-torch's
    8-bit optimizer. ``subspace_change`` may be ``"keep"`` or ``"reset"``.
    """

    owner = "GaLoreAdamW8bit"
    default_style = "torch"  # the arithmetic is always bitsandbytes' (see _delta); adam_style is unused

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 *, block_size: int = 256, min_8bit_size: int = 4096, backend: str = "auto",
                 rounding: str = "nearest", **kw):
        if block_size not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise ConfigError(f"{self.owner}: block_size={block_size!r} must be a power of two in 64..4096 "
                              "(bitsandbytes uses 256 for 8-bit optimizers).")
        if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ConfigError(f"{self.owner}: min_8bit_size={min_8bit_size!r} must be an int ≥ 0.")
        if backend not in ("auto", "torch", "bnb"):
            raise ConfigError(f"{self.owner}: backend={backend!r} must be 'auto', 'torch' or 'bnb'.")
        if rounding not in ROUNDINGS:
            raise ConfigError(f"{self.owner}: rounding={rounding!r} must be one of {ROUNDINGS}.")
        if backend == "bnb":
            _bnb_functional()
        super().__init__(params, lr, betas, eps, weight_decay, block_size=block_size, min_8bit_size=min_8bit_size,
                         backend=backend, rounding=rounding, **kw)

    def _check_group_extra(self, group):
        if group.get("subspace_change") not in ("keep", "reset"):
            raise ConfigError(f"{self.owner} param group {group['_index']}: subspace_change="
                              f"{group.get('subspace_change')!r} is not supported with 8-bit moments; use 'keep' or "
                              "'reset'.")

    # ------------------------------------------------------------------ 8-bit moments
    @staticmethod
    def _use_bnb(group, t: torch.Tensor) -> bool:
        b = group["backend"]
        if b == "auto":
            return t.is_cuda and _bnb_functional(required=False) is not None
        return b == "bnb"

    def _quant(self, x, signed, group):
        code = qmap(signed, x.device)
        if self._use_bnb(group, x):
            q, st = _bnb_functional().quantize_blockwise(x.float().contiguous(), code=code,
                                                        blocksize=group["block_size"])
            return q, st.absmax
        return quantize_blockwise(x, code, group["block_size"], group["rounding"])

    def _dequant(self, q, absmax, signed, group):
        code = qmap(signed, q.device)
        if self._use_bnb(group, q):
            F = _bnb_functional()
            return F.dequantize_blockwise(q, absmax=absmax, code=code, blocksize=group["block_size"])
        return dequantize_blockwise(q, absmax, code, group["block_size"])

    def _moments(self, state, like, group):
        eight = like.numel() >= group["min_8bit_size"]
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        if not eight:
            return super()._moments(state, like, group)
        if "exp_avg_q" not in state:
            nblocks = -(-like.numel() // group["block_size"])
            state["exp_avg_q"] = torch.zeros(like.shape, dtype=torch.uint8, device=like.device)
            state["exp_avg_absmax"] = torch.zeros(nblocks, dtype=torch.float32, device=like.device)
            state["exp_avg_sq_q"] = torch.zeros(like.shape, dtype=torch.uint8, device=like.device)
            state["exp_avg_sq_absmax"] = torch.zeros(nblocks, dtype=torch.float32, device=like.device)
        m = self._dequant(state["exp_avg_q"], state["exp_avg_absmax"], True, group)
        v = self._dequant(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], False, group)
        return m.to(like.dtype), v.to(like.dtype)

    def _store_moments(self, state, exp_avg, exp_avg_sq, group):
        if "exp_avg_q" not in state:
            return
        q, a = self._quant(exp_avg, True, group)
        state["exp_avg_q"].copy_(q)
        state["exp_avg_absmax"].copy_(a)
        q, a = self._quant(exp_avg_sq, False, group)
        state["exp_avg_sq_q"].copy_(q)
        state["exp_avg_sq_absmax"].copy_(a)

    def refresh_projector(self, p, group, state, grad2d, moment_keys=("exp_avg", "exp_avg_sq")):
        proj = self.projector(p, group, state)
        changed = proj.update(grad2d, state["step"])
        if changed and group["subspace_change"] == "reset" and state["step"] > 0:
            for k in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
                if k in state:
                    state[k].zero_()
            state["moment_step_offset"] = state["step"]
        return proj

    def _delta(self, p, state, grad, group) -> torch.Tensor | None:
        """Adam in bitsandbytes' arithmetic. For 8-bit moments returns the additive change
        ``−lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)``; for float32 moments (small tensors) bitsandbytes'
        32-bit form ``−lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v + ε√(1−β₂ᵗ))``. With ``p`` given the change is
        added to ``p`` in place (returns ``None``), else returned."""
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = self._moments(state, grad, group)
        state["step"] += 1
        t = self.bias_step(state)
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        c1 = 1.0 - beta1 ** t if group["correct_bias"] else 1.0
        c2 = math.sqrt(1.0 - beta2 ** t) if group["correct_bias"] else 1.0
        target = p if p is not None else torch.zeros_like(grad)
        if "exp_avg_q" in state:
            denom = (exp_avg_sq.sqrt() / c2).add_(group["eps"])
            target.addcdiv_(exp_avg, denom, value=-group["lr"] / c1)
        else:
            target.add_(exp_avg / (exp_avg_sq.sqrt() + group["eps"] * c2), alpha=-group["lr"] * c2 / c1)
        self._store_moments(state, exp_avg, exp_avg_sq, group)
        return None if p is not None else target

    def _low_rank_step(self, p, group, state):
        if "step" not in state:
            state["step"] = 0
        grad = as_matrix(p.grad)
        proj = self.refresh_projector(p, group, state, grad)
        delta = self._delta(None, state, proj.project(grad), group)
        p.add_(proj.project_back(delta).view_as(p))
        # galore-torch's 8-bit optimizer decays projected weights after the update
        if group["weight_decay"]:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def _fallback_step(self, p, group, state):
        if "step" not in state:
            state["step"] = 0
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        self._delta(p, state, p.grad, group)


def _bnb_functional(required: bool = True):
    try:
        import bitsandbytes.functional as F
    except Exception as e:  # pragma: no cover - depends on the install
        if required:
            raise ConfigError(f"GaLoreAdamW8bit: backend='bnb' needs bitsandbytes ({type(e).__name__}: {e}); "
                              "install it or use backend='torch'.") from None
        return None
    return F
