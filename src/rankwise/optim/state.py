"""Exact memory of an optimizer's state.

:func:`state_bytes` walks ``optimizer.state`` and reports, for every tensor, the bytes of the
storage behind it. Each storage is counted once (the first tensor that shows it gets the bytes,
later views 0), so a state that keeps a *view* of a larger matrix (say ``U[:, :r]`` of a full SVD)
is charged the whole matrix — the memory it really holds. Python numbers (step counters, seeds)
are not tensors and are not counted.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def _names(optimizer, names) -> dict[int, str]:
    if isinstance(names, nn.Module):
        names = {p: n for n, p in names.named_parameters(remove_duplicate=False)}
    out: dict[int, str] = {}
    if names is not None:
        for p, n in names.items():
            out.setdefault(id(p), n)
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            out.setdefault(id(p), f"group{gi}.param{pi}")
    return out


def _optimizers(optimizer):
    """``(optimizer, {id(param): name} or None)`` for the optimizers inside ``optimizer`` (a
    layer-wise handle holds one per parameter, keyed by the parameter's name)."""
    inner = getattr(optimizer, "optimizers", None)
    if isinstance(inner, Mapping):
        return [(opt, {id(p): name for g in opt.param_groups for p in g["params"]}) for name, opt in inner.items()]
    return [(optimizer, None)]


def state_bytes(optimizer, names: nn.Module | Mapping | None = None) -> dict[str, int]:
    """Bytes of optimizer state by tensor, ``{"<param name>.<state key>": bytes, ..., "total": sum}``.

    ``names`` — a model (its ``named_parameters``) or a ``{parameter: name}`` mapping; parameters
    without a name are called ``group<i>.param<j>``. Works for any ``torch.optim.Optimizer`` and
    for the handle of :func:`rankwise.optim.layerwise`."""
    out: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()

    def visit(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key = (str(value.device), storage.data_ptr())
            nbytes = 0
            if key not in seen or storage.data_ptr() == 0:
                seen.add(key)
                nbytes = storage.nbytes()
            out[prefix] = out.get(prefix, 0) + nbytes
        elif isinstance(value, Mapping):
            for k, v in value.items():
                visit(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(f"{prefix}.{i}", v)

    for opt, own in _optimizers(optimizer):
        pnames = {**_names(opt, names), **own} if own and names is None else _names(opt, names)
        for p, st in opt.state.items():
            base = pnames.get(id(p), f"param{len(out)}")
            for k, v in st.items():
                visit(f"{base}.{k}", v)
    out["total"] = sum(out.values())
    return out
