"""Flora: low-rank adapters are secretly gradient compressors (Hao, Cao & Mou, 2024, arXiv:2402.03293).

Flora is Adafactor whose first moment is kept compressed by a random projection that is
resampled every ``kappa`` steps. For a matrix ``W ∈ R^{m×n}`` with gradient ``G`` (step ``t``)::

    β₂ₜ = 1 − t^{decay_rate}                                      (decay_rate = −0.8)
    r ← β₂ₜ r + (1−β₂ₜ) mean_col(G² + ε₁),   c ← β₂ₜ c + (1−β₂ₜ) mean_row(G² + ε₁)
    U  = G / √(r cᵀ / mean(r))                                    (factored second moment)
    Ũ  = (1−β₁) U + β₁ · up(M)                                    (momentum, decompressed)
    if t % kappa == 0:  M ← down'(up(M)), then the new projection is used
    M  ← β₁ M + (1−β₁) · down(U)                                   (compressed momentum)
    Ũ ← Ũ / max(1, RMS(Ũ) / d)                                    (update clipping, d = clip_threshold)
    W ← W − lr·λ·W − lr · Ũ,   lr = lr₀ · max(ε₂, RMS(W))  if scale_parameter

with ``down(X) = A X`` (``A ∈ R^{r×m}``, when ``m < n``) or ``X B`` (``B ∈ R^{n×r}``), entries
``N(0, 1/r)`` regenerated from an integer seed at every use — only the seed is stored — and
``up(M) = Aᵀ M`` / ``M Bᵀ`` (so ``E[up(down(X))] = X``). The momentum costs ``r·n`` (or ``m·r``)
instead of ``m·n``; the second moment ``m + n``.

Compression applies to 2-D parameters with ``min(m, n) ≥ rank`` and aspect ratio ≤ 4, when
``beta1 > 0`` and ``rank`` is set; other parameters take the plain (uncompressed) Adafactor step,
as in the reference (``fallback="adafactor"``), or plain AdamW (``fallback="adamw"``, with
``lr``, ``adamw_betas``, ``adamw_eps``, ``weight_decay``).

Seeds follow the reference package ``flora-opt`` 0.0.3 exactly: parameter ``k`` (1-based, over all
groups) starts at seed ``seed + k``; the left/right matrices use the two int64 draws of a
generator seeded with it; the next seed is the 15th int64 draw. The oracle test checks the loss
trajectory against ``flora_opt.Flora``. Not implemented: ``flora-opt``'s optional bitsandbytes
quantization of the moments (``quantization=True``).
"""

from __future__ import annotations

import math

import torch

from ..core.distributed import whole_parameter
from ..errors import ConfigError
from ._common import adamw_step_, check_adam_args
from .adafactor import _rms, step_size
from .projectors import next_seed, stable_randn

_INT64_MAX = torch.iinfo(torch.int64).max


def split_seed(seed: int) -> tuple[int, int]:
    """The (left, right) seeds of ``seed``: two int64 draws of a generator seeded with it."""
    gen = torch.Generator().manual_seed(int(seed))
    a, b = torch.randint(0, _INT64_MAX, (2,), generator=gen).tolist()
    return int(a), int(b)


class _Projection:
    """The random matrix of one seed, drawn once per step and used for both directions."""

    def __init__(self, seed: int, rank: int, shape, device, dtype):
        lseed, rseed = split_seed(seed)
        self.left = shape[0] < shape[-1]
        if self.left:
            self.mat = stable_randn((rank, shape[0]), lseed, device=device, dtype=dtype) / math.sqrt(rank)
        else:
            self.mat = stable_randn((shape[-1], rank), rseed, device=device, dtype=dtype) / math.sqrt(rank)

    def down(self, x):
        return self.mat @ x if self.left else x @ self.mat

    def up(self, c):
        return self.mat.t() @ c if self.left else c @ self.mat.t()


class Flora(torch.optim.Optimizer):
    """Adafactor with compressed, periodically resampled momentum (see the module docstring).

    Args (group defaults): ``lr``; ``rank`` (``None``: no compression); ``kappa`` (resampling
    interval, 1000); ``eps`` (``(ε₁, ε₂)``, ``(1e-30, 1e-3)``); ``clip_threshold`` (1.0);
    ``decay_rate`` (−0.8); ``beta1`` (``None``/0: no momentum); ``weight_decay``;
    ``scale_parameter`` (True); ``relative_step`` / ``warmup_init`` (Adafactor's schedule, needs
    ``lr=None``); ``factorize_second_moment`` (True); ``seed`` (0); ``fallback``
    (``"adafactor"`` | ``"adamw"``), ``adamw_betas``, ``adamw_eps``.
    """

    def __init__(self, params, lr: float | None = None, rank: int | None = None, kappa: int = 1000,
                 eps=(1e-30, 1e-3), clip_threshold: float = 1.0, decay_rate: float = -0.8,
                 beta1: float | None = None, weight_decay: float = 0.0, scale_parameter: bool = True,
                 relative_step: bool = False, warmup_init: bool = False, factorize_second_moment: bool = True,
                 seed: int = 0, fallback: str = "adafactor", adamw_betas=(0.9, 0.999), adamw_eps: float = 1e-8):
        if lr is not None and relative_step:
            raise ConfigError("Flora: lr and relative_step=True cannot be combined; pass lr=None for Adafactor's "
                              "relative step size.")
        if lr is None and not relative_step:
            raise ConfigError("Flora: give lr, or set relative_step=True.")
        if warmup_init and not relative_step:
            raise ConfigError("Flora: warmup_init=True needs relative_step=True.")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ConfigError(f"Flora: rank={rank!r} must be None or an int ≥ 1.")
        if not isinstance(kappa, int) or kappa < 1:
            raise ConfigError(f"Flora: kappa={kappa!r} must be an int ≥ 1 (steps between projection resampling).")
        if beta1 is not None and not 0 <= beta1 < 1:
            raise ConfigError(f"Flora: beta1={beta1!r} must be None or in [0, 1).")
        if not decay_rate < 0:
            raise ConfigError(f"Flora: decay_rate={decay_rate!r} must be < 0 (β₂ₜ = 1 − t^decay_rate).")
        if fallback not in ("adafactor", "adamw"):
            raise ConfigError(f"Flora: fallback={fallback!r} must be 'adafactor' or 'adamw'.")
        check_adam_args("Flora", 0.0 if lr is None else lr, adamw_betas, adamw_eps, weight_decay)
        defaults = dict(lr=lr, rank=rank, kappa=kappa, eps=tuple(eps), clip_threshold=clip_threshold,
                        decay_rate=decay_rate, beta1=beta1, weight_decay=weight_decay,
                        scale_parameter=scale_parameter, relative_step=relative_step, warmup_init=warmup_init,
                        factorize_second_moment=factorize_second_moment, fallback=fallback,
                        adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps)
        super().__init__(params, defaults)
        index = int(seed)
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.requires_grad:
                    self.state[p]["seed"] = index

    # ------------------------------------------------------------------ options
    @staticmethod
    def options(group: dict, shape) -> tuple[bool, bool, bool]:
        """``(factored second moment, first moment, compressed first moment)`` for a parameter."""
        factored = len(shape) == 2 and group["factorize_second_moment"]
        first = group["beta1"] is not None and group["beta1"] > 0
        rank = group["rank"]
        compressed = (first and rank is not None and rank > 0 and factored and min(shape) >= rank
                      and max(shape) / min(shape) <= 4)
        return factored, first, compressed

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"Flora: sparse gradients are not supported (parameter of shape {tuple(p.shape)}).")
                state = self.state[p]
                with whole_parameter(p) as w:  # FSDP2 shard: the whole tensor (projection, factored moments)
                    self._step_param(w, group, state)
        return loss

    def _step_param(self, p, group, state):
        grad = p.grad
        if grad.dtype in (torch.float16, torch.bfloat16):
            grad = grad.float()
        factored, first, compressed = self.options(group, grad.shape)
        if group["fallback"] == "adamw" and not compressed:
            adamw_group = dict(group, betas=group["adamw_betas"], eps=group["adamw_eps"], adam_style="torch")
            adamw_step_(p, grad, state, adamw_group)
            return
        work = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p

        if "step" not in state:
            state["step"] = 0
            if first:
                if compressed:
                    m, n = grad.shape
                    cshape = (group["rank"], n) if m < n else (m, group["rank"])
                    state["exp_avg"] = torch.zeros(cshape, dtype=grad.dtype, device=grad.device)
                else:
                    state["exp_avg"] = torch.zeros_like(grad)
            if factored:
                state["exp_avg_sq_row"] = torch.zeros(grad.shape[:-1], dtype=grad.dtype, device=grad.device)
                state["exp_avg_sq_col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:], dtype=grad.dtype,
                                                      device=grad.device)
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)

        state["step"] += 1
        t = state["step"]
        lr = step_size(group, t, _rms(work))
        beta2t = 1.0 - math.pow(t, group["decay_rate"])
        update = grad ** 2 + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = torch.mul(r_factor, col.unsqueeze(-2).rsqrt())
            update.mul_(grad)
        else:
            v = state["exp_avg_sq"]
            v.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = v.rsqrt().mul_(grad)

        if first:
            b1 = group["beta1"]
            if not compressed:
                update = update * (1 - b1) + state["exp_avg"] * b1
                state["exp_avg"].copy_(update)
            else:
                exp_avg = state["exp_avg"]
                proj = _Projection(state["seed"], group["rank"], grad.shape, grad.device, grad.dtype)
                raw = update.clone()
                update.copy_(update * (1 - b1) + proj.up(exp_avg) * b1)
                if t % group["kappa"] == 0:
                    new_seed = next_seed(state["seed"])
                    new = _Projection(new_seed, group["rank"], grad.shape, grad.device, grad.dtype)
                    exp_avg.copy_(new.down(proj.up(exp_avg)))
                    state["seed"] = new_seed
                    proj = new
                exp_avg.copy_(exp_avg * b1 + proj.down(raw) * (1 - b1))

        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if group["weight_decay"] != 0:
            work.add_(work, alpha=-group["weight_decay"] * float(lr))
        work.add_(-update)
        if work is not p:
            p.copy_(work)
