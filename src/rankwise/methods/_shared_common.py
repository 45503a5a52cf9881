"""Transitional helpers still imported by adalora, increlora, aflora, dylora and ``_rank_common``
while they move to the core (``core.ops.low_rank_apply``, ``LayerView.factory_kwargs``,
``AdapterConfig._check_int``); lotr, flora_tucker, lamda, sora, compacter and hydra no longer use
them. Each is now a thin alias of its core replacement."""

from __future__ import annotations

import torch

from ..core.layers import LayerView
from ..core.ops import low_rank_apply


def float_kw(view: LayerView) -> dict:
    """dtype for adapter tensors (``view.param_dtype``: the base weight's, float32 for integer weights)."""
    return {"dtype": view.param_dtype}


def low_rank_forward(view: LayerView, x: torch.Tensor, base_out: torch.Tensor, a: torch.Tensor,
                     b: torch.Tensor, scale: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """``base_out + scale · b (a drop(x))``: :func:`rankwise.core.ops.low_rank_apply`."""
    return low_rank_apply(view, x, base_out, a, b, scale, dropout, training)


def positive_int(cfg, name: str, allow_zero: bool = False) -> None:
    """``cfg._check_int(name, low=0 or 1)``."""
    cfg._check_int(name, low=0 if allow_zero else 1)
