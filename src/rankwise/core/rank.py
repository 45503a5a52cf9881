"""Rank allocation during training: one entry point for every loop.

Methods that change their rank (or which parameters train) while training — AdaLoRA, DyLoRA,
IncreLoRA, AfLoRA, SoRA (proximal step on its gates, pruning), LaMDA (progressive freezing) — or
that add a term to the loss — AdaLoRA and IncreLoRA (orthogonality), SORSA (orthonormal
regularizer), HRA (with ``reg > 0``) — expose two optional class-level hooks, and any training
loop drives them through the two functions here::

    for step, batch in enumerate(batches, start=1):
        loss = loss_fn(model, batch)
        reg = rw.rank_regularization(model)        # AdaLoRA's orthogonality term, or None
        (loss if reg is None else loss + reg).backward()
        optimizer.step()
        rw.rank_step(model, step, optimizer)       # after optimizer.step(), before zero_grad()
        optimizer.zero_grad()

``rank_step`` must run while the gradients of the step are still in ``.grad`` (importance scores
are ``|θ · ∇θ|``) and before a scheduler changes the learning rate (SoRA thresholds by the step's
``lr``), with ``step`` counted from 1 (the number of optimizer steps taken).
:func:`rankwise.train.train` calls both. A method's hooks (see the method files):

* ``on_step(model, name, step, optimizers, total_steps) -> dict | None`` (classmethod; ``total_steps``
  is the loop's length or None): update importance
  scores, mask / grow / prune / freeze; it keeps the optimizer's per-parameter state consistent
  with any shape change (each method documents how) and records new per-layer ranks in the
  adapter's saved overrides, so ``rw.save`` / ``rw.load`` rebuild them;
* ``rank_regularization(model, name) -> Tensor | None`` (classmethod): a term to add to the loss.

Under FSDP2 the hooks see whole tensors: every ``DTensor`` of the adapter and of its layers' base
weights is all-gathered for the call (:func:`rankwise.core.distributed.gathered`: for ``on_step`` with
its gradient and the optimizers' state, in-place changes then cut back into the shards; differentiably
for ``rank_regularization``, whose gradient reaches the shards). That is one all-gather of each adapted
layer per step and hook, for the methods that have hooks. A hook that replaces or resizes a parameter
(a rank that grows or shrinks) is refused there with a clear error.

``rank_step`` also runs :func:`rankwise.pretrain.pretrain_step` for a model parametrized with
:func:`rankwise.pretrain.parametrize` (ReLoRA's merge-and-reinit, SLTrain's refactorization …), so
those events need no extra call either; its info is returned under the key ``"pretrain"``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .api import adapter_state
from .distributed import gathered, is_sharded
from .registry import get_method


def _optimizers(optimizer) -> list:
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    return list(optimizer)


def _adapter_modules(model: nn.Module, name: str) -> list[nn.Module]:
    """The modules a hook of adapter ``name`` may read: each layer's adapter and base layer (hooks read
    ``W0``), and the adapter's shared module."""
    from .api import adapted_layers

    layers = [layer for _, layer in adapted_layers(model) if name in layer.adapters]
    shared = adapter_state(model)[name].get("shared")
    return ([layer.adapters[name] for layer in layers] + [layer.base for layer in layers]
            + ([shared] if isinstance(shared, nn.Module) else []))


def _hooked(model: nn.Module, hook: str):
    for name, entry in adapter_state(model).items():
        cls = get_method(entry["config"].method)
        fn = getattr(cls, hook)
        if fn is not None:
            if cls.resizes and any(is_sharded(p) for m in _adapter_modules(model, name) for p in m.parameters()):
                raise ConfigError(
                    f"adapter '{name}': method '{cls.name}' changes the shape of its parameters while training (its "
                    "rank grows), but the model is FSDP2-sharded and shards have fixed shapes. Train it with "
                    "DistributedDataParallel (adapters are small: rankwise.train wraps an unsharded model), or use a "
                    "fixed-rank method (adalora masks its rank instead of growing it).")
            yield name, fn


def rank_step(model: nn.Module, step: int, optimizer=None, total_steps: int | None = None) -> dict:
    """Run every adapter's ``on_step`` hook for optimizer step ``step`` (1-based). ``optimizer``
    (one or a list) is the one whose state must follow rank changes; ``total_steps``, the loop's
    number of steps, is used by schedules whose config leaves ``total_step`` None (``rankwise.train``
    passes it). Returns ``{adapter: info}``
    for the adapters whose hook reported something (budgets, new ranks, frozen matrices)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TypeError(f"rank_step: step={step!r} must be the number of optimizer steps taken (an int ≥ 0).")
    opts = _optimizers(optimizer)
    out = {}
    for name, fn in _hooked(model, "on_step"):
        with gathered(*_adapter_modules(model, name), grads=True, write_back=True, optimizers=opts):  # FSDP2
            info = fn(model, name, step, opts, total_steps)
        if info:
            out[name] = info
    from ..pretrain import pretrain_step  # lazy: rankwise.pretrain imports the parametrizations

    info = pretrain_step(model, step, opts, total_steps)
    if info:
        out["pretrain"] = info
    return out


def rank_regularization(model: nn.Module) -> torch.Tensor | None:
    """Sum of the adapters' loss terms (AdaLoRA's orthogonality regularizer, SORSA's orthonormal
    one, …), or None if none has one."""
    total = None
    for name, fn in _hooked(model, "rank_regularization"):
        with gathered(*_adapter_modules(model, name), differentiable=True):  # FSDP2: gradients reach the shards
            term = fn(model, name)
        if term is not None:
            total = term if total is None else total + term
    return total


def has_rank_hooks(model: nn.Module) -> bool:
    """Whether any adapter of ``model`` has an ``on_step`` or ``rank_regularization`` hook, or the
    model's pretraining parametrization (:mod:`rankwise.pretrain`) has an ``on_step``."""
    from ..pretrain import has_step_hook

    return (any(True for _ in _hooked(model, "on_step")) or any(True for _ in _hooked(model, "rank_regularization"))
            or has_step_hook(model))
