"""The factored layer that replaces a compressed ``nn.Linear`` (or HF ``Conv1D``).

::

    FactoredLinear:  y = up(core(down(x))) + b  =  (U · K · D) x + b
        down: nn.Linear(in → r, no bias)       D  (r × in)
        core: nn.Linear(r → r, no bias)        K  (r × r)   only for CUR (C · U · R)
        up:   nn.Linear(r → out, bias = b)     U  (out × r)

The factors are plain ``nn.Linear`` modules, so everything rankwise does to linear layers works on
them unchanged: ``rw.adapt(model, "lora", targets="all-linear")`` puts adapters on ``down`` and
``up`` (fine-tuning after compression, as SVD-LLM's "sequential low-rank approximation" trains LoRA
on its two factors), ``rw.merge`` folds them back, and ``rw.save`` / ``rw.load`` address them by
name (``...q_proj.down``). :func:`dense_weight` is the weight view ``U K D`` used for export.

Parameters: ``r · (in + out)`` (+ ``r²`` with a core) + the bias; a layer is only worth factoring
when that is below ``in · out``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapted import AdaptedLayer
from ..errors import ConfigError


class FactoredLinear(nn.Module):
    """``y = up(core(down(x)))`` with the original bias on ``up`` (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, core: bool = False, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, **kw)
        self.core = nn.Linear(rank, rank, bias=False, **kw) if core else None
        self.up = nn.Linear(rank, out_features, bias=bias, **kw)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, core: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, *, dtype=None) -> FactoredLinear:
        """A layer holding ``up (out × r)``, ``down (r × in)``, optional ``core (r × r)`` and ``bias``,
        in ``dtype`` (default: ``up``'s) on ``up``'s device."""
        dtype = dtype or up.dtype
        layer = cls(down.shape[1], up.shape[0], down.shape[0], core=core is not None, bias=bias is not None,
                    device=up.device, dtype=dtype)
        with torch.no_grad():
            layer.down.weight.copy_(down)
            layer.up.weight.copy_(up)
            if core is not None:
                layer.core.weight.copy_(core)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    @property
    def bias(self):
        return _plain(self.up).bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        if self.core is not None:
            h = self.core(h)
        return self.up(h)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """``U K D`` (out × in), computed in float32 (float64 for float64 factors), returned in the factors' dtype."""
        down, up = _weight(self.down), _weight(self.up)
        dt = torch.float64 if up.dtype == torch.float64 else torch.float32
        w = up.to(dt)
        if self.core is not None:
            w = w @ _weight(self.core).to(dt)
        return (w @ down.to(dt)).to(up.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
                + (", core=True" if self.core is not None else ""))


def _plain(m: nn.Module) -> nn.Module:
    return m.base if isinstance(m, AdaptedLayer) else m


def _weight(m: nn.Module) -> torch.Tensor:
    """The effective weight of a factor; an adapted factor (LoRA on ``down``/``up``) counts its active,
    unmerged adapters (``W0 + ΔW``)."""
    if isinstance(m, AdaptedLayer):
        live = [n for n in m.active if n not in m.merged]
        return m.base.weight + (m.delta_weight(live) if live else 0)
    return m.weight


def factored_layers(model: nn.Module) -> list[tuple[str, FactoredLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FactoredLinear)]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def dense_linear(layer: FactoredLinear) -> nn.Linear:
    """An ``nn.Linear`` computing the same function as ``layer`` (weight ``U K D``, same bias)."""
    w = layer.dense_weight()
    b = layer.bias
    lin = nn.Linear(layer.in_features, layer.out_features, bias=b is not None, device=w.device, dtype=w.dtype)
    lin.weight.copy_(w)
    if b is not None:
        lin.bias.copy_(b)
    return lin


def linear_forward(x: torch.Tensor, up, down, core=None, bias=None) -> torch.Tensor:
    """The factored product without a module (used by tests and checks)."""
    h = F.linear(x, down)
    if core is not None:
        h = F.linear(h, core)
    return F.linear(h, up, bias)


def check_rank(name: str, shape: tuple[int, int], rank: int) -> None:
    m, n = shape
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"compress: module '{name}' ({m}x{n}) got rank={rank!r}; give an integer ≥ 1.")
    if rank > min(m, n):
        raise ConfigError(f"compress: rank={rank} is larger than module '{name}' allows: its weight is {m}x{n}, so "
                          f"rank ≤ {min(m, n)}. Lower the rank (or its entry in the rank table).")
