"""LoQT: Low-Rank Adapters for Quantized Pretraining (Loeschcke, Toftrup, Kastoryano, Belongie,
Snæbjarnarson 2024, arXiv:2405.16528, NeurIPS 2024; reference code ``sebulo/LoQT``, ``loqt/LoQT.py``).

The weight of a linear layer is kept **quantized** (``rankwise.quant``: nf4, int4 or int8, block-wise
absmax; packed codes and absmax are buffers — there is no float copy of ``W``) and a low-rank update
is trained on top, with a fixed projection ``P`` and a trained factor ``B``::

    W = Q⁻¹(W_q) + s · P B         side "out":  P ∈ R^{out×r} (left singular vectors of ∇W),  B ∈ R^{r×in}
    W = Q⁻¹(W_q) + s · B Pᵀ        side "in":   P ∈ R^{in×r}  (right singular vectors of ∇W), B ∈ R^{out×r}

``s`` = ``alpha`` (the reference multiplies by ``lora_alpha`` itself, not ``alpha / r``; 0.5 in all
its scripts). ``side="auto"`` is the reference's ``proj_type='std'``: ``"in"`` when
``in_features ≤ out_features``, else ``"out"``.

**Merge and re-initialization** at the steps ``T_0 < T_1 < …`` (``LoraLinear._forward_pre_hook`` /
``_backward_hook``, ``init_LoRA_with_gradient_projections``)::

    W_fp  = Q⁻¹(W_q) + s · P B                                   (merge, in float32)
    P     = top-r singular vectors of ∇W  (the dense weight gradient of this step)
    W_q, B = Q(W_fp), 0                                          (compensate_iterations = 0)

With **error compensation** (``compensate_iterations = c > 0``, ``optimize_quant_and_lora_jointly``)
the quantization error of the merge is folded into the new ``B``, LoftQ-style, keeping the best of
``c`` alternations by ``‖W_fp − (Q⁻¹(W_q) + s·P B)‖_F``::

    W_cur = W_fp;  repeat c times:  W_q = Q(W_cur);  B = P⁺ (W_fp − Q⁻¹(W_q)) / s;  W_cur = W_fp − s·P B

(side "in": ``B = (W_fp − Q⁻¹(W_q)) P⁺ᵀ / s``). The function right after a merge then differs from
the one before by ``W_cur − Q⁻¹(Q(W_cur))``, element-wise within ``rankwise.quant.error_bound(W_cur)``.

**Schedule** (``loqt/utils.py``, ``get_proj_update_steps``): ``T_0`` is the first step (the reference
attaches its hooks at construction, so the first forward initializes ``P``), ``T_1 = τ`` and, for
``progression="exponential"``, ``T_{j+1} = T_j + τ + ⌊ψ^j⌋``, i.e. the closed form
``T_j = j·τ + Σ_{i=1}^{j−1} ⌊ψ^i⌋`` (``τ`` = ``update_gap``, 100; ``ψ`` = ``growth``, 1.2 — the
scripts' ``--update_proj_gap 100 --proj_gap_progression exponential --increment_size 1.2``).
``"static"``: ``T_j = j·τ``; ``"linear"``: gaps ``τ, ⌊τ+ψ⌋, ⌊τ+2ψ⌋ …`` (the reference's three options).

**The dense gradient** ``∇W`` is not available from ``B``'s gradient (that is only its projection
``s·Pᵀ∇W``). The reference makes each merge step a special step: the merged quantized layer
computes the full weight gradient into a dense buffer (``LinearNF4WithGradient``), ``P`` is
initialized from it, and the step's update is discarded (all gradients set to zero). Here the
quantized matmul is a custom autograd function that, on the steps ``T_j`` only, also accumulates
``∇W = Σ gᵀx`` (over micro-batches) in float32 in backward; ``on_step(T_j)`` (after
``optimizer.step()``) merges, takes ``P`` from it and frees it. Cost on those steps only: one extra
``out×in×tokens`` matmul per layer and a transient dense float32 ``out×in`` buffer per layer until
``on_step`` (the reference holds the same buffer); no extra forward/backward, and the step's ``B``
update is kept (merged), where the reference throws that step's update away — the one deviation in
the schedule. The flag that arms the capture for the next step is a persistent buffer.

**Optimizer state**: ``B``'s state is reset (``_optim.reset_state``) at each re-initialization
(``reset_optimizer=True``); the reference replaces ``B``'s ``.data`` and keeps its Adam moments
(``reset_optimizer=False`` reproduces that).

**Memory** (per layer): packed codes ``⌈out·in/2⌉`` bytes (4-bit) or ``out·in`` bytes (int8) plus
``4·⌈out·in/block⌉`` bytes of absmax; ``P`` and ``B`` ``r·(out+in)`` values (``P`` not trained);
gradients and optimizer state only for ``B`` (and the bias). The forward dequantizes ``W`` block by
block into a temporary of the compute dtype (not saved for backward: backward dequantizes again).
The reference can also quantize ``P`` to NF4 (``--quantize_projection_matrix 4bit``); not offered here.

Per-layer optimizer steps (the paper's 13B setting): :func:`layerwise_optimizers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import quant
from ..errors import ConfigError
from . import register
from ._optim import reset_state

__all__ = ["LoQT", "LoQTLinear", "layerwise_optimizers", "merge_steps", "is_merge_step"]

_DEVICES = ("cpu", "cuda")  # where rankwise.quant's packing (bit shifts, bucketize on uint8) is known to run


# ---------------------------------------------------------------------------------------------- schedule
def _gaps(update_gap: int, growth: float, progression: str):
    """The reference's increments ``T_{j+1} − T_j`` for ``j = 1, 2, …`` (``T_1 = update_gap``)."""
    j = 1
    while True:
        if progression == "static":
            yield update_gap
        elif progression == "linear":  # the reference accumulates ``gap += ψ`` in floats: ⌊τ + jψ⌋ exactly here
            yield int(update_gap + j * growth)
        else:
            yield update_gap + int(growth ** j)
        j += 1


def merge_steps(until: int, update_gap: int = 100, growth: float = 1.2, progression: str = "exponential") -> list[int]:
    """Steps ``T_1 < T_2 < … ≤ until`` at which LoQT merges and re-initializes (``T_0 = 1``, the
    first step, initializes ``P`` and is not listed)."""
    out, t = [], update_gap
    gaps = _gaps(update_gap, growth, progression)
    while t <= until:
        out.append(t)
        t += next(gaps)
    return out


def is_merge_step(step: int, config: LoQT.Config) -> bool:
    """Whether optimizer step ``step`` (1-based) re-initializes ``P`` (step 1) or merges (``T_j``)."""
    if step == 1:
        return True
    return bool(merge_steps(step, config.update_gap, config.growth, config.progression)[-1:] == [step])


# ---------------------------------------------------------------------------------------------- kernels
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _QuantLinear(torch.autograd.Function):
    """``y = x Q⁻¹(W_q)ᵀ``; backward dequantizes again (no dense ``W`` kept between forward and
    backward) and, when the layer is armed, accumulates the dense weight gradient ``gᵀx``."""

    @staticmethod
    def forward(ctx, x, data, absmax, anchor, layer):
        # ``anchor`` (the trained factor B) only makes the output require grad, so that backward
        # (and the dense-gradient capture) runs even when ``x`` does not require grad
        dt = _compute_dtype(x)
        w = quant.dequantize(data, absmax, layer.weight_shape, layer.kind, layer.block_size, dt)
        y = x.to(dt) @ w.T
        ctx.layer, ctx.x_dtype, ctx.dt = layer, x.dtype, dt
        ctx.capture = layer._armed
        ctx.save_for_backward(data, absmax, x if ctx.capture else None)
        return y

    @staticmethod
    def backward(ctx, g):
        data, absmax, x = ctx.saved_tensors
        layer = ctx.layer
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = quant.dequantize(data, absmax, layer.weight_shape, layer.kind, layer.block_size, ctx.dt)
            grad_x = (g.to(ctx.dt) @ w).to(ctx.x_dtype)
        if ctx.capture:
            g2 = g.reshape(-1, g.shape[-1]).float()
            x2 = x.reshape(-1, x.shape[-1]).float()
            dense = g2.T @ x2
            layer._dense_grad = dense if layer._dense_grad is None else layer._dense_grad + dense
        return grad_x, None, None, None, None


# ---------------------------------------------------------------------------------------------- module
class LoQTLinear(nn.Module):
    """Quantized base + ``s·P B`` (see module doc). Buffers: ``qdata``, ``absmax``, ``P``, ``capture``;
    parameters: ``B`` (and ``bias``)."""

    def __init__(self, linear: nn.Linear, config: LoQT.Config):
        super().__init__()
        w = linear.weight
        out_f, in_f = w.shape
        self.in_features, self.out_features, self.rank = in_f, out_f, config.rank
        self.kind, self.block_size, self.scale = config.quant, config.block_size, float(config.alpha)
        self.weight_shape, self.weight_dtype = (out_f, in_f), w.dtype
        self.side = config.side if config.side != "auto" else ("in" if in_f <= out_f else "out")
        q = quant.quantize(w.detach(), self.kind, self.block_size)
        self.register_buffer("qdata", q.data)
        self.register_buffer("absmax", q.absmax)
        r = config.rank
        p_shape, b_shape = ((out_f, r), (r, in_f)) if self.side == "out" else ((in_f, r), (out_f, r))
        self.register_buffer("P", torch.zeros(p_shape, device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(torch.zeros(b_shape, device=w.device, dtype=w.dtype))
        # 1 = the next forward/backward also accumulates the dense weight gradient (step 1 and T_j)
        self.register_buffer("capture", torch.ones((), dtype=torch.bool, device=w.device))
        self._armed = True  # host copy of ``capture`` (read in forward without a device sync)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self._dense_grad: torch.Tensor | None = None

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``Q⁻¹(W_q)`` (a temporary dense copy)."""
        return quant.dequantize(self.qdata, self.absmax, self.weight_shape, self.kind, self.block_size,
                                dtype or self.weight_dtype)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``s · P B`` (side "out") or ``s · B Pᵀ`` (side "in"), ``(out, in)``."""
        p, b = self.P.detach().to(dtype), self.B.detach().to(dtype)
        return self.scale * (p @ b if self.side == "out" else b @ p.T)

    def dense_weight(self) -> torch.Tensor:
        return (self.base_weight(torch.float32) + self.delta()).to(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _QuantLinear.apply(x, self.qdata, self.absmax, self.B, self)
        if self.side == "out":
            low = (x @ self.B.T) @ self.P.T
        else:
            low = (x @ self.P) @ self.B.T
        y = y + (self.scale * low).to(y.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def arm(self, flag: bool) -> None:
        """Capture the dense weight gradient in the next backward(s) (until the next ``on_step``)."""
        self.capture.fill_(bool(flag))
        self._armed = bool(flag)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._armed = bool(self.capture)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"quant={self.kind}/{self.block_size}, side={self.side}, scale={self.scale}")

    @torch.no_grad()
    def merge_and_reinit(self, compensate_iterations: int) -> dict:
        """Merge ``s·P B`` into the quantized base, take ``P`` from the captured dense gradient, and
        set ``B`` (0, or the compensation of the new quantization error). Returns error numbers."""
        if self._dense_grad is None:
            raise ConfigError(
                f"loqt: {self.extra_repr()}: no dense weight gradient was captured for this merge step. "
                "on_step must follow a forward/backward of the same step (rank_step / pretrain_step after "
                "optimizer.step(), before the next forward); when resuming with your own checkpoint code, "
                "restore rankwise.pretrain.frozen_state(model) too (it holds the capture flag).")
        grad, self._dense_grad = self._dense_grad, None
        w_fp = self.base_weight(torch.float32) + self.delta()
        # P: top-r singular vectors of the dense gradient (float32, as the reference)
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        p = (u[:, :self.rank] if self.side == "out" else vh[:self.rank].T).contiguous()
        self.P.copy_(p.to(self.P.dtype))
        p32 = self.P.float()
        p_pinv = torch.linalg.pinv(p32)  # (r, out|in); = Pᵀ for orthonormal P
        best, best_q, best_b = math.inf, None, torch.zeros_like(self.B, dtype=torch.float32)
        cur = w_fp
        for _ in range(max(1, compensate_iterations)):
            q = quant.quantize(cur, self.kind, self.block_size)
            if compensate_iterations == 0:
                best_q = q
                break
            resid = w_fp - q.dequantize().float()
            b = (p_pinv @ resid if self.side == "out" else resid @ p_pinv.T) / self.scale
            lr = self.scale * (p32 @ b if self.side == "out" else b @ p32.T)
            err = float(torch.linalg.matrix_norm(resid - lr))
            if err < best:
                best, best_q, best_b = err, q, b
            cur = w_fp - lr
        self.qdata.copy_(best_q.data)
        self.absmax.copy_(best_q.absmax)
        self.B.copy_(best_b.to(self.B.dtype))
        return {"error": float(torch.linalg.matrix_norm(w_fp - self.dense_weight().float()))}


def layerwise_optimizers(model: nn.Module, make_opt: Callable[[list], torch.optim.Optimizer], accumulation_steps: int = 1):
    """Per-parameter optimizer steps inside ``backward`` (the paper's "per-layer gradient updates",
    the reference's ``register_hooks``): every trainable parameter (``B`` factors, biases, norms,
    embeddings) gets ``make_opt([{"params": [p]}])`` and a ``register_post_accumulate_grad_hook`` that
    steps it and frees its gradient as soon as it is complete, so no two layers' gradients are alive
    together. Thin wrapper over :func:`rankwise.optim.layerwise` (returns its handle: pass it as the
    ``optimizers`` of ``pretrain_step`` so merges reset ``B``'s state, and to schedulers). The dense
    gradient that LoQT captures on merge steps is unaffected (it is not a ``.grad``). Limits: no
    global gradient clipping; gradient accumulation via ``accumulation_steps``."""
    from ..optim.layerwise import layerwise

    return layerwise(model, make_opt, accumulation_steps=accumulation_steps)


@register
class LoQT:
    """LoQT (see :mod:`rankwise.pretrain.loqt`)."""

    name = "loqt"

    @dataclass
    class Config:
        """rank: r; alpha: the scale s of P B; quant: 'nf4' | 'int4' | 'int8'; block_size: quantizer
        block; update_gap: τ; growth: ψ; progression: 'exponential' | 'linear' | 'static';
        compensate_iterations: error-compensation alternations (0 = B = 0 after a merge); side:
        'auto' | 'out' | 'in'; reset_optimizer: reset B's optimizer state at re-initialization."""

        rank: int = 256
        alpha: float = 0.5
        quant: str = "nf4"
        block_size: int = 64
        update_gap: int = 100
        growth: float = 1.2
        progression: str = "exponential"
        compensate_iterations: int = 5
        side: str = "auto"
        reset_optimizer: bool = True

        def __post_init__(self):
            for name, low in (("rank", 1), ("update_gap", 1), ("compensate_iterations", 0)):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int) or v < low:
                    raise ConfigError(f"loqt: {name}={v!r} must be an int >= {low}.")
            for name in ("alpha", "growth"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    raise ConfigError(f"loqt: {name}={v!r} must be a number > 0 (the paper: alpha 0.5, growth 1.2).")
            quant.check_kind(self.quant, self.block_size)
            if self.progression not in ("exponential", "linear", "static"):
                raise ConfigError(f"loqt: progression={self.progression!r}; use 'exponential' (the paper), "
                                  "'linear' or 'static'.")
            if self.side not in ("auto", "out", "in"):
                raise ConfigError(f"loqt: side={self.side!r}; use 'auto' (the reference's rule), 'out' (P spans "
                                  "the output space) or 'in' (P spans the input space).")
            if not isinstance(self.reset_optimizer, bool):
                raise ConfigError(f"loqt: reset_optimizer={self.reset_optimizer!r} must be True or False.")

    @staticmethod
    def check(name: str, linear: nn.Linear, config: LoQT.Config) -> None:
        dev = linear.weight.device
        if dev.type not in _DEVICES:
            raise ConfigError(
                f"loqt: {name} (shape {tuple(linear.weight.shape)}) is on device {dev}; its weight is stored "
                f"quantized with rankwise.quant, which runs on {' and '.join(_DEVICES)} only"
                + (" (a meta tensor has no values to quantize)" if dev.type == "meta" else "")
                + ". Move the model to the CPU or a CUDA device (with its values) before parametrize.")
        if not linear.weight.is_floating_point():
            raise ConfigError(f"loqt: {name} has a {linear.weight.dtype} weight; LoQT quantizes a float weight.")

    @staticmethod
    def wrap(linear: nn.Linear, config: LoQT.Config, generator: torch.Generator | None = None) -> LoQTLinear:
        LoQT.check(f"Linear({linear.in_features} -> {linear.out_features})", linear, config)
        if config.rank > min(linear.in_features, linear.out_features):
            raise ConfigError(f"loqt: rank={config.rank} exceeds min(out, in) = "
                              f"{min(linear.in_features, linear.out_features)}; lower rank.")
        return LoQTLinear(linear, config)

    @staticmethod
    def dense_weight(module: LoQTLinear) -> torch.Tensor:
        return module.dense_weight()

    @classmethod
    def on_step(cls, model, layers, config, step, optimizers, total_steps=None) -> dict | None:
        info = None
        if is_merge_step(step, config):
            errors, zeroed = [], 0
            for _, m in layers:
                errors.append(m.merge_and_reinit(config.compensate_iterations)["error"])
                if config.reset_optimizer:
                    zeroed += reset_state(optimizers, [m.B])
            info = {"merged": len(errors), "max_merge_error": max(errors, default=0.0), "state_zeroed": zeroed}
        arm = is_merge_step(step + 1, config)
        for _, m in layers:
            # a capture from a step that merged nothing is stale (e.g. a layer armed by its init but
            # resumed from a checkpoint past step 1, whose buffers are copied in place): drop it
            m._dense_grad = None
            m.arm(arm)
        return info
