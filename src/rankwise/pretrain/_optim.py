"""Optimizer-state surgery for merges and restarts (ReLoRA's reset, a momentum reset, re-inits).

Rule: for a parameter ``p``, the tensors of ``optimizer.state[p]`` that are reset are the floating
tensors **of p's shape** (AdamW's ``exp_avg`` / ``exp_avg_sq``, SGD's ``momentum_buffer``). Everything
else is left alone: step counters (scalars), and projected moments of GaLore / APOLLO / Fira-style
optimizers, which live in the projector's ``(r, n)`` coordinates and have another shape (their
projector is refreshed by the optimizer itself), and quantized (integer) states. ``keys`` narrows the
reset to some state names (``("exp_avg",)`` resets the first moment only).

``prune=1`` zeroes the tensors; ``0 < prune < 1`` zeroes exactly ``round(prune · numel)`` entries of
each: the smallest in magnitude (``mode="magnitude"``, ReLoRA's default; ties broken by
``torch.topk``) or a uniformly random set (``mode="random"``, drawn from ``generator``). ReLoRA's
authors (``Guitaricet/relora``, ``training_utils.magnitude_pruning_``) zero the entries at or below
the ``prune`` quantile, which can zero a few more with ties; here the count is exact.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import ConfigError


def _inner(optimizers) -> list:
    out = []
    for opt in optimizers:
        inner = getattr(opt, "optimizers", None)  # rankwise.optim.layerwise handle
        out += list(inner.values()) if isinstance(inner, Mapping) else [opt]
    return out


@torch.no_grad()
def reset_state(optimizers, params, prune: float = 1.0, mode: str = "magnitude", keys=None,
                generator: torch.Generator | None = None) -> int:
    """Zero all (``prune=1``) or a fraction ``prune`` of the entries of the state tensors of
    ``params`` in ``optimizers`` (one optimizer or a list); see the module docstring for which
    tensors. Returns the number of entries set to zero (entries that were already zero count when
    they are among those chosen)."""
    if isinstance(prune, bool) or not isinstance(prune, (int, float)) or not 0 < prune <= 1:
        raise ConfigError(f"reset_state: prune={prune!r} must be in (0, 1] (the fraction of entries to zero).")
    if mode not in ("magnitude", "random"):
        raise ConfigError(f"reset_state: mode={mode!r}; use 'magnitude' (smallest |entries|) or 'random'.")
    if hasattr(optimizers, "param_groups") or hasattr(optimizers, "optimizers"):
        optimizers = [optimizers]
    zeroed = 0
    for opt in _inner(optimizers):
        for p in params:
            state = opt.state.get(p) if p in opt.state else None
            for key, t in (state or {}).items():
                if keys is not None and key not in keys:
                    continue
                if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.shape != p.shape:
                    continue
                n = t.numel()
                k = n if prune == 1 else round(prune * n)
                if k == n:
                    t.zero_()
                elif k > 0:
                    if mode == "magnitude":
                        idx = t.abs().reshape(-1).topk(k, largest=False, sorted=False).indices
                    else:
                        idx = torch.randperm(n, generator=generator, device=t.device)[:k]
                    mask = torch.zeros(n, dtype=torch.bool, device=t.device)
                    mask[idx] = True
                    t.masked_fill_(mask.view(t.shape), 0)
                zeroed += k
    return zeroed


def drop_state(optimizers, params) -> int:
    """Delete the whole optimizer state of ``params`` (a parameter that stops training, e.g.
    ReLoRA's ``W`` after its full-rank warm start); returns how many entries were freed."""
    if hasattr(optimizers, "param_groups") or hasattr(optimizers, "optimizers"):
        optimizers = [optimizers]
    freed = 0
    for opt in _inner(optimizers):
        for p in params:
            if p in opt.state:
                freed += sum(t.numel() for t in opt.state[p].values() if isinstance(t, torch.Tensor))
                del opt.state[p]
    return freed
