"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv:2106.09685).

The frozen weight ``W0 (out × in)`` gets a trainable low-rank update::

    W = W0 + s · B A,      A ∈ R^{r×in},  B ∈ R^{out×r},  s = α / r   (rsLoRA: s = α / √r)

Activation view (never forms ``B A``)::

    y = W0 x + b + s · B (A drop(x))

Init ``kaiming`` (default): ``A ~ U(-1/√in, 1/√in)`` (PyTorch's Linear default, as PEFT), ``B = 0``;
``gaussian``: ``A ~ N(0, 1/r²)``, ``B = 0``. For embeddings the roles swap (``A = 0``,
``B ~ N(0, 1)``), as in PEFT, so the update starts at zero and both factors get gradients.
At init ``ΔW = 0``, so the adapted model equals the base exactly.

Parameters per layer: ``r · (in + out)`` (``in`` = ``in_channels·k`` for convolutions).

Memory: with dropout ``p > 0`` on linear layers the dropped input is never stored; the
autograd function below keeps the layer input (which the graph holds anyway) and a 1-byte
mask, and rebuilds ``drop(x)`` in backward — PEFT keeps a full extra copy of the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.ops import DropoutLinear, LowRankLinear, autocast_on, keep_mask, lowrank_branch
from ..core.registry import register
from ..errors import ConfigError, ShapeMismatchError


@dataclass
class LoraConfig(AdapterConfig):
    """rank: r; alpha: α (default: r, so s = 1); dropout: on the adapter's input;
    rslora: s = α/√r; init: 'kaiming' | 'gaussian'."""

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"

    def __post_init__(self):
        super().__post_init__()
        self._check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
                    "rank", "rank must be a positive integer.")
        self._check(self.alpha is None or self.alpha > 0, "alpha", "alpha must be positive (or None: alpha = rank).")
        self._check(0.0 <= self.dropout < 1.0, "dropout", "dropout must be in [0, 1).")
        self._check(self.init in ("kaiming", "gaussian"), "init", "use 'kaiming' or 'gaussian'.")

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def lora_alpha(self) -> float:
        """α in effect: ``alpha``, or the rank when ``alpha`` is None (kept None so a rank override follows)."""
        return float(self.rank) if self.alpha is None else float(self.alpha)


@register("lora")
class Lora(nn.Module):
    """Low-rank update ``s · B A`` (see module docstring)."""

    Config = LoraConfig
    kinds = ("linear", "hf_conv1d", "conv1d", "conv2d", "embedding")
    summary = "ΔW = s·BA, A random, B = 0 (Hu et al. 2021); rsLoRA scaling option"
    identity_at_init = True
    merge_atol = 1e-5
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: LoraConfig, generator=None, calibration=None):
        super().__init__()
        view.check_rank(config.rank, "lora")
        self.view, self.config, self.rank = view, config, config.rank
        self.scale = config.scale
        w = view.weight
        kw = {"dtype": w.dtype if w.is_floating_point() else torch.float32}
        r, n_in, n_out = config.rank, view.in_features, view.out_features
        self.lora_A = nn.Parameter(torch.empty(r, n_in, **kw))
        self.lora_B = nn.Parameter(torch.zeros(n_out, r, **kw))
        with torch.no_grad():
            if view.kind == "embedding":
                self.lora_A.zero_()
                self.lora_B.normal_(generator=generator)
            elif config.init == "gaussian":
                self.lora_A.normal_(0.0, 1.0 / r, generator=generator)
            else:
                bound = 1.0 / math.sqrt(n_in)
                self.lora_A.uniform_(-bound, bound, generator=generator)
        self.drop = config.dropout

    @classmethod
    def num_params(cls, view: LayerView, config: LoraConfig) -> int:
        return config.rank * (view.in_features + view.out_features)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A, self.lora_B
        kind = self.view.kind
        linear = kind == "linear" or kind == "hf_conv1d"
        dropping = self.drop > 0 and self.training
        if linear and x.dtype == a.dtype == base_out.dtype and not autocast_on(x.device.type):
            mask, keep = None, 1.0
            if dropping:
                keep = 1.0 - self.drop
                mask = keep_mask(x, keep)
            if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad
                                            or base_out.requires_grad):
                return LowRankLinear.apply(x, base_out, a, b, self.scale, mask, keep)
            return lowrank_branch(x, base_out, a, b, self.scale / keep, mask)  # no graph to build (inference)
        # general path: other layer kinds, mixed dtypes, autocast
        if x.is_floating_point() and x.dtype != a.dtype:
            x = x.to(a.dtype)
        if dropping and linear:
            keep = 1.0 - self.drop
            mask = keep_mask(x, keep)
            h = DropoutLinear.apply(x, a, mask, keep)
        else:
            if dropping and x.is_floating_point():
                x = F.dropout(x, self.drop, training=True)
            h = self.view.apply_in(x, a)
        if linear and base_out.dtype == h.dtype:
            # one fused kernel: base_out + s·h Bᵀ (no out-sized temporaries)
            out2d = torch.addmm(base_out.reshape(-1, b.shape[0]), h.reshape(-1, b.shape[1]), b.t(), alpha=self.scale)
            return out2d.view(base_out.shape)
        return base_out + (self.view.apply_out(h, b) * self.scale).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param((self.lora_B @ self.lora_A) * self.scale)

    # ---- PEFT format (used by rankwise.io.peft) -------------------------------------------
    peft_type = "LORA"

    @classmethod
    def peft_accepts(cls, pcfg: dict) -> bool:
        return pcfg.get("peft_type") == "LORA" and not pcfg.get("use_dora")

    @classmethod
    def to_peft_config(cls, config: LoraConfig, views: list[LayerView]) -> dict:
        for v in views:
            if v.kind in ("conv1d", "conv2d"):
                c = v.base
                if any(d != 1 for d in c.dilation) or c.padding_mode != "zeros":
                    raise ConfigError(
                        f"module '{v.name}' is a convolution with dilation={c.dilation}, padding_mode="
                        f"'{c.padding_mode}'; PEFT's conv LoRA builds lora_A without dilation and with zero "
                        "padding, so it cannot represent this adapter. Save it with rw.save() instead."
                    )
        return {
            "peft_type": "LORA",
            "r": config.rank,
            "lora_alpha": config.lora_alpha,
            "lora_dropout": config.dropout,
            "use_rslora": config.rslora,
            "bias": "none",
            "fan_in_fan_out": any(v.kind == "hf_conv1d" for v in views),
            "init_lora_weights": True,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def from_peft_config(cls, pcfg: dict) -> dict:
        for key in ("rank_pattern", "alpha_pattern"):
            if pcfg.get(key):
                raise ConfigError(
                    f"PEFT adapter uses {key}={pcfg[key]}; rankwise's lora has one rank and alpha per "
                    "adapter. Re-export it from PEFT without per-module patterns."
                )
        if pcfg.get("bias", "none") != "none" or pcfg.get("lora_bias"):
            raise ConfigError("PEFT adapter trains biases (bias != 'none'); rankwise's lora leaves biases frozen.")
        return {"rank": int(pcfg["r"]), "alpha": float(pcfg["lora_alpha"]),
                "dropout": float(pcfg.get("lora_dropout") or 0.0), "rslora": bool(pcfg.get("use_rslora"))}

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        a, b, v = self.lora_A, self.lora_B, self.view
        if v.kind == "embedding":
            return {"lora_embedding_A": a, "lora_embedding_B": b}
        if v.kind in ("conv1d", "conv2d"):
            k = v.weight.shape[2:]
            return {"lora_A.weight": a.reshape(a.shape[0], -1, *k),
                    "lora_B.weight": b.reshape(*b.shape, *([1] * len(k)))}
        return {"lora_A.weight": a, "lora_B.weight": b}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        names = ("lora_embedding_A", "lora_embedding_B") if self.view.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        expected = self.peft_tensors()
        for key in names:
            if tuple(tensors[key].shape) != tuple(expected[key].shape):
                raise ShapeMismatchError(
                    f"module '{self.view.name}': PEFT tensor {key} has shape {tuple(tensors[key].shape)}, "
                    f"rankwise expects {tuple(expected[key].shape)} (rank {self.rank}, weight "
                    f"{self.view.out_features}x{self.view.in_features}). Load it onto the model it was trained on."
                )
        with torch.no_grad():
            for key, param in zip(names, (self.lora_A, self.lora_B)):
                param.copy_(tensors[key].reshape(param.shape))

    @classmethod
    def peft_suffixes(cls) -> tuple[str, ...]:
        return ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")
