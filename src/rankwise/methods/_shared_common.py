"""Pieces shared by the methods lotr, flora_tucker, lamda, sora, compacter and hydra.

``low_rank_forward`` is LoRA's activation path (one autograd node on linear layers, the layer's
own operation through :class:`LayerView` elsewhere) for any update that factors as
``ΔW = s · b a`` with ``a (r × in)`` and ``b (out × r)`` — the factors may be computed tensors
(``b = U G``, ``b = B ⊙ g`` …): autograd carries their gradients back to the parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.layers import LayerView
from ..core.ops import LowRankLinear, autocast_on, keep_mask, lowrank_branch


def float_kw(view: LayerView) -> dict:
    """dtype for adapter tensors: the base weight's, or float32 for integer (quantized) weights."""
    w = view.weight
    return {"dtype": w.dtype if w.is_floating_point() else torch.float32}


def low_rank_forward(view: LayerView, x: torch.Tensor, base_out: torch.Tensor, a: torch.Tensor,
                     b: torch.Tensor, scale: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """``base_out + scale · b (a drop(x))`` on the layer's kind, never forming ``b a``."""
    linear = view.kind in ("linear", "hf_conv1d")
    dropping = dropout > 0 and training
    if linear and x.dtype == a.dtype == b.dtype == base_out.dtype and not autocast_on(x.device.type):
        mask, keep = None, 1.0
        if dropping:
            keep = 1.0 - dropout
            mask = keep_mask(x, keep)
        if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad
                                        or base_out.requires_grad):
            return LowRankLinear.apply(x, base_out, a, b, scale, mask, keep)
        return lowrank_branch(x, base_out, a, b, scale / keep, mask)
    if x.is_floating_point() and x.dtype != a.dtype:
        x = x.to(a.dtype)
    if dropping and x.is_floating_point():
        x = F.dropout(x, dropout, training=True)
    h = view.apply_in(x, a)
    return base_out + (view.apply_out(h, b.to(h.dtype)) * scale).to(base_out.dtype)


def random_orthonormal(rows: int, cols: int, generator, dtype=torch.float32) -> torch.Tensor:
    """``rows × cols`` (rows ≥ cols) with orthonormal columns, Haar-distributed: QR of a Gaussian
    with the signs of ``diag(R)`` folded in (so the law does not depend on LAPACK's sign choice)."""
    g = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs).to(dtype)


def kaiming_bound(fan_in: int) -> float:
    """PyTorch's Linear default bound ``1/√fan_in`` (kaiming-uniform with a = √5)."""
    return 1.0 / math.sqrt(max(1, fan_in))


def positive_int(cfg, name: str, allow_zero: bool = False) -> None:
    v = getattr(cfg, name)
    low = 0 if allow_zero else 1
    cfg._check(isinstance(v, int) and not isinstance(v, bool) and v >= low, name,
               f"{name} must be an integer ≥ {low}.")
