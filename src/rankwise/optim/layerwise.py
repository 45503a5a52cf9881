"""Layer-wise (per-parameter) optimizer steps inside the backward pass (GaLore, Zhao et al., 2024, §4.3).

``layerwise(model, opt_factory)`` gives every trainable parameter its own optimizer and registers a
``post_accumulate_grad_hook`` on it that steps that optimizer as soon as the parameter's gradient
is complete, then frees the gradient. During ``loss.backward()`` each weight is updated and its
gradient released before the next one is computed, so at most one parameter's gradient (plus
the ones autograd is still accumulating) is alive at any time, instead of all of them. With the
same per-parameter arithmetic, the result equals stepping the whole model after backward.

    handle = rw.optim.layerwise(model, lambda groups: rw.optim.GaLoreAdamW(groups, lr=1e-3),
                                params=rw.optim.param_groups(model, rank=128))
    sched = torch.optim.lr_scheduler.LambdaLR(handle, lambda s: min(1, (s + 1) / 100))
    for batch in data:
        model(**batch).loss.backward()   # parameters are updated here
        handle.step()                    # no-op placeholder, keeps ordinary loops and schedulers happy
        sched.step()
    handle.remove()                      # unhook; the model trains normally again

The handle is a ``torch.optim.Optimizer`` whose ``param_groups`` *are* the per-parameter
optimizers' group dicts, so any ``torch.optim.lr_scheduler`` built on it (and the Hugging Face
Trainer, given ``optimizers=(handle, scheduler)``) changes the learning rate of every
per-parameter optimizer. ``handle.state_dict()`` / ``load_state_dict()`` save and restore all of
them. Limits, by construction: global gradient clipping and anything else that needs all
gradients at once cannot run (clip inside the factory's optimizer if needed); gradient
accumulation is supported with ``accumulation_steps=k`` (a parameter steps on every k-th
backward, keeping its own gradient until then).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..core.distributed import is_sharded
from ..errors import ConfigError
from ._common import LowRankOptimizer


class LayerwiseHandle(torch.optim.Optimizer):
    """What :func:`layerwise` returns: ``.optimizers`` (``{parameter name: optimizer}``),
    ``.remove()``, and the ``torch.optim.Optimizer`` interface for schedulers and trainers."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], hooks: list, accumulation_steps: int):
        shared = [g for opt in optimizers.values() for g in opt.param_groups]
        super().__init__([{"params": list(g["params"])} for g in shared], {})
        self.param_groups = shared  # the per-parameter optimizers' own dicts: lr changes reach them
        self.optimizers = optimizers
        self.accumulation_steps = accumulation_steps
        self._hooks = hooks

    def step(self, closure=None):
        """Parameters are stepped in their gradient hooks during ``backward``; this only runs
        ``closure`` (which should call ``backward``) when one is given."""
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def remove(self) -> None:
        """Remove the gradient hooks (idempotent)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def state_dict(self) -> dict:
        return {"layerwise": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("layerwise") if isinstance(state_dict, dict) else None
        if saved is None or set(saved) != set(self.optimizers):
            missing = sorted(set(self.optimizers) - set(saved or {}))[:5]
            raise ConfigError(f"LayerwiseHandle.load_state_dict: the saved state is not a layer-wise state for "
                              f"these parameters (missing e.g. {missing}); save it with handle.state_dict().")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(saved[name])
        # load_state_dict replaces each optimizer's group dicts: share the new ones
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]

    def __repr__(self) -> str:
        kinds = sorted({type(o).__name__ for o in self.optimizers.values()})
        return f"LayerwiseHandle({len(self.optimizers)} parameters, {', '.join(kinds)})"


def layerwise(model: nn.Module, opt_factory: Callable[[list[dict]], torch.optim.Optimizer], *,
              params: Iterable | None = None, accumulation_steps: int = 1, process_group=None) -> LayerwiseHandle:
    """Step every trainable parameter of ``model`` in its gradient hook (see the module docstring).

    ``opt_factory(groups)`` builds the optimizer of one parameter from a one-group list
    ``[{"params": [p], **options}]``. ``params``: param groups to take the options from (e.g.
    :func:`rankwise.optim.param_groups`); default all trainable parameters, no options.

    Several processes (``torch.distributed`` initialized, world size > 1): each hook averages its
    gradient over ``process_group`` (default: the world) with an ``all_reduce`` before stepping, so
    every replica steps on the same averaged gradient — what DDP would give — and the replicas stay
    identical (the GaLore projector too: it is computed from that same gradient). Do not wrap the
    model in ``DistributedDataParallel``: DDP would all-reduce each gradient again after these hooks
    have stepped, and its buckets hold a copy of every gradient, which undoes the memory saving; a
    DDP-wrapped model is refused (the Hugging Face Trainer wraps the model later, after the handle is
    built: the weights are still right, ``tests/integrations/test_hf_trainer_ddp.py``), and so is an
    FSDP2-sharded one (its hooks would see gradients before the reduce-scatter).
    """
    if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ConfigError(f"layerwise: accumulation_steps={accumulation_steps!r} must be an int ≥ 1.")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ConfigError(
            "layerwise: the model is wrapped in DistributedDataParallel, which would all-reduce every gradient a "
            "second time after the layer-wise hooks have averaged it and stepped, and keeps gradient buckets the "
            "size of all gradients (the memory layer-wise steps exist to save). Pass the unwrapped model "
            "(model.module): layerwise averages each gradient across processes itself. (Under the Hugging Face "
            "Trainer, which wraps the model after the handle is built, the result is still correct: tested.)")
    if any(is_sharded(p) for p in model.parameters()):
        raise ConfigError(
            "layerwise: the model is sharded (FSDP2 fully_shard: its parameters are DTensors), so a parameter's "
            "gradient hook sees an unreduced gradient before FSDP reduce-scatters it, and stepping there would "
            "diverge across ranks. Use one optimizer for the whole model (rw.optim.GaLoreAdamW(...) and "
            "optimizer.step() after backward: it steps each sharded matrix whole), or layerwise without sharding.")
    names = {id(p): n for n, p in model.named_parameters()}
    if params is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    else:
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
    optimizers: dict[str, torch.optim.Optimizer] = {}
    hooks = []
    seen = set()
    for group in groups:
        options = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            name = names.get(id(p))
            if name is None:
                raise ConfigError(f"layerwise: a parameter of shape {tuple(p.shape)} in params is not a parameter "
                                  f"of {type(model).__name__}; pass param groups built from this model.")
            opt = opt_factory([{"params": [p], **options}])
            if not isinstance(opt, torch.optim.Optimizer):
                raise ConfigError(f"layerwise: opt_factory returned {type(opt).__name__} for {name!r}; it must "
                                  "return a torch.optim.Optimizer.")
            if isinstance(opt, LowRankOptimizer):  # per-parameter seeds as if one optimizer held all
                opt._pindex = {id(p): len(seen) - 1}
            optimizers[name] = opt
            hooks.append(p.register_post_accumulate_grad_hook(_make_hook(opt, accumulation_steps, process_group)))
    if not optimizers:
        raise ConfigError(f"layerwise: {type(model).__name__} has no trainable parameter to step.")
    low = [opt for opt in optimizers.values() if isinstance(opt, LowRankOptimizer)
           and opt.is_low_rank(opt.param_groups[0]["params"][0], opt.param_groups[0])]
    for i, opt in enumerate(low):  # stagger_refresh spreads the refreshes over all of them, as one optimizer would
        opt._stagger_slot = (i, len(low))
    return LayerwiseHandle(optimizers, hooks, accumulation_steps)


def _world(process_group) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _make_hook(opt: torch.optim.Optimizer, every: int, process_group=None):
    calls = [0]

    def hook(param: torch.Tensor) -> None:
        calls[0] += 1
        if calls[0] % every:
            return
        world = _world(process_group)
        if world > 1:  # every process runs the same hooks in the same (backward) order
            import torch.distributed as dist

            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=process_group)
            param.grad.div_(world)
        opt.step()
        param.grad = None

    return hook
