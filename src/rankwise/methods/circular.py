"""C3A: block-circulant adaptation by circular convolution (Chen et al., 2024, arXiv:2407.19342,
"Parameter-Efficient Fine-Tuning via Circular Convolution"; PEFT's ``c3a``).

``ΔW (m × n)`` is split into ``b × b`` blocks (``b`` divides ``m`` and ``n``); block ``(i, j)`` is the
circulant matrix of a trained kernel ``w_ij ∈ R^b``, scaled by ``1/n`` as in PEFT::

    ΔW[i·b + t, j·b + s] = w_ij[(s - t) mod b] / n          (i < m/b, j < n/b)
    y_i = (1/n) Σ_j w_ij ⋆ x_j,   (w ⋆ x)[t] = Σ_s w[(s - t) mod b] x[s]   (circular correlation)

Activation view (linear, HF Conv1D), ``path='fft'``: with real FFTs of length ``b`` per block,
``rfft(y_i) = (1/n) Σ_j rfft(x_j) · conj(rfft(w_ij))`` — per frequency a ``(m/b) × (n/b)`` complex
matrix acts on the blocks: ``O(N (m + n) log b + N m n / b)`` flops instead of ``N·m·n``, and
``ΔW`` is never formed. The autograd function keeps only the layer input (which the base holds
anyway) and the kernel; backward recomputes the input's FFT. ``path='dense'``: ``ΔW`` is gathered
from the kernels once per forward (``m × n`` entries, no arithmetic) and folded into ``W0``, one
product with ``W0 + ΔW`` (``computes_base``: one extra weight-gradient product per step over the
frozen layer). The FFT passes are memory-bound: measured on 2 CPU cores at MiniLM's shapes
(384×1536, b=128, N=2048) forward+backward of the FFT path cost about two products of the layer,
the dense path one; the FFT path's share shrinks as ``m·n/(m+n)`` grows. ``path='auto'`` (default)
takes the FFT path when ``m·n/(m+n) ≥ 1024`` (e.g. 4096×4096 layers), dense below. Embeddings gather
a token's column of ``ΔW`` straight from the kernels; convolutions take the dense path.

``b`` is the largest divisor of ``gcd(m, n)`` not above ``block_size`` (so any layer works; PEFT
instead refuses a ``block_size`` that does not divide both sides). Init of the kernels (PEFT's
options): ``xavier_uniform`` (default, ``U(±√(6/(m+n)))``), ``kaiming_uniform`` (``U(±1/√n)``),
``gaussian`` (``N(0, 1)``) or ``zeros`` (an exact no-op at init).

Parameters per layer: ``(m/b)·(n/b)·b = m·n/b``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import autocast_on, normal_, uniform_
from ..core.registry import register
from ..errors import ConfigError
from ._structured_common import (
    check_peft_shape,
    dense_forward,
    largest_divisor,
    require_peft_kinds,
    wide_dtype,
)

INITS = ("xavier_uniform", "kaiming_uniform", "gaussian", "zeros")
FFT_FROM = 1024  # path='auto': FFT when m·n/(m+n) reaches this (measured crossover on CPU, see docstring)


@dataclass
class CircularConfig(AdapterConfig):
    """block_size: b, the circulant block size (clamped per layer to the largest divisor of gcd(m, n)
    not above it); init: 'xavier_uniform' | 'kaiming_uniform' | 'gaussian' | 'zeros';
    path: activation view of dense layers, 'auto' | 'fft' | 'dense' (see the module docstring)."""

    block_size: int = 256
    init: str = "xavier_uniform"
    path: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        self._check_int("block_size")
        self._check(self.init in INITS, "init", f"use one of {', '.join(INITS)}.")
        self._check(self.path in ("auto", "fft", "dense"), "path", "use 'auto', 'fft' or 'dense'.")


def block_of(view: LayerView, config: CircularConfig) -> int:
    return largest_divisor(math.gcd(view.out_features, view.in_features), config.block_size)


class _BlockCirculant(torch.autograd.Function):
    """``y = (1/n) · C(w) x`` for a batch of rows ``x (N, n)`` and kernels ``w (m/b, n/b, b)``, by
    FFT; saves ``x`` and ``w`` only."""

    @staticmethod
    def forward(ctx, x2d, w, scale):
        ctx.scale = scale
        ctx.save_for_backward(x2d, w)
        i_blocks, j_blocks, b = w.shape
        xh = torch.fft.rfft(x2d.view(-1, j_blocks, b), dim=-1)  # N × J × f
        wh = torch.fft.rfft(w, dim=-1)  # I × J × f
        yh = torch.matmul(xh.permute(2, 0, 1), wh.conj().permute(2, 1, 0))  # f × N × I
        y = torch.fft.irfft(yh.permute(1, 2, 0), n=b, dim=-1)  # N × I × b
        return y.reshape(x2d.shape[0], i_blocks * b).mul_(scale)

    @staticmethod
    def backward(ctx, g):
        x2d, w = ctx.saved_tensors
        i_blocks, j_blocks, b = w.shape
        gh = torch.fft.rfft(g.reshape(-1, i_blocks, b), dim=-1).permute(2, 0, 1)  # f × N × I
        wh = torch.fft.rfft(w, dim=-1)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gx = torch.matmul(gh, wh.permute(2, 0, 1))  # f × N × J: Σ_i G_i W_ij (circular convolution)
            grad_x = torch.fft.irfft(gx.permute(1, 2, 0), n=b, dim=-1).reshape(x2d.shape).mul_(ctx.scale)
        if ctx.needs_input_grad[1]:
            xh = torch.fft.rfft(x2d.view(-1, j_blocks, b), dim=-1).permute(2, 0, 1)  # f × N × J
            gw = torch.matmul(gh.conj().transpose(1, 2), xh)  # f × I × J: Σ_rows conj(G_i) X_j
            grad_w = torch.fft.irfft(gw.permute(1, 2, 0), n=b, dim=-1).mul_(ctx.scale)
        return grad_x, grad_w, None


@register("circular")
class Circular(Method):
    """Block-circulant update applied by FFT (see module docstring)."""

    Config = CircularConfig
    summary = "ΔW block-circulant (b×b circulant blocks), applied by FFT as a circular convolution (C3A, Chen et al. 2024)"
    identity_at_init = False  # xavier_uniform kernels (PEFT's default); init='zeros' is an exact no-op
    default_lr = 5e-2  # kernels enter ΔW scaled by 1/n: PEFT recommends ~1e-1; 5e-2 measured stable on MiniLM
    demo_options = {"block_size": 128}

    def __init__(self, view: LayerView, config: CircularConfig, generator=None, calibration=None):
        super().__init__(view, config)
        m, n = view.out_features, view.in_features
        self.block = b = block_of(view, config)
        self.c3a_kernel = nn.Parameter(torch.zeros(m // b, n // b, b, **view.factory_kwargs))
        if config.init == "xavier_uniform":
            uniform_(self.c3a_kernel, math.sqrt(3.0) * math.sqrt(2.0 / (n + m)), generator)
        elif config.init == "kaiming_uniform":
            uniform_(self.c3a_kernel, math.sqrt(1.0 / n), generator)
        elif config.init == "gaussian":
            normal_(self.c3a_kernel, 1.0, generator)
        # [t, s] -> (s - t) mod b: the circulant pattern of one block
        ar = torch.arange(b, device=view.weight.device)
        self.register_buffer("_circ", (ar[None, :] - ar[:, None]) % b, persistent=False)
        fft = config.path == "fft" or (config.path == "auto" and m * n >= FFT_FROM * (m + n))
        self.use_fft = view.is_linear and fft
        self.computes_base = view.kind != "embedding" and not self.use_fft

    @classmethod
    def num_params(cls, view: LayerView, config: CircularConfig) -> int:
        return view.out_features * view.in_features // block_of(view, config)

    def _delta2d(self) -> torch.Tensor:
        w = self.c3a_kernel
        i_blocks, j_blocks, b = w.shape
        blocks = w[:, :, self._circ]  # I × J × b(t) × b(s)
        return blocks.permute(0, 2, 1, 3).reshape(i_blocks * b, j_blocks * b) / self.view.in_features

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        kind, w = self.view.kind, self.c3a_kernel
        n = self.view.in_features
        if self.use_fft:
            dt = wide_dtype(w)
            x2d = x.reshape(-1, n)
            if x2d.dtype != dt or autocast_on(x.device.type):
                x2d = x2d.to(dt)
            y = _BlockCirculant.apply(x2d, w.to(dt), 1.0 / n)
            return base_out + y.view(base_out.shape).to(base_out.dtype)
        if kind == "embedding":
            b = self.block
            q = x.reshape(-1)
            rows = w.permute(1, 2, 0)[(q // b)[:, None], ((q % b)[:, None] - torch.arange(b, device=q.device)) % b]
            y = rows.transpose(1, 2).reshape(*x.shape, -1) / n  # token's column of ΔW: N × I × b
            return base_out + y.to(base_out.dtype)
        return dense_forward(self.view, x, base_out, self._delta2d())

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param(self._delta2d())

    # ---- PEFT format (used by rankwise.io.peft) -------------------------------------------
    peft_type = "C3A"

    @classmethod
    def peft_accepts(cls, pcfg: dict) -> bool:
        return pcfg.get("peft_type") == "C3A"

    @classmethod
    def to_peft_config(cls, config: CircularConfig, views: list[LayerView]) -> dict:
        require_peft_kinds("circular", "C3A", views, ("linear",))
        blocks = {v.name: block_of(v, config) for v in views}
        # the largest block used: clamping it per module (as from_peft_config does) gives every module its block
        top = max(blocks.values())
        return {
            "peft_type": "C3A",
            "block_size": top,
            "block_size_pattern": {name: b for name, b in blocks.items() if b != top},
            "init_weights": True if config.init == "zeros" else config.init,
            "bias": "none",
        }

    @classmethod
    def from_peft_config(cls, pcfg: dict) -> dict:
        if pcfg.get("bias", "none") != "none":
            raise ConfigError("PEFT C3A adapter trains biases (bias != 'none'); rankwise's circular leaves "
                              "biases frozen.")
        init = pcfg.get("init_weights", "xavier_uniform")
        init = "zeros" if init is True else ("xavier_uniform" if init is False else init)
        # block_size_pattern: a module's block must equal rankwise's clamp of block_size there;
        # the kernel shapes are checked when tensors load
        return {"block_size": int(pcfg["block_size"]), "init": init if init in INITS else "xavier_uniform"}

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"c3a_kernel": self.c3a_kernel}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        t = tensors["c3a_kernel"]
        check_peft_shape(self.view, "c3a_kernel", t, self.c3a_kernel, f"block size {self.block}")
        with torch.no_grad():
            self.c3a_kernel.copy_(t)

    @classmethod
    def peft_suffixes(cls) -> tuple[str, ...]:
        return ("c3a_kernel",)
