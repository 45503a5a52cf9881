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

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import kaiming_bound, low_rank_apply, normal_, uniform_
from ..core.registry import register
from ..errors import ConfigError, ShapeMismatchError


@dataclass
class LoraConfig(RankAlphaConfig):
    """rank: r; alpha: α (default: r, so s = 1); dropout: on the adapter's input;
    rslora: s = α/√r; init: 'kaiming' | 'gaussian'."""

    init: str = "kaiming"

    def __post_init__(self):
        super().__post_init__()
        self._check(self.init in ("kaiming", "gaussian"), "init", "use 'kaiming' or 'gaussian'.")


def lora_factors(view: LayerView, config: LoraConfig, generator=None) -> tuple[nn.Parameter, nn.Parameter]:
    """LoRA's ``(A, B)`` on the weight's device and dtype: ``A`` by ``config.init``, ``B = 0``; for an
    embedding the roles swap (``A = 0``, ``B ~ N(0, 1)``), as in PEFT."""
    r, n_in = config.rank, view.in_features
    a = nn.Parameter(torch.empty(r, n_in, **view.factory_kwargs))
    b = nn.Parameter(torch.zeros(view.out_features, r, **view.factory_kwargs))
    if view.kind == "embedding":
        a.data.zero_()
        normal_(b, 1.0, generator)
    elif config.init == "gaussian":
        normal_(a, 1.0 / r, generator)
    else:
        uniform_(a, kaiming_bound(n_in), generator)
    return a, b


@register("lora")
class Lora(Method):
    """Low-rank update ``s · B A`` (see module docstring)."""

    Config = LoraConfig
    summary = "ΔW = s·BA, A random, B = 0 (Hu et al. 2021); rsLoRA scaling option"
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: LoraConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, self.name)
        self.rank, self.scale = config.rank, config.scale
        self.lora_A, self.lora_B = lora_factors(view, config, generator)

    @classmethod
    def num_params(cls, view: LayerView, config: LoraConfig) -> int:
        return config.rank * (view.in_features + view.out_features)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return low_rank_apply(self.view, x, base_out, self.lora_A, self.lora_B, self.scale,
                              self.config.dropout, self.training)

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
    def peft_patterns(cls, config: LoraConfig, adapters: dict[str, nn.Module]) -> dict:
        r"""PEFT's ``rank_pattern`` / ``alpha_pattern`` for the modules whose rank or α differs from the
        adapter's (``module_overrides``; ``rw.combine`` on a layer too small for the common rank).

        PEFT picks a module's entry with ``re.match(rf"(.*\.)?({key})$", module)``, first key first. A key
        is the module's name where that matches no other adapted module, else ``^`` + the escaped name
        (``^`` inside PEFT's group only matches at the start: exactly that module). Dropout and rsLoRA
        have no PEFT pattern, so modules that differ there are refused."""
        names = list(adapters)
        ranks, alphas = {}, {}
        for name, ad in adapters.items():
            c = ad.config
            for opt in ("dropout", "rslora"):
                if getattr(c, opt) != getattr(config, opt):
                    raise ConfigError(
                        f"module '{name}' has {opt}={getattr(c, opt)!r} while the adapter has {getattr(config, opt)!r}; "
                        f"PEFT's LoRA format has one {opt} per adapter (patterns exist only for rank and alpha). "
                        "Save it with rw.save() instead.")
            if c.rank == config.rank and c.lora_alpha == config.lora_alpha:
                continue
            key = peft_pattern_key(name, names)
            if c.rank != config.rank:
                ranks[key] = c.rank
            if c.lora_alpha != config.lora_alpha:
                alphas[key] = c.lora_alpha
        return {"rank_pattern": ranks, "alpha_pattern": alphas}

    @classmethod
    def peft_module_overrides(cls, pcfg: dict, modules: list[str]) -> dict[str, dict]:
        r"""Per-module ``rank`` / ``alpha`` from PEFT's ``rank_pattern`` / ``alpha_pattern`` (PEFT's rule:
        the first key matching the end of the module name)."""
        out: dict[str, dict] = {}
        for key, opt, conv in (("rank_pattern", "rank", int), ("alpha_pattern", "alpha", float)):
            pattern = pcfg.get(key) or {}
            for m in modules:
                hit = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", m)), None)
                if hit is not None:
                    out.setdefault(m, {})[opt] = conv(pattern[hit])
        return out  # a module without an alpha entry keeps the adapter's alpha (lora_alpha), as in PEFT

    @classmethod
    def from_peft_config(cls, pcfg: dict) -> dict:
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


def peft_pattern_key(name: str, names: list[str]) -> str:
    r"""The ``rank_pattern`` key that selects module ``name`` and no other of ``names`` under PEFT's
    matching rule ``re.match(rf"(.*\.)?({key})$", module)``: the plain name where that is unambiguous
    (the usual case: readable), else ``^`` + the escaped name."""
    if re.fullmatch(r"[\w.]+", name) and not any(
            other != name and re.match(rf"(.*\.)?({name})$", other) for other in names):
        return name
    return "^" + re.escape(name)
