"""``AdaptedLayer``: a frozen base layer plus any number of named adapters.

It replaces the base module in its parent. Forward runs the base once and then each
active, unmerged adapter on the running output::

    out = base(x)
    for name in active:          # additive methods: out = out + ΔW_name x
        out = adapters[name](x, out)

A method that must form ΔW anyway (HiRA's ``W0 ⊙ BA``, Bone's block products) may set
``computes_base = True``: when it is the first active, unmerged adapter it is called as
``forward(x, None)`` and returns the whole layer output from one product with ``W0 + ΔW``
(bias included), which saves the base layer's own matmul in forward and in backward.

For additive methods (LoRA and every method whose update is ``W0 + ΔW``) several active
adapters sum exactly, and the weight view is ``W0 + Σ ΔW_name``; a method that rescales the
output (DoRA-like) acts on the running output, so stacking such methods is order-dependent.

``merge`` folds ``delta_weight()`` into the base weight (so inference runs at the bare
model's speed) and ``unmerge`` subtracts it again. A method whose update reads ``W0`` itself
(DoRA's column norms, Householder reflections, ``W0``-scaled updates) sets ``reads_base = True``:
its ΔW would change once ``W0`` holds merged updates, so merge keeps the exact ΔW it added (one
weight-sized buffer per such merged adapter) and unmerge subtracts that; while merged,
``delta_weight`` of such an adapter also returns the kept ΔW.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import AdapterNotFoundError, ConfigError
from .distributed import layer_delta
from .layers import LayerView

MERGED_KEY = "rankwise_merged."  # state_dict key prefix of an adapter merged into base.weight


def _save_merged(module: AdaptedLayer, state_dict: dict, prefix: str, local_metadata) -> None:
    """A merged adapter's ΔW is inside ``base.weight``: say so in the state dict (the ΔW kept for
    unmerging where the method reads W0, else a 0-d marker), so loading it elsewhere cannot apply it twice."""
    for n in module.merged:
        kept = module._merged_delta.get(n)
        state_dict[f"{prefix}{MERGED_KEY}{n}"] = kept if kept is not None else torch.ones(())


def _load_merged(module: AdaptedLayer, state_dict: dict, prefix: str, *args) -> None:
    saved = {k[len(prefix) + len(MERGED_KEY):]: k for k in list(state_dict)
             if k.startswith(prefix + MERGED_KEY) and "." not in k[len(prefix) + len(MERGED_KEY):]}
    if not any(k.startswith(prefix + "base.") for k in state_dict):
        return  # the base weight is not being loaded: its merge state cannot change
    if sorted(saved) != sorted(module.merged):
        raise ConfigError(
            f"module '{module.view.name}': the state dict was taken with adapter(s) {sorted(saved) or 'none'} merged "
            f"into the base weight, but this model has {sorted(module.merged) or 'none'} merged; loading it would "
            f"apply ΔW {'twice' if set(saved) - set(module.merged) else 'not at all'}. Make the merge state match first "
            "(rw.merge(model) / rw.unmerge(model)), or move adapters with rw.save / rw.load.")
    for n, key in saved.items():
        value = state_dict.pop(key)
        if n in module._merged_delta and value.shape == module._merged_delta[n].shape:
            module._merged_delta[n] = value.detach().to(module._merged_delta[n]).clone()


class AdaptedLayer(nn.Module):
    _mixed = None  # the open rw.mixed_batch block, if any: it computes forward per row (core/mixed.py)

    def __init__(self, base: nn.Module, name: str, view: LayerView | None = None):
        super().__init__()
        self.base = base
        self.view = LayerView(base, name) if view is None else view  # the adapters' own view of ``base``
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self._merged_delta: dict[str, torch.Tensor] = {}  # only for methods with reads_base
        self.register_state_dict_post_hook(_save_merged)
        self.register_load_state_dict_pre_hook(_load_merged)

    # Code written for the bare layer often reads .weight / .bias / in_features directly.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self):
        return getattr(self.base, "bias", None)

    def __getattr__(self, item):
        try:
            return super().__getattr__(item)
        except AttributeError:
            base = self._modules.get("base")
            if base is not None and item in ("in_features", "out_features", "nf", "nx", "in_channels",
                                             "out_channels", "kernel_size", "num_embeddings",
                                             "embedding_dim", "padding_idx"):
                return getattr(base, item)
            raise

    def forward(self, x, *args, **kwargs):
        if self._mixed is not None:
            return self._mixed.layer_forward(self, x, *args, **kwargs)
        if self.merged and self.training and torch.is_grad_enabled() and any(
                p.requires_grad for n in self.merged for p in self.adapters[n].parameters()):
            raise ConfigError(
                f"module '{self.view.name}': adapter(s) {self.merged} are merged into the base weight, so their "
                "parameters would get no gradient. Call rw.unmerge(model) before training; for inference use "
                "model.eval() or torch.no_grad()."
            )
        live = [n for n in self.active if n not in self.merged]
        if live and not args and not kwargs and self.adapters[live[0]].computes_base:
            # the first adapter folds W0 into its own product (one matmul with W0 + ΔW): forward(x, None)
            out = self.adapters[live[0]](x, None)
            live = live[1:]
        else:
            out = self.base(x, *args, **kwargs)
        for name in live:
            out = self.adapters[name](x, out)
        return out

    # ---- adapters ------------------------------------------------------------------------
    def add(self, name: str, adapter: nn.Module) -> None:
        self.adapters[name] = adapter
        self.active.append(name)

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        del self.adapters[name]
        if name in self.active:
            self.active.remove(name)

    def delta_weight(self, names=None) -> torch.Tensor:
        """Sum of the weight views of ``names`` (default: active) in the base weight's layout."""
        names = self.active if names is None else names
        w = self.base.weight
        total = torch.zeros_like(w)
        for n in names:
            self._check(n)
            total += self._delta(n).to(w.dtype)
        return total

    def _delta(self, name: str) -> torch.Tensor:
        kept = self._merged_delta.get(name)
        return kept if kept is not None else self.adapters[name].delta_weight()

    @torch.no_grad()
    def merge(self, names=None) -> None:
        names = [n for n in (self.active if names is None else names) if n not in self.merged]
        for n in names:
            self._check(n)
            delta = layer_delta(self, n)  # under FSDP2: this rank's shard of the whole ΔW (core/distributed.py)
            if self.adapters[n].reads_base:
                self._merged_delta[n] = delta.detach().clone()
            self.base.weight.add_(delta)  # in place under no_grad: bumps the version counter (caches of W0 see it)
            self.merged.append(n)

    @torch.no_grad()
    def unmerge(self, names=None) -> None:
        names = list(reversed(self.merged)) if names is None else [n for n in names if n in self.merged]
        for n in names:
            self.base.weight.sub_(layer_delta(self, n))
            self._merged_delta.pop(n, None)
            self.merged.remove(n)

    def _check(self, name: str) -> None:
        if name not in self.adapters:
            raise AdapterNotFoundError(
                f"module '{self.view.name}' has no adapter '{name}'; it has {list(self.adapters)}."
            )

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"


class TrainedCopies(nn.Module):
    """A module some adapters train fully (``modules_to_save``, e.g. a classifier head).

    It keeps the frozen ``original`` and one trainable copy per adapter; forward runs the copy
    of the active adapter, or the original when no adapter with a copy is active. So several
    adapters can each own a head, and ``set_active(model, None)`` gives the base model back.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None

    _mixed = None  # the open rw.mixed_batch block, if any (core/mixed.py)

    def add(self, name: str) -> nn.Module:
        new = copy.deepcopy(self.original)
        for p in new.parameters():
            p.requires_grad_(True)
        self.copies[name] = new
        return new

    def current(self) -> nn.Module:
        return self.copies[self.active] if self.active in self.copies else self.original

    def forward(self, *args, **kwargs):
        if self._mixed is not None:
            return self._mixed.copies_forward(self, *args, **kwargs)
        return self.current()(*args, **kwargs)

    @property
    def weight(self):
        return self.current().weight

    @property
    def bias(self):
        return getattr(self.current(), "bias", None)

    def extra_repr(self) -> str:
        return f"active={self.active!r}"
