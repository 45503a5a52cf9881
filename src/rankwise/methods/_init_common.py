"""Shared pieces of the weight- and data-driven inits (``pissa``, ``milora``, ``olora``, ``nlora``,
``corda``, ``lora_ga``, ``loftq``; ``eva`` and ``lora_sb`` use the small helpers at the end).

:class:`ResidualLowRank` — the "residual" layout of PiSSA-type methods. PEFT implements them by
moving a part ``s·B₀A₀`` of ``W0`` into the adapter and *overwriting* the base weight with the
residual ``W0 − s·B₀A₀``. rankwise never modifies the base weight (``delta_weight()`` is
``W_adapted − W0`` against the original ``W0``; ``set_active(None)`` and ``unadapt`` give the
original model back), so the adapter keeps the frozen part it subtracts as buffers::

    ΔW = s · (B A − B₀ A₀),    A, B trainable (start at A₀, B₀),  A₀, B₀ frozen buffers

which is the same model as PEFT's ``(W0 − s·B₀A₀) + s·B A`` at every step, and exactly the
base model at init. The forward pass computes it as one low-rank product of rank ``2r``::

    ΔW x = s · [B − B₀,  B₀] · [A x;  (A − A₀) x]

whose factors are *exactly* zero where they should be at init (so the adapted output equals the
base output bitwise), at twice LoRA's adapter FLOPs (4r(in+out) per token, small next to the
base's in·out). With dropout in training the two parts see different inputs (PEFT drops the
input of ``B A`` only): ``base_out − s·B₀A₀x + s·B A drop(x)``. ``A₀, B₀`` are saved with the
adapter (they may come from data or a random sketch, so they cannot always be recomputed).

:class:`WeightSplit` — a :class:`ResidualLowRank` whose ``A₀, B₀`` are a function of ``W0``
(PiSSA, MiLoRA, OLoRA): ``plan`` factors all target layers of one shape in one batched call.

PEFT format: ``export_peft`` writes the equivalent plain LoRA of rank ``2r`` on the *original*
base weights — ``lora_A = [A; A₀]``, ``lora_B = [B, −B₀]``, ``lora_alpha`` doubled (×√2 for
rsLoRA) so the scale is unchanged — which is PEFT's own "convert PiSSA/CorDA/OLoRA to LoRA"
format (``save_pretrained(path_initial_model_for_weight_conversion=...)``) and loads onto the
unmodified base model. Methods whose frozen part PEFT can rebuild from ``W0`` alone (``pissa``
with exact SVD, ``olora``) also import PEFT's own unconverted adapters.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..core.calibrate import LOAD_STATE
from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import low_rank_apply
from ..errors import ConfigError, ShapeMismatchError
from .lora import Lora, LoraConfig


def pattern_key(keys, module: str) -> str | None:
    """The ``rank_pattern`` / ``alpha_pattern`` key that applies to ``module`` (PEFT's rule: the
    key matches the end of the module name on a ``.`` boundary, as a regex)."""
    hits = [k for k in keys if re.match(rf"(.*\.)?({k})$", module)]
    return max(hits, key=len) if hits else None


class ResidualLowRank(Method):
    """``ΔW = s·(B A − B₀ A₀)`` with frozen ``A₀, B₀`` (see the module docstring).

    Subclasses implement :meth:`initial_factors` (``A₀ (r × in)``, ``B₀ (out × r)``); it is not
    called when there is nothing to compute (:func:`no_data`: ``A, B, A₀, B₀`` start at zero then).
    """

    deterministic_init = True  # the init reads W0 (or data) only: the seed does not change it
    default_lr = 3e-3  # LoRA's, as the init papers compare; on the demo task 3e-4 trails LoRA far behind

    def __init__(self, view: LayerView, config: RankAlphaConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, self.name)
        self.rank, self.scale = config.rank, config.scale
        r, n_in, n_out, kw = config.rank, view.in_features, view.out_features, view.factory_kwargs
        if no_data(view, calibration):
            a0, b0 = torch.zeros(r, n_in, **kw), torch.zeros(n_out, r, **kw)
        else:
            a0, b0 = (t.detach().to(**kw).contiguous() for t in self.initial_factors(view, config, generator,
                                                                                      calibration))
        if a0.shape != (r, n_in) or b0.shape != (n_out, r):  # pragma: no cover - a subclass bug
            raise ShapeMismatchError(f"module '{view.name}': init factors {tuple(a0.shape)}, {tuple(b0.shape)} "
                                     f"do not fit rank {r} and weight {n_out}x{n_in}.")
        self.lora_A = nn.Parameter(a0.clone())
        self.lora_B = nn.Parameter(b0.clone())
        # a slice of a batched decomposition would keep the whole stack alive: own the storage
        self.register_buffer("init_A", _owned(a0))
        self.register_buffer("init_B", _owned(b0))

    def initial_factors(self, view: LayerView, config, generator, calibration):
        """``(A₀, B₀)`` for this layer (any float dtype and device: they are cast to the layer's)."""
        raise NotImplementedError

    # ---- the update in factored form -------------------------------------------------------
    def trained(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the trained product ``B A``."""
        return self.lora_A, self.lora_B

    def frozen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A₀, B₀)`` of the frozen product ``B₀ A₀``."""
        return self.init_A, self.init_B

    def b_diff(self) -> torch.Tensor:
        """``B − B₀`` (trained minus frozen left factor), exactly zero at init."""
        return self.lora_B - self.init_B

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` with ``ΔW = s · b a`` and both exactly zero-valued where they cancel at init."""
        a, _ = self.trained()
        a0, b0 = self.frozen()
        return torch.cat([a, a - a0]), torch.cat([self.b_diff(), b0], dim=1)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return self.view.to_param((b @ a) * self.scale)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        drop = self.config.dropout
        if drop > 0 and self.training:
            a0, b0 = self.frozen()
            a, b = self.trained()
            base_out = low_rank_apply(self.view, x, base_out, a0, b0, -self.scale)
            return low_rank_apply(self.view, x, base_out, a, b, self.scale, drop, True)
        a, b = self.factors()
        return low_rank_apply(self.view, x, base_out, a, b, self.scale)

    @classmethod
    def num_params(cls, view: LayerView, config: RankAlphaConfig) -> int:
        return config.rank * (view.in_features + view.out_features)
    # ---- PEFT: export as the equivalent plain LoRA of rank 2r ---------------------------------
    peft_type = "LORA"

    @classmethod
    def to_peft_config(cls, config: RankAlphaConfig, views: list[LayerView]) -> dict:
        as_lora = LoraConfig(rank=2 * config.rank, alpha=converted_alpha(config.lora_alpha, config.rslora),
                             dropout=config.dropout, rslora=config.rslora)
        pcfg = Lora.to_peft_config(as_lora, views)
        pcfg["init_lora_weights"] = True
        return pcfg

    @classmethod
    def peft_patterns(cls, config: RankAlphaConfig, adapters: dict[str, nn.Module]) -> dict:
        """``rank_pattern`` / ``alpha_pattern`` for modules whose config differs from the adapter's."""
        ranks, alphas = {}, {}
        for name, ad in adapters.items():
            c = ad.config
            if c.rank != config.rank:
                ranks[name] = 2 * c.rank
            if c.lora_alpha != config.lora_alpha or c.rank != config.rank:
                alphas[name] = converted_alpha(c.lora_alpha, c.rslora)
        return {"rank_pattern": ranks, "alpha_pattern": alphas}

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        a, b = self.trained()
        a0, b0 = self.frozen()
        return lora_peft_tensors(self.view, torch.cat([a, a0]), torch.cat([b, -b0], dim=1))

    # ---- PEFT: import of PEFT's own (unconverted) adapters, for subclasses that accept them ----
    @classmethod
    def peft_suffixes(cls) -> tuple[str, ...]:
        return ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy PEFT's trained ``lora_A``/``lora_B`` into ``A, B``; ``A₀, B₀`` stay as this
        adapter's init computed them from ``W0`` (what PEFT subtracted from its base weight)."""
        names = ("lora_embedding_A", "lora_embedding_B") if self.view.kind == "embedding" else (
            "lora_A.weight", "lora_B.weight")
        for key, param in zip(names, (self.lora_A, self.lora_B)):
            t = tensors[key]
            if t.numel() != param.numel():
                raise ShapeMismatchError(
                    f"module '{self.view.name}': PEFT tensor {key} has shape {tuple(t.shape)}, rankwise expects "
                    f"{tuple(param.shape)} (rank {self.rank}, weight {self.view.out_features}x{self.view.in_features})."
                )
        with torch.no_grad():
            for key, param in zip(names, (self.lora_A, self.lora_B)):
                param.copy_(tensors[key].reshape(param.shape))

    @classmethod
    def lora_options_from_peft(cls, pcfg: dict, what: str) -> dict:
        """rank / alpha / dropout / rslora of a PEFT LoRA config, refusing what rankwise lacks."""
        for key in ("rank_pattern", "alpha_pattern"):
            if pcfg.get(key):
                raise ConfigError(f"PEFT {what} adapter uses {key}={pcfg[key]}; rankwise's {cls.name} has one rank "
                                  "and alpha per adapter here. Re-export it from PEFT without per-module patterns.")
        if pcfg.get("bias", "none") != "none" or pcfg.get("lora_bias") or pcfg.get("use_dora"):
            raise ConfigError(f"PEFT {what} adapter trains biases or uses DoRA; rankwise's {cls.name} does neither.")
        return {"rank": int(pcfg["r"]), "alpha": float(pcfg["lora_alpha"]),
                "dropout": float(pcfg.get("lora_dropout") or 0.0), "rslora": bool(pcfg.get("use_rslora"))}


def converted_alpha(alpha: float, rslora: bool) -> float:
    """α of the rank-2r plain LoRA with the same scale as (α, r): 2α, or √2·α with rsLoRA."""
    return alpha * (math.sqrt(2.0) if rslora else 2.0)


def lora_peft_tensors(view: LayerView, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT LoRA tensor names and layouts for factors ``a (k, in)``, ``b (out, k)`` of ``view``."""
    if view.kind == "embedding":
        return {"lora_embedding_A": a.detach().contiguous(), "lora_embedding_B": b.detach().contiguous()}
    if view.kind in ("conv1d", "conv2d"):
        ks = view.weight.shape[2:]
        return {"lora_A.weight": a.detach().reshape(a.shape[0], -1, *ks).contiguous(),
                "lora_B.weight": b.detach().reshape(*b.shape, *([1] * len(ks))).contiguous()}
    return {"lora_A.weight": a.detach().contiguous(), "lora_B.weight": b.detach().contiguous()}


class WeightSplit(ResidualLowRank):
    """A residual init computed from ``W0`` alone: ``decompose`` factors a batch of layers (``plan``
    runs it once over all targets, batched over equal shapes), ``split`` turns one layer's result
    into ``(A₀, B₀)``."""

    @classmethod
    def decompose(cls, views: dict[str, LayerView], config, generator=None) -> dict[str, tuple]:
        raise NotImplementedError

    @classmethod
    def split(cls, got: tuple, config) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def plan(cls, views, config, calibration, generator=None) -> dict:
        for v in views.values():
            v.check_rank(config.rank, cls.name)
        for name, got in cls.decompose(views, config, generator).items():
            calibration[name].extra["init"] = got
        return {}

    def initial_factors(self, view, config, generator, calibration):
        got = planned(calibration, "init", config.rank)
        if got is None:
            got = self.decompose({view.name: view}, config, generator)[view.name]
        return self.split(got, config)


def svd_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scale: float):
    """PiSSA's split of ``U diag(S) Vh`` into ``A₀ = √(S/s) Vh``, ``B₀ = U √(S/s)`` so that
    ``s · B₀ A₀ = U diag(S) Vh``."""
    root = (s / scale).clamp_min(0).sqrt()
    return root[:, None] * vh, u * root[None, :]


def no_data(view: LayerView, calibration) -> bool:
    """Nothing to initialize from: the adapter's state is loaded next (``LOAD_STATE``), or the base
    weight lives on the meta device (a model built for loading or FSDP; its values come later)."""
    return calibration is LOAD_STATE or view.weight.is_meta


def planned(calibration, key: str, rank: int):
    """The factors a method's ``plan`` left for this layer under ``key`` (batched over layers), if
    they were computed for ``rank`` (``module_overrides`` may give a layer another rank); the last
    factor of the tuple is ``(…, rank, in)`` (a ``Vh`` or ``R``)."""
    got = getattr(calibration, "extra", {}).get(key)
    return got if got is not None and got[-1].shape[-2] == rank else None


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it owns its storage, else a compact copy (so a view into a batched SVD/QR
    stack does not pin the full stack in memory for the adapter's lifetime)."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()
