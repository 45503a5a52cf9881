"""Pieces shared by the sparse / masked methods (sara, mask_tuning, pst).

* :func:`param_to_2d` — a tensor in the base parameter's layout → the canonical ``(out, in)`` matrix
  (the inverse of ``LayerView.to_param``);
* :func:`dense_forward` — the activation view of a method whose ``ΔW`` is a dense matrix anyway:
  one product with ``W0 + ΔW`` (``computes_base``), or ``base_out + ΔW x`` when stacked after
  another adapter;
* :class:`StraightThrough` — a hard (binary) mask in forward whose backward hands the incoming
  gradient to the real-valued scores unchanged (the straight-through estimator of Bengio et al. 2013,
  as Piggyback / movement pruning use it), optionally multiplied by a fixed 0/1 ``keep`` tensor
  (gradient dropout);
* :func:`adapters_named` — every adapter ``name`` of class ``cls`` on a model (for the class-level
  ``rank_regularization`` / ``on_step`` hooks).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.api import adapted_layers
from ..core.layers import LayerView


def param_to_2d(view: LayerView, t: torch.Tensor) -> torch.Tensor:
    """``t`` (shaped like the base weight) as the canonical ``(out, in)`` matrix."""
    if view.kind in ("hf_conv1d", "embedding"):
        return t.t()
    return t.reshape(view.out_features, -1)


def dense_forward(view: LayerView, x: torch.Tensor, base_out: torch.Tensor | None, delta2d: torch.Tensor):
    """``functional(x, W0 + ΔW)`` (``base_out`` None: the adapter computes the whole output), else
    ``base_out + functional(x, ΔW)`` without bias."""
    if base_out is None:
        w = view.weight2d()
        return view.functional(x, w + delta2d.to(w.dtype))
    return base_out + view.functional(x, delta2d.to(base_out.dtype), bias=False).to(base_out.dtype)


class StraightThrough(torch.autograd.Function):
    """``forward(scores, hard, keep) = hard`` (a bool tensor, returned in the scores' dtype);
    ``∂L/∂scores = ∂L/∂hard ⊙ keep`` (``keep`` None: 1)."""

    @staticmethod
    def forward(ctx, scores, hard, keep):
        ctx.save_for_backward(keep) if keep is not None else ctx.save_for_backward()
        ctx.has_keep = keep is not None
        return hard.to(scores.dtype)  # hard is bool: always a new tensor

    @staticmethod
    def backward(ctx, grad):
        if ctx.has_keep:
            (keep,) = ctx.saved_tensors
            grad = grad * keep.to(grad.dtype)
        return grad, None, None


def adapters_named(model: nn.Module, name: str, cls: type) -> list[nn.Module]:
    """The ``cls`` adapters called ``name`` on every adapted layer of ``model`` (model order)."""
    return [layer.adapters[name] for _, layer in adapted_layers(model)
            if name in layer.adapters and isinstance(layer.adapters[name], cls)]
