"""Pieces shared by the structured adapters (``fourierft``, ``circular``, ``kron``, ``hra``, ``bone``,
``hira``): block-size clamping, the dense path used where a method forms ``ΔW``, the dtype of FFTs and solves,
and the checks that a layer fits PEFT's version of a method."""

from __future__ import annotations

import math

import torch

from ..core.layers import LayerView
from ..errors import ConfigError, ShapeMismatchError


def largest_divisor(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is ``≤ cap`` (at least 1)."""
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            for q in (d, n // d):
                if best < q <= cap:
                    best = q
    return best


def dense_forward(view: LayerView, x, base_out, delta2d: torch.Tensor, x_adapter=None) -> torch.Tensor:
    """The layer output with the canonical update ``delta2d`` formed densely.

    ``base_out`` given: ``base_out + op(x_adapter, ΔW)`` (``x_adapter`` defaults to ``x``; it is the
    dropped-out input where a method has dropout). ``base_out is None`` (the method computes the
    base, see ``computes_base``): ``op(x, W0 + ΔW) + bias`` — one product instead of two — or, with a
    separate adapter input, ``op(x, W0) + bias + op(x_adapter, ΔW)``.
    """
    w0 = view.weight2d()
    delta2d = delta2d.to(w0.dtype) if w0.is_floating_point() else delta2d
    if base_out is None:
        if x_adapter is None:
            return view.functional(x, w0 + delta2d)
        return view.functional(x, w0) + view.functional(x_adapter, delta2d, bias=False)
    out = view.functional(x if x_adapter is None else x_adapter, delta2d, bias=False)
    return base_out + out.to(base_out.dtype)


def wide_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for a half-precision ``t`` (CPU has no half FFT, triangular solve or QR), else ``t``'s dtype."""
    return torch.promote_types(t.dtype, torch.float32)


# ---- PEFT compatibility checks -----------------------------------------------------------------
def require_peft_kinds(method: str, peft_name: str, views, kinds) -> None:
    """PEFT's ``peft_name`` adapts only ``kinds``; refuse any other layer with the module named."""
    for v in views:
        if v.kind not in kinds:
            raise ConfigError(
                f"module '{v.name}' is a {type(v.base).__name__} (kind '{v.kind}'); PEFT's {peft_name} adapts "
                f"only {', '.join(kinds)} layers, so this {method} adapter cannot be exported. Save it with "
                "rw.save() instead, or leave the module out of targets."
            )


def require_plain_conv(method: str, peft_name: str, views, square: bool = False, dilation: bool = True) -> None:
    """PEFT's convolution adapters use zero padding (``square``: square kernels with equal stride and
    padding on both axes; ``dilation=False``: no dilation)."""
    for v in views:
        if v.kind not in ("conv1d", "conv2d"):
            continue
        c = v.base
        bad = []
        if c.padding_mode != "zeros":
            bad.append(f"padding_mode='{c.padding_mode}'")
        if isinstance(c.padding, str):
            bad.append(f"padding='{c.padding}'")
        if not dilation and any(d != 1 for d in c.dilation):
            bad.append(f"dilation={c.dilation}")
        if square and (len(set(c.kernel_size)) > 1 or len(set(c.stride)) > 1
                       or (not isinstance(c.padding, str) and len(set(c.padding)) > 1)):
            bad.append(f"kernel_size={c.kernel_size}, stride={c.stride}, padding={c.padding}")
        if bad:
            raise ConfigError(
                f"module '{v.name}' is a convolution with {', '.join(bad)}; PEFT's {peft_name} cannot represent "
                f"this {method} adapter there. Save it with rw.save() instead."
            )


def check_peft_shape(view: LayerView, key: str, got: torch.Tensor, expected: torch.Tensor, detail: str) -> None:
    if tuple(got.shape) != tuple(expected.shape):
        raise ShapeMismatchError(
            f"module '{view.name}': PEFT tensor {key} has shape {tuple(got.shape)}, rankwise expects "
            f"{tuple(expected.shape)} ({detail}, weight {view.out_features}x{view.in_features}). Load it onto "
            "the model it was trained on, with the same settings."
        )


def no_patterns(pcfg: dict, keys, method: str) -> None:
    for key in keys:
        if pcfg.get(key):
            raise ConfigError(
                f"PEFT adapter uses {key}={pcfg[key]}; rankwise's {method} has one setting per adapter. "
                "Re-export it from PEFT without per-module patterns."
            )
