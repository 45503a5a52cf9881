"""Bone: block-affine adaptation (Kang, 2024, arXiv:2409.15371, "Bone: Block Affine Transformation
as Parameter Efficient Fine-tuning Methods for Large Language Models"; since renamed MiSS,
"Matrix Shard Sharing" — PEFT's ``miss``).

``mode='bat'`` (the paper's Bone, PEFT ``init_weights='bat'``): ``W0 (m × n)`` is cut into
``r × r`` blocks ``W0_ij``; one trained ``r × r`` block ``B_i`` per block-row acts on every block
of its row, guided by the weight itself ("weight guide")::

    ΔW_ij = W0_ij · B_i + B_i                 (i < m/r, j < n/r)

``mode='share'`` (MiSS, PEFT's default ``init_weights=True``): one trained shard ``B ∈ R^{r×m}`` is
shared by all column blocks, ``ΔW[p, q] = B[q mod r, p]``, i.e. ``ΔW = [Bᵀ Bᵀ … Bᵀ]`` (the last copy
cut to ``n mod r`` columns), applied as ``y += (Σ_j x_j) B`` — a block sum and one thin product.

Blocks start at zero, so ``ΔW = 0`` at init exactly (the paper's init; no randomness at all, so the
same adapter comes out for any seed: ``deterministic_init = True``).

Activation view of ``bat``: ``ΔW`` depends on ``W0`` block by block, and applying it without
forming it would take two ``N·m·n`` products; forming it costs ``m·n·r`` (``(m/r)(n/r)`` products of
``r × r`` blocks), less than one batch product, so the layer forms ``W0 + ΔW`` once per forward
and runs a single product with it (``computes_base``; PEFT does the same). Embeddings in ``bat``
mode form the vocabulary-sized ``ΔW`` (``m·V·r`` per forward) — correct but costly on a large
vocabulary; ``share`` looks a token's column up directly (``B[q mod r]``).

``r`` is clamped per layer: ``bat`` uses the largest divisor of ``gcd(m, n)`` not above ``rank``
(blocks must tile ``W0``), ``share`` uses ``min(rank, n)``. ``dropout`` (``share`` only, as PEFT)
drops the adapter's input.

Reference: the authors' code (JL-er/Bone, ``finetune.py``) trains PEFT's ``BoneConfig``, since renamed
``MissConfig``; the PEFT oracle test checks outputs and gradients in both modes. Deviation: PEFT
refuses an ``r`` that does not tile the layer; rankwise clamps it per layer (above), and export
refuses a clamped adapter.

Parameters per layer: ``m · r`` in both modes (``(m/r)·r²`` block-affine, ``r·m`` shared).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import low_rank_apply
from ..core.registry import register
from ..errors import ConfigError
from ._structured_common import check_peft_shape, dense_forward, largest_divisor, require_peft_kinds


@dataclass
class BoneConfig(AdapterConfig):
    """rank: r, the block size (clamped per layer); mode: 'bat' (block-affine, W0-guided; the paper)
    | 'share' (MiSS: one shard shared by all column blocks); dropout: on the input ('share' only)."""

    rank: int = 64
    mode: str = "bat"
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self._check_int("rank")
        self._check(self.mode in ("bat", "share"), "mode", "use 'bat' (Bone's block-affine) or 'share' (MiSS).")
        self._check(0.0 <= self.dropout < 1.0, "dropout", "dropout must be in [0, 1).")
        self._check(self.dropout == 0.0 or self.mode == "share", "dropout",
                    "mode='bat' has no dropout (it multiplies the whole weight); use dropout=0 or mode='share'.")


def block_rank(view: LayerView, config: BoneConfig) -> int:
    if config.mode == "bat":
        return largest_divisor(math.gcd(view.out_features, view.in_features), config.rank)
    return min(config.rank, view.in_features)


@register("bone")
class Bone(Method):
    """Block-affine ``ΔW_ij = W0_ij B_i + B_i`` or the shared shard ``[Bᵀ … Bᵀ]`` (see module docstring)."""

    Config = BoneConfig
    summary = "Bone: ΔW_ij = W0_ij·B_i + B_i on r×r blocks (bat) or one shared shard (MiSS); blocks start at 0"
    deterministic_init = True  # zero blocks, as the paper: every seed gives the same adapter
    # default_lr: the base's 1e-3, measured on the demo at rank 64 (3e-3 diverges, 1e-3 beats 3e-4)
    demo_options = {"rank": 64}

    def __init__(self, view: LayerView, config: BoneConfig, generator=None, calibration=None):
        super().__init__(view, config)
        self.rank = r = block_rank(view, config)
        m = view.out_features
        bat = config.mode == "bat"
        self.reads_base = self.computes_base = bat
        shape = (m // r, r, r) if bat else (r, m)
        self.miss_block = nn.Parameter(torch.zeros(shape, **view.factory_kwargs))

    @classmethod
    def num_params(cls, view: LayerView, config: BoneConfig) -> int:
        return view.out_features * block_rank(view, config)

    def _delta2d(self) -> torch.Tensor:
        m, n, r = self.view.out_features, self.view.in_features, self.rank
        b = self.miss_block
        if self.config.mode == "share":
            return b.t().repeat(1, -(-n // r))[:, :n]
        w4 = self.view.weight2d().to(b.dtype).reshape(m // r, r, n // r, r).transpose(1, 2)  # I × J × r × r
        delta = torch.matmul(w4, b.unsqueeze(1)) + b.unsqueeze(1)
        return delta.transpose(1, 2).reshape(m, n)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        if self.config.mode == "bat":
            return dense_forward(self.view, x, base_out, self._delta2d())
        b, r, view = self.miss_block, self.rank, self.view
        if view.kind == "embedding":
            return base_out + F.embedding(x % r, b).to(base_out.dtype)
        if not view.is_linear:  # convolution: the block sum is a fixed 0/1 map S (r × n), ΔW = Bᵀ S
            n = view.in_features
            s = (torch.arange(n, device=b.device) % r == torch.arange(r, device=b.device)[:, None]).to(b.dtype)
            return low_rank_apply(view, x, base_out, s, b.t(), dropout=self.config.dropout, training=self.training)
        if x.dtype != b.dtype:
            x = x.to(b.dtype)
        if self.config.dropout and self.training:
            x = F.dropout(x, self.config.dropout, training=True)
        n = view.in_features
        pad = -n % r
        xs = (F.pad(x, (0, pad)) if pad else x).reshape(*x.shape[:-1], (n + pad) // r, r).sum(-2)  # Σ_j x_j
        return base_out + (xs @ b).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param(self._delta2d())

    # ---- PEFT format (used by rankwise.io.peft) -------------------------------------------
    peft_type = "MISS"

    @classmethod
    def peft_accepts(cls, pcfg: dict) -> bool:
        return pcfg.get("peft_type") == "MISS" and pcfg.get("init_weights", True) in (True, "bat")

    @classmethod
    def to_peft_config(cls, config: BoneConfig, views: list[LayerView]) -> dict:
        require_peft_kinds("bone", "MiSS", views, ("linear",))
        ranks = {v.name: block_rank(v, config) for v in views}
        odd = {name: r for name, r in ranks.items() if r != config.rank}
        if odd:
            raise ConfigError(
                f"bone rank={config.rank} was clamped on modules {odd} (their shapes do not fit {config.rank}-blocks); "
                "PEFT's MiSS has one r for all modules. Pick a rank that fits every module or save with rw.save()."
            )
        return {"peft_type": "MISS", "r": config.rank, "mini_r": 1,
                "init_weights": "bat" if config.mode == "bat" else True,
                "miss_dropout": config.dropout, "bias": "none"}

    @classmethod
    def from_peft_config(cls, pcfg: dict) -> dict:
        if pcfg.get("bias", "none") != "none":
            raise ConfigError("PEFT MiSS adapter trains biases (bias != 'none'); rankwise's bone leaves biases frozen.")
        bat = pcfg.get("init_weights", True) == "bat"
        return {"rank": int(pcfg["r"]), "mode": "bat" if bat else "share",
                "dropout": 0.0 if bat else float(pcfg.get("miss_dropout") or 0.0)}

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"miss_block": self.miss_block}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        t = tensors["miss_block"]
        check_peft_shape(self.view, "miss_block", t, self.miss_block, f"mode {self.config.mode}, r {self.rank}")
        with torch.no_grad():
            self.miss_block.copy_(t)

    @classmethod
    def peft_suffixes(cls) -> tuple[str, ...]:
        return ("miss_block",)
