"""Adafactor: adaptive learning rates with a factored (row x column) second moment.

Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018
(arXiv:1804.04235). For a matrix gradient ``G`` (m x n; for tensors of more dimensions, the last
two, batched over the leading ones) Adafactor keeps only the running means of ``G²`` over each
row and over each column:

    ρ_t = 1 - t^c                                  (c = ``decay_rate``, -0.8: β₂ grows to 1)
    R_t = ρ_t R_{t-1} + (1 - ρ_t) mean_j(G² + ε₁)   (m numbers)
    C_t = ρ_t C_{t-1} + (1 - ρ_t) mean_i(G² + ε₁)   (n numbers)
    V̂_t = R_t C_tᵀ / mean(R_t)                      (rank-1 reconstruction; exact if G² is rank 1)
    U_t = G / sqrt(V̂_t),   U_t ← U_t / max(1, RMS(U_t) / d)      (update clipping, d = ``clip_threshold``)
    α_t = max(ε₂, RMS(W_{t-1})) · ρ'_t   if ``scale_parameter`` else ρ'_t
    ρ'_t = min(10⁻², 1/√t) (``relative_step``; 10⁻⁶·t instead of 10⁻² with ``warmup_init``) or ``lr``
    M_t = β₁ M_{t-1} + (1 - β₁) α_t U_t    (only when ``beta1`` is set)
    W_t = W_{t-1} - α_t·λ·W_{t-1} - (M_t or α_t U_t)          (λ = ``weight_decay``)

Vectors (biases, norms) keep the full second moment ``V_t = ρ_t V_{t-1} + (1-ρ_t)(G² + ε₁)``.
Optimizer state of an m x n matrix: ``m + n`` numbers (plus ``m·n`` with ``beta1``), against
AdamW's ``2·m·n``.

The step is the one of ``transformers.optimization.Adafactor`` (the fairseq port), operation for
operation, so the two give the same trajectory with the same settings; ``tests/test_optim_more.py``
checks 50 steps against it. Defaults differ on purpose: here the manual-learning-rate setting
(``lr=1e-3``, ``relative_step=False``, ``scale_parameter=False``) that the transformers docs
recommend for fine-tuning and that works with ``torch.optim.lr_scheduler``; pass
``lr=None, relative_step=True, scale_parameter=True`` for the paper's schedule.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

__all__ = ["Adafactor"]


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / math.sqrt(t.numel())


def step_size(group: dict, step: int, param_rms: torch.Tensor | None):
    """Adafactor's step size (Shazeer & Stern 2018, §8): ``ρ_t = min(10⁻² or 10⁻⁶·t (warmup_init),
    1/√t)`` with ``relative_step``, else the group's ``lr``; times ``max(ε₂, RMS(W))`` with
    ``scale_parameter``. Flora uses the same rule."""
    rel = group["lr"]
    if group["relative_step"]:
        min_step = 1e-6 * step if group["warmup_init"] else 1e-2
        rel = min(min_step, 1.0 / math.sqrt(step))
    if group["scale_parameter"]:
        return torch.clamp(param_rms, min=group["eps"][1]) * rel
    return rel


class Adafactor(torch.optim.Optimizer):
    """Adafactor with factored second moments for every tensor of 2 or more dimensions.

    ``eps``: ``(ε₁, ε₂)``, added to ``G²`` and the floor of the parameter scale. ``beta1``:
    ``None`` (no first moment, the memory-saving default) or a float in [0, 1).
    """

    def __init__(self, params, lr: float | None = 1e-3, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = False, relative_step: bool = False,
                 warmup_init: bool = False):
        if relative_step and lr is not None:
            raise ConfigError(f"Adafactor: lr={lr} with relative_step=True; the relative step replaces the "
                              "learning rate. Pass lr=None, or relative_step=False to use lr.")
        if not relative_step and (lr is None or lr < 0):
            raise ConfigError(f"Adafactor: lr={lr!r}; give a learning rate >= 0 (e.g. 1e-3), or "
                              "relative_step=True with lr=None.")
        if warmup_init and not relative_step:
            raise ConfigError("Adafactor: warmup_init=True needs relative_step=True (it shapes the relative step).")
        if len(eps) != 2 or eps[0] < 0 or eps[1] < 0:
            raise ConfigError(f"Adafactor: eps={eps!r}; give two non-negative floats (eps1 for G², eps2 for "
                              "the parameter scale), e.g. (1e-30, 1e-3).")
        if not -1.0 <= decay_rate <= 0.0:
            raise ConfigError(f"Adafactor: decay_rate={decay_rate}; it must be in [-1, 0] (β₂ = 1 - t^decay_rate; "
                              "the paper uses -0.8).")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ConfigError(f"Adafactor: beta1={beta1}; use None (no first moment) or a value in [0, 1).")
        if clip_threshold <= 0:
            raise ConfigError(f"Adafactor: clip_threshold={clip_threshold}; it must be > 0 (the paper uses 1.0).")
        if weight_decay < 0:
            raise ConfigError(f"Adafactor: weight_decay={weight_decay}; it must be >= 0.")
        defaults = dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate,
                        beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter,
                        relative_step=relative_step, warmup_init=warmup_init)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eps1 = group["eps"][0]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise ConfigError(f"Adafactor: parameter of shape {tuple(p.shape)} has a sparse gradient; "
                                      "Adafactor needs dense gradients.")
                if grad.dtype in (torch.float16, torch.bfloat16):
                    grad = grad.float()
                factored = grad.dim() >= 2
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if group["beta1"] is not None:
                        state["exp_avg"] = torch.zeros_like(grad)
                    if factored:
                        state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                        state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                w = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
                state["step"] += 1
                t = state["step"]
                lr = step_size(group, t, _rms(w) if group["scale_parameter"] else None)
                rho = 1.0 - math.pow(t, group["decay_rate"])

                sq = grad.square().add_(eps1)
                if factored:
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.mul_(rho).add_(sq.mean(dim=-1), alpha=1.0 - rho)
                    col.mul_(rho).add_(sq.mean(dim=-2), alpha=1.0 - rho)
                    # V̂^{-1/2} = (R / mean R)^{-1/2} ⊗ C^{-1/2}, applied without forming V̂
                    r_inv = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
                    update = r_inv * col.unsqueeze(-2).rsqrt()
                    update.mul_(grad)
                else:
                    v = state["exp_avg_sq"]
                    v.mul_(rho).add_(sq, alpha=1.0 - rho)
                    update = v.rsqrt().mul_(grad)
                del sq
                update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
                update.mul_(lr)
                if group["beta1"] is not None:
                    m = state["exp_avg"]
                    m.mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
                    update = m
                if group["weight_decay"] != 0:
                    w.add_(w * (-group["weight_decay"] * lr))
                w.sub_(update)
                if w is not p:
                    p.copy_(w)
        return loss
