"""LoftQ: LoRA-Fine-Tuning-aware Quantization (Li, Yu, Liang, He, Karampatziakis, Chen & Zhao,
ICLR 2024, arXiv:2310.08659).

QLoRA runs a quantized backbone ``Q(W0)`` plus a zero-initialized LoRA, so training starts from a
model that is off by the quantization error. LoftQ instead picks ``Q`` and the LoRA factors
jointly, alternating ``T`` times (``iters``)::

    L R ← 0
    repeat T times:
        Q   ← quantize(W0 − s·L R)                    (block-wise absmax, NF4 by default)
        L R ← top-r SVD of (W0 − Q)                   (Eckart–Young: best rank-r fit of the residual)
    A₀ = √(S_r/s) V_rᵀ,  B₀ = U_r √(S_r/s)            (so s·B₀A₀ = U_r S_r V_rᵀ)

and the adapted layer computes with ``Q + s·B A`` (``A, B`` trainable, start at ``A₀, B₀``), which
is ``≈ W0`` with error ``‖W0 − Q − s·B₀A₀‖ = ‖(W0 − Q) − [W0 − Q]_r‖``, smaller than QLoRA's
``‖W0 − Q(W0)‖``. The quantizer is rankwise's own CPU/GPU fake quantizer
(:mod:`rankwise.quant`: ``nf4`` — bit for bit bitsandbytes' NF4 with block size 64, PEFT's
choice —, ``int4`` or ``int8``).

rankwise keeps the base weight ``W0`` untouched; the role of the base is played by the
dequantized ``Q``, stored in the adapter as its packed codes and block maxima (buffers, 4 bits per
weight for the 4-bit kinds; the maxima in the adapter's dtype, so a bfloat16 model's ``Q`` carries one
extra bf16 rounding of its block scale, at the level of the bf16 rounding of ``Q`` itself). The update against the original weight is therefore exact::

    ΔW = (Q − W0) + s · B A           (delta_weight(), merge(), export use this)

In forward, as the first active adapter, the layer computes ``Q x + b + s·B(A x)`` directly
(``computes_base``: one product with the dequantized ``Q`` replaces the base product); otherwise it
adds ``(Q − W0) x + s·B A x`` to the running output. ``Q − W0`` reads ``W0``, so ``reads_base``:
merge keeps the exact ΔW it added. The adapted model is *not* the base model at init (it is the
LoftQ approximation of it).

PEFT 0.21 (``init_lora_weights="loftq"``, ``peft.utils.loftq_utils.loftq_init``): the same
alternation with bitsandbytes NF4 (block 64) and ``L = U√S, R = √S Vᵀ`` ignoring the LoRA scale —
the same factors as here when ``s = 1`` (``alpha = rank``, the default). PEFT's implementation
always moves the weight to ``cuda``/``xpu``, so it does not run on a CPU-only machine; rankwise's
does. ``export_peft`` writes PEFT's LoftQ config (``loftq_bits=4``, ``loftq_iter=T``) with ``A, B``;
``import_peft`` rebuilds ``Q`` from ``W0`` with the same alternation and loads ``A, B``.

Parameters per layer: ``r · (in + out)``; buffers: the quantized ``W`` (``in·out/2`` bytes for 4-bit
plus 4 bytes per block). Linear and HF ``Conv1D`` layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.ops import low_rank_apply
from ..core.registry import register
from ..errors import ConfigError, ShapeMismatchError
from ..linalg import batched_map, truncated_svd
from ..quant import KINDS, check_kind, dequantize, quantize, storage_shapes
from ._init_common import ResidualLowRank, lora_peft_tensors, no_data, planned, svd_factors


@dataclass
class LoftqConfig(RankAlphaConfig):
    """quant: 'nf4' | 'int4' | 'int8' (rankwise.quant); block_size: elements per absmax block;
    iters: T alternations of quantize / SVD (PEFT's loftq_iter, default 1)."""

    quant: str = "nf4"
    block_size: int = 64
    iters: int = 1

    def __post_init__(self):
        super().__post_init__()
        self._check(self.quant in KINDS, "quant", f"use one of {list(KINDS)}.")
        self._check(isinstance(self.block_size, int) and not isinstance(self.block_size, bool)
                    and self.block_size >= 2 and self.block_size % 2 == 0, "block_size",
                    "use an even integer ≥ 2 (64 is QLoRA's and PEFT's).")
        self._check_int("iters")


def loftq_stack(w: torch.Tensor, config: LoftqConfig):
    """LoftQ on a stack ``(b, out, in)`` of weights whose quantization blocks do not straddle two
    matrices (``out·in`` divisible by ``block_size``, or ``b = 1``). Returns the codes
    ``(b, bytes)``, block maxima ``(b, blocks)`` and the top-``r`` SVD ``(U, S, Vh)`` of ``W − Q``."""
    w = w.float() if w.dtype != torch.float64 else w
    r = config.rank
    res = w
    for i in range(config.iters):
        q = quantize(res, config.quant, config.block_size)
        u, s, vh = truncated_svd(w - q.dequantize().to(w.dtype), r)
        if i + 1 < config.iters:
            res = w - (u * s.unsqueeze(-2)) @ vh  # W − s·B₀A₀ (s·B₀A₀ = U S Vh)
    b = w.shape[0]
    return q.data.reshape(b, -1), q.absmax.reshape(b, -1), u, s, vh


@register("loftq")
class Loftq(ResidualLowRank):
    """Quantized base ``Q`` plus ``s·BA`` with ``(Q, A₀, B₀)`` from LoftQ's alternation (module docstring)."""

    Config = LoftqConfig
    kinds = ("linear", "hf_conv1d")
    summary = "quantized base Q + LoRA, Q and A,B from alternating quantize / SVD (Li et al. 2024); nf4/int4/int8"
    identity_at_init = False
    reads_base = True
    computes_base = True
    peft_init = "loftq"

    @classmethod
    def plan(cls, views, config: LoftqConfig, calibration, generator=None) -> dict:
        """Run LoftQ batched over target layers of the same shape (where blocks align per matrix)."""
        names = [n for n, v in views.items() if (v.out_features * v.in_features) % config.block_size == 0]
        for n in names:
            views[n].check_rank(config.rank, cls.name)
        mats = [views[n].weight2d().detach() for n in names]
        for name, got in zip(names, batched_map(lambda st: loftq_stack(st, config), mats)):
            calibration[name].extra["loftq"] = got
        return {}

    def __init__(self, view: LayerView, config: LoftqConfig, generator=None, calibration=None):
        check_kind(config.quant, config.block_size)
        super().__init__(view, config, generator, calibration)
        if no_data(view, calibration):
            n_data, n_blocks = storage_shapes(view.out_features * view.in_features, config.quant, config.block_size)
            self._q = (torch.zeros(n_data, dtype=torch.uint8), torch.zeros(n_blocks))
        data, absmax = self.__dict__.pop("_q")
        self.register_buffer("q_data", data.to(view.weight.device).contiguous())
        self.register_buffer("q_absmax", absmax.to(**view.factory_kwargs).contiguous())
        # the frozen buffers of ResidualLowRank are not subtracted here: ΔW = Q − W0 + s·B A
        self.init_A.zero_()
        self.init_B.zero_()

    def initial_factors(self, view: LayerView, config: LoftqConfig, generator, calibration):
        """``(A₀, B₀)``; the quantized codes and block maxima are left in ``self._q`` for ``__init__``."""
        got = planned(calibration, "loftq", config.rank)
        if got is None:
            got = tuple(t[0] for t in loftq_stack(view.weight2d().detach()[None], config))
        *self._q, u, s, vh = got
        return svd_factors(u, s, vh, config.scale)

    def quantized_weight(self) -> torch.Tensor:
        """The dequantized ``Q`` in canonical ``(out, in)`` layout and the factors' dtype."""
        v = self.view
        return dequantize(self.q_data, self.q_absmax, (v.out_features, v.in_features), self.config.quant,
                          self.config.block_size, v.param_dtype)

    def factors(self):
        return self.lora_A, self.lora_B

    def delta_weight(self) -> torch.Tensor:
        q = self.quantized_weight()
        return self.view.to_param(q - self.view.weight2d().to(q.dtype) + (self.lora_B @ self.lora_A) * self.scale)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        q = self.quantized_weight()
        if base_out is None:  # first adapter: the quantized weight replaces the base product
            out = self.view.functional(x.to(q.dtype) if x.is_floating_point() else x, q)
        else:
            out = base_out + self.view.functional(x, q - self.view.weight2d().to(q.dtype), bias=False).to(base_out.dtype)
        return low_rank_apply(self.view, x, out, self.lora_A, self.lora_B, self.scale, self.config.dropout,
                              self.training)

    # ---- PEFT ----------------------------------------------------------------------------------
    @classmethod
    def to_peft_config(cls, config: LoftqConfig, views: list[LayerView]) -> dict:
        if config.quant != "nf4" or config.block_size != 64:
            raise ConfigError(f"loftq with quant={config.quant!r}, block_size={config.block_size}: PEFT's LoftQ "
                              "quantizes with bitsandbytes NF4, block 64 only. Use quant='nf4', block_size=64, or "
                              "save with rw.save().")
        if config.iters > 1 and config.scale != 1.0:
            raise ConfigError(f"loftq with iters={config.iters} and scale α/r={config.scale:g}: PEFT's LoftQ ignores "
                              "the LoRA scale between iterations, so its Q would differ. Use alpha=rank or iters=1.")
        from .lora import Lora, LoraConfig

        pcfg = Lora.to_peft_config(LoraConfig(rank=config.rank, alpha=config.lora_alpha, dropout=config.dropout,
                                              rslora=config.rslora), views)
        pcfg["init_lora_weights"] = "loftq"
        pcfg["loftq_config"] = {"loftq_bits": 4, "loftq_iter": config.iters}
        return pcfg

    @classmethod
    def peft_patterns(cls, config, adapters) -> dict:
        return {"rank_pattern": {}, "alpha_pattern": {}}

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return lora_peft_tensors(self.view, self.lora_A, self.lora_B)

    @classmethod
    def peft_accepts(cls, pcfg: dict) -> bool:
        return pcfg.get("peft_type") == "LORA" and pcfg.get("init_lora_weights") == "loftq"

    @classmethod
    def from_peft_config(cls, pcfg: dict) -> dict:
        lq = pcfg.get("loftq_config") or {}
        bits, iters = int(lq.get("loftq_bits", 4)), int(lq.get("loftq_iter", 1))
        if bits != 4:
            raise ConfigError(f"PEFT LoftQ adapter with loftq_bits={bits}: PEFT's 8-bit LoftQ uses bitsandbytes' "
                              "row-wise int8, which rankwise does not rebuild; only loftq_bits=4 (NF4) imports.")
        opts = cls.lora_options_from_peft(pcfg, "LoftQ")
        if iters > 1 and opts["alpha"] != opts["rank"] and not opts["rslora"]:
            raise ConfigError(f"PEFT LoftQ adapter with loftq_iter={iters} and lora_alpha={opts['alpha']} ≠ r: PEFT "
                              "ignored the scale between iterations, so its Q cannot be rebuilt here.")
        return {**opts, "quant": "nf4", "block_size": 64, "iters": iters}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, param in (("lora_A.weight", self.lora_A), ("lora_B.weight", self.lora_B)):
            if tensors[key].numel() != param.numel():
                raise ShapeMismatchError(
                    f"module '{self.view.name}': PEFT tensor {key} has shape {tuple(tensors[key].shape)}, rankwise "
                    f"expects {tuple(param.shape)} (rank {self.rank}, weight {self.view.out_features}x"
                    f"{self.view.in_features})."
                )
        with torch.no_grad():
            self.lora_A.copy_(tensors["lora_A.weight"].reshape(self.lora_A.shape))
            self.lora_B.copy_(tensors["lora_B.weight"].reshape(self.lora_B.shape))

