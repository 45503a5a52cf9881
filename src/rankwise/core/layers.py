"""Layer kinds: every supported base layer seen as one matrix ``W0 (out × in)``.

A method is written once against :class:`LayerView` and works on every kind it declares:

========== ====================== ==================== =============================
kind       module                 canonical ``W0``     ``in`` (flattened)
========== ====================== ==================== =============================
linear     ``nn.Linear``          ``weight``           ``in_features``
hf_conv1d  HF ``Conv1D`` (GPT-2)  ``weight.T``         ``nx``
conv1d     ``nn.Conv1d``          ``weight.reshape``   ``in_channels·k``
conv2d     ``nn.Conv2d``          ``weight.reshape``   ``in_channels·kh·kw``
embedding  ``nn.Embedding``       ``weight.T``         ``num_embeddings``
========== ====================== ==================== =============================

``apply_in(x, A)`` runs the layer's own operation with a weight whose canonical form is
``A (r × in)`` — a thin linear, a conv with ``r`` output channels, an embedding lookup —
and ``apply_out(h, B)`` maps the ``r`` channels to ``out`` (a 1×1 map on the channel
axis). So ``apply_out(apply_in(x, A), B) == functional(x, B @ A) - bias``, which is how
low-rank methods stay cheap on every kind.

bitsandbytes-quantized linears (QLoRA bases: ``bnb.nn.Linear4bit`` — nf4 / fp4 — and
``bnb.nn.Linear8bitLt`` with int8 weights) are kind ``linear``: ``in``/``out`` come from the
layer's ``in_features``/``out_features``, never from the packed storage (a 4-bit ``64×32``
weight is stored as ``1024×1`` bytes); the activation view runs the quantized layer itself, and
:meth:`LayerView.weight2d` returns the dequantized ``W0`` (``bnb.functional.dequantize_4bit``;
int8: ``CB · SCB / 127``, ``bnb.functional.int8_vectorwise_dequant``) on the weight's device, in
the layer's compute dtype — what PEFT's ``dequantize_bnb_weight`` computes. bitsandbytes is not
imported unless such a layer is met.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedLayerError

KINDS = ("linear", "hf_conv1d", "conv1d", "conv2d", "embedding")


def quantization_of(module: nn.Module) -> str | None:
    """``"4bit"`` / ``"8bit"`` for a bitsandbytes ``Linear4bit`` (and its ``LinearNF4``/``LinearFP4``)
    or ``Linear8bitLt``, else ``None`` (matched by class, so bitsandbytes need not be imported)."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes"):
            if cls.__name__ == "Linear4bit":
                return "4bit"
            if cls.__name__ == "Linear8bitLt":
                return "8bit"
    return None


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The dense ``(out, in)`` weight of a bitsandbytes linear, on its device, in its compute dtype
    (4-bit: ``compute_dtype``, else the dtype it was quantized from; 8-bit: float32). A weight not
    quantized yet (bitsandbytes quantizes when the layer is moved to its device) is returned as is."""
    import bitsandbytes.functional as bnbf

    w = module.weight
    quant = quantization_of(module)
    if quant == "4bit":
        state = getattr(w, "quant_state", None)
        if state is None:  # not quantized yet: still the float weight
            return w
        dtype = getattr(module, "compute_dtype", None) or state.dtype
        return bnbf.dequantize_4bit(w.data, state).to(dtype)
    if w.dtype != torch.int8:  # has_fp16_weights=True, or not quantized yet
        return w
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise ConfigError(f"bitsandbytes Linear8bitLt {tuple(w.shape)} holds int8 weights without their row "
                          "scales (SCB); load it through from_pretrained / .to(device) so bitsandbytes sets them.")
    return bnbf.int8_vectorwise_dequant(w.data, scb.to(w.device))


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of ``module``'s weight as a dense tensor: ``(out, in)`` for a bitsandbytes-quantized
    linear (not its packed storage), else ``weight.shape``. Saved adapters record it, so an adapter
    trained on a quantized base loads onto the unquantized one and back."""
    if quantization_of(module) is not None:
        return (module.out_features, module.in_features)
    w = getattr(module, "weight", None)
    return tuple(w.shape) if w is not None else (0,)


def kind_of(module: nn.Module) -> str | None:
    """The kind name of ``module`` or ``None`` when rankwise cannot adapt it."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    # Hugging Face's transposed linear (GPT-2 and friends); matched by shape, no import needed
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "hf_conv1d"
    return None


class LayerView:
    """A frozen base layer seen as the matrix ``W0`` of shape ``(out, in)``.

    Holds a plain (unregistered) reference to the base module, so methods can read the
    base weight without the base's parameters appearing twice in a state dict.
    """

    def __init__(self, base: nn.Module, name: str = "?"):
        kind = kind_of(base)
        if kind is None:
            raise UnsupportedLayerError(
                f"module '{name}' is a {type(base).__name__}; rankwise adapts {', '.join(KINDS)} "
                "layers. Pick targets that name such layers."
            )
        self.base = base
        self.kind = kind
        self.name = name
        self.quantization = quantization_of(base)  # "4bit" / "8bit" (bitsandbytes) or None
        w = base.weight
        if self.quantization is not None:  # the packed storage has another shape
            self.out_features, self.in_features = base.out_features, base.in_features
        elif kind == "linear":
            self.out_features, self.in_features = w.shape
        elif kind == "hf_conv1d":
            self.in_features, self.out_features = w.shape
        elif kind in ("conv1d", "conv2d"):
            self.out_features = w.shape[0]
            self.in_features = w[0].numel()
            self.kernel = tuple(w.shape[2:])
        else:  # embedding
            self.in_features, self.out_features = w.shape

    # ---- shapes -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def is_linear(self) -> bool:
        """A plain matrix product (``nn.Linear`` or HF ``Conv1D``): the fused kernels apply."""
        return self.kind in ("linear", "hf_conv1d")

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype adapter tensors use: the base weight's, or float32 for integer (quantized) weights
        (bitsandbytes' packed uint8 / int8 storage, as PEFT's QLoRA adapters)."""
        w = self.base.weight
        return w.dtype if w.is_floating_point() else torch.float32

    @property
    def factory_kwargs(self) -> dict:
        """``dtype`` and ``device`` for an adapter tensor of this layer: created where the base weight
        lives (CUDA, meta, …), never on the CPU and moved afterwards."""
        return {"dtype": self.param_dtype, "device": self.base.weight.device}

    @property
    def channel_dim(self) -> int:
        return 1 if self.kind in ("conv1d", "conv2d") else -1

    def weight2d(self) -> torch.Tensor:
        """``W0`` as a dense ``(out, in)`` matrix (a view of the base weight where possible; for a
        bitsandbytes-quantized base, the dequantized weight, computed on each call)."""
        if self.quantization is not None:
            return dequantized_weight(self.base)
        w = self.base.weight
        if self.kind in ("hf_conv1d", "embedding"):
            return w.t()
        if self.kind in ("conv1d", "conv2d"):
            return w.reshape(self.out_features, -1)
        return w

    def to_param(self, w2d: torch.Tensor) -> torch.Tensor:
        """Canonical ``(out, in)`` matrix → the base parameter's own layout (for a quantized base:
        the dense ``(out, in)`` layout of its dequantized weight)."""
        if self.quantization is not None:
            return w2d
        if self.kind in ("hf_conv1d", "embedding"):
            return w2d.t()
        if self.kind in ("conv1d", "conv2d"):
            return w2d.reshape(self.base.weight.shape)
        return w2d

    # ---- operations -----------------------------------------------------------------
    def functional(self, x: torch.Tensor, w2d: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The base layer's output for input ``x`` if its weight were ``w2d`` (canonical)."""
        b = self.base.bias if bias and self.kind != "embedding" else None
        if self.quantization is not None and b is not None and b.dtype != w2d.dtype:
            b = b.to(w2d.dtype)  # bitsandbytes keeps the bias in the dtype it was loaded in
        if self.kind in ("linear", "hf_conv1d"):
            return F.linear(x, w2d, b)
        if self.kind in ("conv1d", "conv2d"):
            return self.base._conv_forward(x, w2d.reshape(self.base.weight.shape), b)
        e = self.base
        return F.embedding(x, w2d.t(), e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)

    def apply_in(self, x: torch.Tensor, a2d: torch.Tensor) -> torch.Tensor:
        """The layer's operation with an ``(r, in)`` weight: ``r`` output channels, no bias."""
        if self.kind in ("linear", "hf_conv1d"):
            return F.linear(x, a2d)
        if self.kind in ("conv1d", "conv2d"):
            if self.base.groups != 1:
                raise UnsupportedLayerError(
                    f"module '{self.name}' is a grouped convolution (groups={self.base.groups}); "
                    "low-rank adapters need groups=1. Exclude it from targets."
                )
            return self.base._conv_forward(x, a2d.reshape(a2d.shape[0], *self.base.weight.shape[1:]), None)
        return F.embedding(x, a2d.t(), self.base.padding_idx)

    def apply_out(self, h: torch.Tensor, b2d: torch.Tensor) -> torch.Tensor:
        """Map ``r`` channels to ``out`` channels with ``b2d (out, r)`` on the channel axis."""
        if self.kind == "conv2d":
            return F.conv2d(h, b2d[:, :, None, None])
        if self.kind == "conv1d":
            return F.conv1d(h, b2d[:, :, None])
        return F.linear(h, b2d)

    def check_rank(self, rank: int, method: str) -> None:
        """Refuse ranks above ``min(out, in)``: the update could not use them."""
        limit = min(self.out_features, self.in_features)
        if rank > limit:
            raise ConfigError(
                f"{method} rank={rank} is larger than module '{self.name}' allows: its weight is "
                f"{self.out_features}x{self.in_features}, so rank ≤ {limit}. Lower rank or exclude the module."
            )

    def check_supported(self, method: str, kinds) -> None:
        if self.kind not in kinds:
            raise UnsupportedLayerError(
                f"method '{method}' cannot adapt module '{self.name}' ({type(self.base).__name__}, "
                f"kind '{self.kind}', weight {tuple(self.base.weight.shape)}); it supports "
                f"{', '.join(sorted(kinds))}. Remove this module from targets or use another method."
            )
        if self.kind in ("conv1d", "conv2d") and self.base.groups != 1:
            raise UnsupportedLayerError(
                f"module '{self.name}' is a grouped convolution (groups={self.base.groups}, weight "
                f"{tuple(self.base.weight.shape)}); low-rank adapters need groups=1. Exclude it from targets."
            )
        if self.kind == "embedding" and self.base.max_norm is not None:
            raise UnsupportedLayerError(
                f"module '{self.name}' is an Embedding with max_norm={self.base.max_norm}, which rewrites its "
                "weight in place on every lookup; adapters cannot be added to it. Set max_norm=None."
            )
