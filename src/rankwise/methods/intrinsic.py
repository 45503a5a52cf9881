"""Intrinsic SAID: one small vector, projected into every weight by a fixed random Fastfood map.

Papers: Li, Farkhoor, Liu & Yosinski, "Measuring the Intrinsic Dimension of Objective Landscapes"
(ICLR 2018, arXiv:1804.08838) — the Fastfood projection; Aghajanyan, Zettlemoyer & Gupta, "Intrinsic
Dimensionality Explains the Effectiveness of Language Model Fine-Tuning" (ACL 2021, arXiv:2012.13255) —
SAID, the structure-aware version with one scale per layer. Reference code read: the authors' Fastfood
as kept in ``r-three/t-few`` (``src/models/intrinsic.py``) and ``jgamper/intrinsic-dimensionality``.

Every adapted layer ``i`` with ``D_i`` weight entries gets::

    W_i = W0_i + λ_i · reshape(P_i θ),      θ ∈ R^d shared by all layers,  λ_i ∈ R one per layer

    P_i θ = (H G Π H B pad(θ))[:D_i] / (‖G‖ √D_i)

with ``L = 2^⌈log2 max(D_i, d)⌉``, ``pad`` zero-padding ``θ`` to length ``L``, ``H`` the ``L × L``
Walsh-Hadamard matrix (entries ±1, applied in ``O(L log L)``, never formed), ``B`` a random ±1 diagonal,
``Π`` a random permutation and ``G`` a Gaussian diagonal, all fixed. The scale makes ``P_i`` nearly norm
preserving (``‖P_i θ‖ ≈ ‖θ‖``: ``‖H y‖ = √L ‖y‖`` twice, ``G`` scales by ``‖G‖/√L``, keeping ``D_i`` of
``L`` entries scales by ``√(D_i/L)``) — the authors' ``divisor · √(D/L)`` with ``divisor = √(L Σ G²)``.
The ``D × d`` matrix is never materialized: memory ``O(L)`` per layer, time ``O(L log L)`` per forward.

Init: ``θ = 0``, ``λ_i = 1`` (as the authors' code), so the adapted model equals the base and the first
step moves ``θ`` only (``∂L/∂λ_i = ⟨∇W_i, P_i θ⟩ = 0`` while ``θ = 0``). ``dim = 0`` leaves nothing to
train in ``θ``: the model is the base model. ``said=False`` drops the ``λ_i`` (Li et al.'s plain
intrinsic dimension, ``ΔW_i = P_i θ``).

Activation view: ``ΔW_i`` is a dense ``D_i``-vector anyway, so the layer runs one product with
``W0 + ΔW`` (``computes_base``): ``functional(x, W0 + ΔW)``; stacked after another adapter,
``base_out + functional(x, ΔW)`` without bias.

Deviations from the paper, stated: the paper's budget ``d`` counts the ``m`` layer scales (``θ`` has
``d − m`` entries); here ``dim`` is the size of ``θ`` and SAID adds one ``λ`` per adapted layer. Only the
weights of the adapted layers are projected into (the paper: every parameter, biases and LayerNorms
included) — ``modules_to_save`` trains other modules fully. Biases are not reparameterized. The random
``B, Π, G`` of each layer are generated from a per-layer key (the projection seed and the layer's name,
``int64`` buffer ``ff.key``) and rebuilt after ``rw.load`` — the saved adapter holds ``θ``, the ``λ_i``
and the keys: ``d + m`` numbers plus ``3m`` integers. The transform runs in float32 whatever the weight's
dtype (``log2 L`` butterfly stages would round away a bfloat16 ``θ``) and ``ΔW`` is cast to it.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.registry import register
from ._shared_bases import SeededBases, draw_seed


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform ``H x`` along the last axis (length a power of 2), in
    ``log2 L`` butterfly stages of ``O(L)``: Sylvester ordering, ``H_{2n} = [[H_n, H_n], [H_n, −H_n]]``."""
    n = x.shape[-1]
    batch = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*batch, n // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(*batch, n)


def padded_length(numel: int, dim: int) -> int:
    """``L = 2^⌈log2 max(D, d, 1)⌉``."""
    return 1 << max(0, math.ceil(math.log2(max(numel, dim, 1))))


class Fastfood(SeededBases):
    """The fixed ``B`` (±1), ``Π`` (permutation) and ``G`` (Gaussian) of one layer, made from ``key =
    [seed, D, L]`` by a CPU generator (the same numbers on every device)."""

    names = ("ff_B", "ff_G", "ff_Pi")

    def generate(self, key):
        seed, _, length = key
        g = torch.Generator().manual_seed(seed)
        cpu = {"device": "cpu"}
        b = torch.randint(0, 2, (length,), generator=g, **cpu).float() * 2 - 1
        pi = torch.randperm(length, generator=g, **cpu)
        gauss = torch.randn(length, generator=g, **cpu)
        return {"ff_B": b, "ff_G": gauss, "ff_Pi": pi}

    def project(self, theta: torch.Tensor, numel: int) -> torch.Tensor:
        """``P θ`` (float32, length ``numel``)."""
        self.refresh()
        length = self.ff_B.numel()
        b, gauss = self.ff_B.float(), self.ff_G.float()
        x = F.pad(theta.float(), (0, length - theta.numel()))
        x = fwht(x * b)
        x = fwht(x[self.ff_Pi] * gauss)
        return x[:numel] / (gauss.norm() * math.sqrt(numel))


class IntrinsicVector(nn.Module):
    """``θ ∈ R^d``, one for all layers of an adapter (the engine's ``shared`` hook), and the seed the
    per-layer projections derive their keys from."""

    def __init__(self, dim: int, seed: int, factory_kwargs: dict):
        super().__init__()
        self.said_theta = nn.Parameter(torch.zeros(dim, **factory_kwargs))
        self.seed = seed


@dataclass
class IntrinsicConfig(AdapterConfig):
    """dim: d, the size of the trained vector θ shared by all adapted layers (0: nothing to train);
    said: one trained scale λ per layer (Aghajanyan et al.), else Li et al.'s plain projection;
    projection_seed: seed of the random projections (None: drawn from the adapter's generator)."""

    dim: int = 200
    said: bool = True
    projection_seed: int | None = None

    def __post_init__(self):
        super().__post_init__()
        self._check_int("dim", low=0)
        self._check(isinstance(self.said, bool), "said", "use True or False.")
        self._check(self.projection_seed is None or (isinstance(self.projection_seed, int)
                                                     and not isinstance(self.projection_seed, bool)
                                                     and 0 <= self.projection_seed < 2**62),
                    "projection_seed", "use None (drawn from the generator) or an integer in [0, 2**62).")


def layer_seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}/{name}".encode())


@register("intrinsic")
class Intrinsic(Method):
    """``ΔW_i = λ_i · reshape(P_i θ)`` with a Fastfood ``P_i`` and ``θ`` shared (see module docstring)."""

    Config = IntrinsicConfig
    summary = "ΔW_i = λ_i·P_i θ: one d-vector θ through a fixed Fastfood map into every layer (SAID, Aghajanyan et al. 2021)"
    computes_base = True
    default_lr = 1e-2

    @classmethod
    def shared(cls, views: list[LayerView], config: IntrinsicConfig, generator=None) -> IntrinsicVector:
        seed = draw_seed(generator) if config.projection_seed is None else config.projection_seed
        return IntrinsicVector(config.dim, seed, views[0].factory_kwargs)

    def __init__(self, view: LayerView, config: IntrinsicConfig, generator=None, calibration=None, shared=None):
        super().__init__(view, config)
        self.vector = self.shared([view], config, generator) if shared is None else shared
        self.numel = view.weight.numel()
        key = [layer_seed(self.vector.seed, view.name), self.numel, padded_length(self.numel, config.dim)]
        self.ff = Fastfood(key, device=view.weight.device)
        # λ_i as a 1-element vector, not a 0-d scalar: FSDP2 (fully_shard) cannot shard a 0-d parameter
        self.said_lambda = nn.Parameter(torch.ones(1, **view.factory_kwargs)) if config.said else None

    @classmethod
    def num_params(cls, view: LayerView, config: IntrinsicConfig) -> int:
        return config.dim + (1 if config.said else 0)

    def loaded(self) -> None:
        self.ff.refresh()

    def delta_weight(self) -> torch.Tensor:
        w = self.view.weight
        delta = self.ff.project(self.vector.said_theta, self.numel)
        if self.said_lambda is not None:
            delta = delta * self.said_lambda.float()
        return delta.reshape(w.shape).to(self.view.param_dtype)

    def _as2d(self, delta: torch.Tensor) -> torch.Tensor:
        v = self.view
        if v.kind in ("hf_conv1d", "embedding"):
            return delta.t()
        return delta.reshape(v.out_features, -1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        delta = self._as2d(self.delta_weight())
        if base_out is None:
            return self.view.functional(x, self.view.weight2d() + delta.to(self.view.weight.dtype))
        return base_out + self.view.functional(x, delta, bias=False).to(base_out.dtype)
