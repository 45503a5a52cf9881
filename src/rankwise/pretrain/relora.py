r"""ReLoRA and PeriodicLoRA: train a low-rank update, merge it into the frozen weight, restart.

**ReLoRA** (Lialin, Shivagunde, Muckatira, Rumshisky, "ReLoRA: High-Rank Training Through Low-Rank
Updates", ICLR 2024, arXiv 2307.05695; code ``Guitaricet/relora``, ``peft_pretraining/relora.py``
and ``training_utils.py``). Each target layer is

    y = W x + b + s · B A x,     s = alpha / rank,   W frozen,   A ∈ R^{r×n}, B ∈ R^{m×r} trained

and every ``reset_every`` optimizer steps (paper §3, "merge-and-reinit"):

    W ← W + s·B A;   A ← Kaiming-uniform(a=√5);   B ← 0                         (function unchanged)
    optimizer state of A and B: magnitude-prune ``prune`` = 99 % of the entries  ("partial reset")

with a *jagged* cosine learning rate (:func:`jagged_cosine`): the usual warmup then cosine decay to
``min_ratio``, but after each reset a short linear re-warmup to the value the cosine has at its
end — without it the pruned Adam state gives a loss spike. The sum of the merged updates has rank up to
``rank · (#resets)``, so W trains with high rank while only A and B (and their state) are stored.

*Warm start* (paper §3 and Table 3): ReLoRA starts from a model trained full-rank for a while
(5k of 20k steps for their 350M model, ablated as essential). ``warm_start_steps=N`` does this in
one run: W is trainable for the first N steps (A, B train too; at B=0 they change nothing at
first), at step N the factors are merged, W is frozen and its optimizer state freed. N must be a
multiple of ``reset_every`` so that the jagged schedule's restarts line up (pass N to
:func:`jagged_cosine` as ``warm_start``). Off by default: the
phase costs full-rank memory, and the paper's runs got it from a separate full-rank run.

**PeriodicLoRA** (Meng, Dai, Luo, et al., "PeriodicLoRA: Breaking the Low-Rank Bottleneck in LoRA
Optimization", arXiv 2402.16141): training in *stages*; at the end of each stage (here every
``reset_every`` steps) "unload" the LoRA weights into the backbone (W ← W + s·BA) and
re-initialise the LoRA states (A Kaiming, B = 0, optimizer state of A and B zeroed). No pruning of
the state, no jagged schedule (use any schedule). The paper's optional *momentum-based unloading*
is not implemented.

Defaults: rank 128, alpha 32 (s = 0.25), reset every 5000 steps, prune 0.99 (the paper's and the
authors' scripts for the 350M model: ``--lora_r 128 --relora 5000 --optimizer_magnitude_pruning
0.99 --restart_warmup_steps 100``); B starts at zero, so a fresh model computes W x + b.

Deviations: no LoRA dropout (the authors' layer has 0.1, their pretraining runs 0); no trainable
scaling or 4/8-bit W; the merge is computed in float32 and written in W's dtype; the pruning zeroes
exactly ``round(0.99·numel)`` entries (theirs: those ≤ the 99 % quantile); resets happen right
after optimizer step ``k·reset_every`` (theirs: one step later, after a step at lr 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import layer_generator, register
from ._optim import drop_state, reset_state


def _int(owner: str, name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{owner}: {name}={value!r} must be an int >= {low}.")


def _positive(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{owner}: {name}={value!r} must be a finite number > 0.")


class MergeLoRALinear(nn.Module):
    """``W x + b + s·B(A x)`` with W frozen; :meth:`merge_and_reinit` folds s·BA into W."""

    def __init__(self, linear: nn.Linear, rank: int, scale: float, generator: torch.Generator,
                 train_weight: bool = False):
        super().__init__()
        w = linear.weight
        self.in_features, self.out_features, self.rank, self.scale = linear.in_features, linear.out_features, rank, scale
        self.weight = nn.Parameter(w.detach(), requires_grad=train_weight)  # shares the storage, no copy
        self.bias = linear.bias
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merge_and_reinit(self, generator: torch.Generator) -> None:
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.lora_B.zero_()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, scale={self.scale}"


def _dense(module: MergeLoRALinear) -> torch.Tensor:
    w = module.weight.float() + (module.lora_B.float() @ module.lora_A.float()) * module.scale
    return w.to(module.weight.dtype)


def _merge_all(layers, optimizers, step: int, prune: float, mode: str) -> dict:
    for _, m in layers:
        m.merge_and_reinit(layer_generator(m, "reset", step))
    params = [p for _, m in layers for p in (m.lora_A, m.lora_B)]
    gen = torch.Generator(device=params[0].device).manual_seed(step) if mode == "random" else None
    zeroed = reset_state(optimizers, params, prune=prune, mode=mode, generator=gen)
    return {"merged_layers": len(layers), "optimizer_entries_zeroed": zeroed}


@register
class ReLoRA:
    """ReLoRA: merge-and-reinit every ``reset_every`` steps, 99 % magnitude pruning of A's and B's
    optimizer state, jagged cosine schedule (:func:`jagged_cosine`); math in the module docstring."""

    name = "relora"

    @dataclass
    class Config:
        rank: int = 128
        alpha: float = 32.0  # scale s = alpha / rank
        reset_every: int = 5000  # merge-and-reinit every K optimizer steps
        prune: float = 0.99  # fraction of A's and B's optimizer state zeroed at a reset (1 = full reset)
        prune_mode: str = "magnitude"  # or "random"
        warm_start_steps: int = 0  # full-rank training first (multiple of reset_every; 0 = none)

        def __post_init__(self):
            _int("relora", "rank", self.rank, 1)
            _positive("relora", "alpha", self.alpha)
            _int("relora", "reset_every", self.reset_every, 1)
            if isinstance(self.prune, bool) or not isinstance(self.prune, (int, float)) or not 0 < self.prune <= 1:
                raise ConfigError(f"relora: prune={self.prune!r} must be in (0, 1]: the fraction of the optimizer "
                                  "state of A and B zeroed at each reset (the paper: 0.99; 1 = full reset).")
            if self.prune_mode not in ("magnitude", "random"):
                raise ConfigError(f"relora: prune_mode={self.prune_mode!r}; use 'magnitude' or 'random'.")
            _int("relora", "warm_start_steps", self.warm_start_steps, 0)
            if self.warm_start_steps % self.reset_every:
                raise ConfigError(f"relora: warm_start_steps={self.warm_start_steps} is not a multiple of "
                                  f"reset_every={self.reset_every}; the restarts of the jagged schedule would not "
                                  "line up with the merges. Use a multiple (e.g. "
                                  f"{self.reset_every * max(1, round(self.warm_start_steps / self.reset_every))}).")

    @staticmethod
    def wrap(linear: nn.Linear, config, generator: torch.Generator) -> nn.Module:
        return MergeLoRALinear(linear, config.rank, config.alpha / config.rank, generator,
                               train_weight=config.warm_start_steps > 0)

    @staticmethod
    def dense_weight(module) -> torch.Tensor:
        return _dense(module)

    @classmethod
    def on_step(cls, model, layers, config, step, optimizers, total_steps):
        if step < config.warm_start_steps or step == 0 or step % config.reset_every:
            return None
        freed = 0
        if step == config.warm_start_steps:  # end of the full-rank warm start: freeze W
            weights = [m.weight for _, m in layers]
            for w in weights:
                w.requires_grad_(False)
                w.grad = None
            freed = drop_state(optimizers, weights)
        info = _merge_all(layers, optimizers, step, config.prune, config.prune_mode)
        if step == config.warm_start_steps:
            info["warm_start_ended"], info["weight_state_freed"] = True, freed
        return info


@register
class PeriodicLoRA:
    """PeriodicLoRA (PLoRA): unload s·BA into W and re-initialise A, B and their optimizer state
    every ``reset_every`` steps; math in the module docstring."""

    name = "periodic_lora"

    @dataclass
    class Config:
        rank: int = 128
        alpha: float = 32.0
        reset_every: int = 5000  # steps per stage
        reset_optimizer: bool = True  # zero the optimizer state of A and B at each unload

        def __post_init__(self):
            _int("periodic_lora", "rank", self.rank, 1)
            _positive("periodic_lora", "alpha", self.alpha)
            _int("periodic_lora", "reset_every", self.reset_every, 1)
            if not isinstance(self.reset_optimizer, bool):
                raise ConfigError(f"periodic_lora: reset_optimizer={self.reset_optimizer!r} must be True or False.")

    @staticmethod
    def wrap(linear: nn.Linear, config, generator: torch.Generator) -> nn.Module:
        return MergeLoRALinear(linear, config.rank, config.alpha / config.rank, generator)

    @staticmethod
    def dense_weight(module) -> torch.Tensor:
        return _dense(module)

    @classmethod
    def on_step(cls, model, layers, config, step, optimizers, total_steps):
        if step == 0 or step % config.reset_every:
            return None
        return _merge_all(layers, optimizers if config.reset_optimizer else [], step, 1.0, "magnitude")


def jagged_cosine(total_steps: int, warmup: int, reset_every: int, restart_warmup: int, min_ratio: float = 0.1,
                  warm_start: int = 0):
    """ReLoRA's learning-rate multiplier for ``torch.optim.lr_scheduler.LambdaLR``.

    ``LambdaLR`` calls it with ``s`` = optimizer steps taken, so optimizer step ``s + 1`` runs at
    ``lr · f(s)``; with ``c(t) = min_ratio + (1 - min_ratio)·(1 + cos(π (t - warmup) / (total_steps -
    warmup))) / 2``, ``n = s // reset_every`` and ``j = s % reset_every``::

        f(s) = (s + 1) / warmup                                        s < warmup
             = (j + 1) / restart_warmup · c(n·reset_every + restart_warmup)  n ≥ 1, n·reset_every ≥ warm_start,
                                                                           j < restart_warmup
             = c(s)                                                      otherwise (min_ratio once s ≥ total_steps)

    so the step right after a reset (ReLoRA merges after step ``n·reset_every``) starts a linear
    re-warmup to where the cosine is at its end. ``warm_start``: ReLoRA's ``warm_start_steps`` (no
    resets, so no re-warmups, before it). The authors' ``get_cosine_schedule_with_multiple_warmups``
    (``training_utils.py``) is the same with ``s`` and ``j`` in place of ``s + 1`` and ``j + 1`` (a
    first step, and a step after each reset, at lr 0).
    """
    for name, value, low in (("total_steps", total_steps, 1), ("warmup", warmup, 0), ("reset_every", reset_every, 1),
                             ("restart_warmup", restart_warmup, 0), ("warm_start", warm_start, 0)):
        _int("jagged_cosine", name, value, low)
    if warmup > reset_every:
        raise ConfigError(f"jagged_cosine: warmup={warmup} is longer than reset_every={reset_every}; the first reset "
                          "would come before the warmup ends. Lower warmup or raise reset_every.")
    if restart_warmup >= reset_every:
        raise ConfigError(f"jagged_cosine: restart_warmup={restart_warmup} must be below reset_every={reset_every}.")
    if isinstance(min_ratio, bool) or not isinstance(min_ratio, (int, float)) or not 0 <= min_ratio <= 1:
        raise ConfigError(f"jagged_cosine: min_ratio={min_ratio!r} must be in [0, 1] (the paper: 0.1).")

    def cosine(t: float) -> float:
        progress = min(1.0, (t - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if s >= total_steps:
            return min_ratio
        n, j = divmod(s, reset_every)
        if n >= 1 and n * reset_every >= warm_start and j < restart_warmup:
            return (j + 1) / restart_warmup * cosine(n * reset_every + restart_warmup)
        return cosine(s)

    return factor
