"""IncreLoRA: incremental parameter allocation (Zhang et al., 2023, arXiv:2308.12043).

Where AdaLoRA starts large and prunes, IncreLoRA starts small and *adds* rank to the modules that
matter. The update is in the same SVD-like form, one triplet per rank::

    ΔW = s · B diag(λ) A = s · Σ_i λ_i b_i a_iᵀ,     s = α / r₀  (r₀: the initial rank; fixed)

Importance: every entry of ``A, λ, B`` gets AdaLoRA's smoothed sensitivity ``Ī`` and uncertainty
``Ū`` (``I = |θ ∇θ|``; see ``_rank_common.Sensitivity``); a module scores the mean of ``Ī ⊙ Ū`` over
all its entries. Every ``delta_t`` steps after ``tinit`` (and up to ``total_step - tfinal`` when
``total_step`` is set) :func:`rankwise.rank_step` gives one more rank to each of the ``grow_per_step``
highest-scoring modules, until the total rank reaches the budget ``target_rank · n_layers`` (a
module never grows beyond ``min(in, out)``). The same orthogonality regularizer as AdaLoRA keeps
the new components apart from the old ones (``orth_reg_weight``; :func:`rankwise.rank_regularization`).

A new triplet starts with ``a, b ~ N(0, init_std²)`` and ``λ = 0``, so growing never changes the
layer's output; ``λ``'s gradient is non-zero at once, so it starts to train in the next step.

Rank changes and optimizer state: growing resizes ``A`` (a row), ``λ`` and ``B`` (a column) *in
place* (same Parameter objects) and pads every optimizer state tensor of those parameters with
zeros (Adam: fresh first and second moments for the new entries, the parameter's shared ``step``
count kept). One Adam step after a growth is therefore exactly Adam on the grown parameters with
zero moments for the new entries (tested). The new ranks go into the adapter's per-module
overrides (``layer_rank``), so ``rw.save``/``rw.load`` rebuild the grown shapes.

Ambiguities and what is left out: the paper's "advance learning" (training the components to be
added before they are switched on) and "restart warmup" (re-warming the learning rate after each
allocation) are not implemented — new triplets start from the random init with ``λ = 0``, and the
learning-rate schedule is the caller's. The module score is the mean (not the sum) of the entry
scores, so larger modules are not favoured. Importance scores are not saved (as in AdaLoRA).

Parameters per layer: ``r (in + out + 1)`` with the layer's current rank ``r``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from ..core.api import adapter_state
from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.registry import register
from ._rank_common import Triplets, adapters_of, layer_rank_check, record_rank, resize_
from ._shared_common import positive_int


@dataclass
class IncreLoraConfig(AdapterConfig):
    """rank: r₀, the initial rank of every module; target_rank: the average final rank (budget =
    target_rank · n_layers; None: 2·r₀); alpha: s = α/r₀ (None: α = r₀); dropout; delta_t: steps
    between allocations; grow_per_step: modules that get one more rank per allocation; tinit: steps
    before the first allocation; total_step / tfinal: no allocation after total_step - tfinal
    (total_step None: the loop's, rank_step's total_steps, else no end); beta1 / beta2: EMA factors; orth_reg_weight; init_std: std of new
    a, b; layer_rank: a module's current rank (written by rank allocation, saved per module)."""

    rank: int = 2
    target_rank: int | None = None
    alpha: float | None = None
    dropout: float = 0.0
    delta_t: int = 10
    grow_per_step: int = 1
    tinit: int = 0
    tfinal: int = 0
    total_step: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    init_std: float = 0.02
    seed: int = 0
    layer_rank: int | None = None

    def __post_init__(self):
        super().__post_init__()
        positive_int(self, "rank")
        positive_int(self, "seed", allow_zero=True)
        self._check(self.target_rank is None or (isinstance(self.target_rank, int) and self.target_rank >= self.rank),
                    "target_rank", f"target_rank is the average final rank: an integer ≥ rank={self.rank} (or None).")
        self._check(self.alpha is None or self.alpha > 0, "alpha", "alpha must be positive (or None: alpha = rank).")
        self._check(0.0 <= self.dropout < 1.0, "dropout", "dropout must be in [0, 1).")
        positive_int(self, "delta_t")
        positive_int(self, "grow_per_step")
        positive_int(self, "tinit", allow_zero=True)
        positive_int(self, "tfinal", allow_zero=True)
        if self.total_step is not None:
            positive_int(self, "total_step")
            self._check(self.tinit < self.total_step - self.tfinal, "total_step",
                        f"tinit={self.tinit} + tfinal={self.tfinal} leave no allocation phase in total_step="
                        f"{self.total_step}; lower them or raise total_step.")
        for b in ("beta1", "beta2"):
            self._check(0.0 < getattr(self, b) < 1.0, b, f"{b} is an EMA factor in (0, 1), e.g. 0.85.")
        self._check(self.orth_reg_weight >= 0, "orth_reg_weight", "orth_reg_weight must be ≥ 0.")
        self._check(self.init_std > 0, "init_std", "init_std must be positive.")
        layer_rank_check(self)

    @property
    def scale(self) -> float:
        return (float(self.rank) if self.alpha is None else float(self.alpha)) / self.rank

    @property
    def final_rank(self) -> int:
        return 2 * self.rank if self.target_rank is None else self.target_rank


@register("increlora")
class IncreLora(Triplets):
    """SVD-like low-rank update that grows where importance is high (see module docstring)."""

    Config = IncreLoraConfig
    kinds = ("linear", "hf_conv1d", "conv1d", "conv2d")
    summary = "ΔW = s·B diag(λ) A, rank added every k steps to the most important modules under a budget (Zhang et al. 2023)"
    identity_at_init = True
    merge_atol = 1e-5
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: IncreLoraConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, "increlora")
        self._init_triplets(view, config, config.init_std, generator)

    @property
    def max_rank(self) -> int:
        return min(self.view.in_features, self.view.out_features)

    # ---- allocation ------------------------------------------------------------------------------
    def _params(self):
        return (("A", self.lora_A, 0), ("E", self.lora_E, 0), ("B", self.lora_B, 1))

    def importance(self) -> float:
        """Mean of ``Ī ⊙ Ū`` over every entry of ``A, λ, B``."""
        total = sum(float(self._sens[k].score(p).sum()) for k, p, _ in self._params())
        return total / sum(p.numel() for _, p, _ in self._params())

    @torch.no_grad()
    def grow_(self, extra: int, optimizers=(), generator=None) -> int:
        """Add ``extra`` triplets (a, b ~ N(0, init_std²), λ = 0) and pad the optimizer state; return the rank."""
        std, p0 = self.config.init_std, self.lora_A
        g = generator if generator is not None else torch.Generator().manual_seed(
            self.config.seed * 1_000_003 + zlib.crc32(f"{self.view.name}/{self.rank}".encode()))
        new = {
            "A": torch.randn(extra, p0.shape[1], generator=g, dtype=p0.dtype).mul_(std).to(p0.device),
            "E": torch.zeros(extra, 1, dtype=p0.dtype, device=p0.device),
            "B": torch.randn(self.lora_B.shape[0], extra, generator=g, dtype=p0.dtype).mul_(std).to(p0.device),
        }
        for key, p, dim in self._params():
            resize_(p, dim, optimizers, new=new[key])
            self._sens[key].resize(dim, extra=extra)
        return self.rank

    @classmethod
    def on_step(cls, model: nn.Module, name: str, step: int, optimizers, total_steps=None) -> dict | None:
        cfg = adapter_state(model)[name]["config"]
        found = adapters_of(model, "increlora", name)
        budget = cfg.final_rank * len(found)
        total = sum(ad.rank for _, _, ad in found)
        end = cfg.total_step if cfg.total_step is not None else total_steps
        open_ = end is None or step <= end - cfg.tfinal
        if total >= budget or not open_:
            return None
        for _, _, ad in found:
            for key, p, _ in ad._params():
                ad._sens[key].update(p)
        if step <= cfg.tinit or step % cfg.delta_t != 0:
            return None
        scores = [(ad.importance(), i) for i, (_, _, ad) in enumerate(found) if ad.rank < ad.max_rank]
        scores.sort(key=lambda t: (-t[0], t[1]))
        grown = {}
        for _, i in scores[: min(cfg.grow_per_step, budget - total)]:
            _, lname, ad = found[i]
            grown[lname] = ad.grow_(1, optimizers)
            record_rank(model, name, lname, ad, layer_rank=ad.rank)
        return {"budget": budget, "total_rank": total + len(grown), "grown": grown} if grown else None

    @classmethod
    def rank_regularization(cls, model: nn.Module, name: str) -> torch.Tensor | None:
        cfg = adapter_state(model)[name]["config"]
        found = adapters_of(model, "increlora", name)
        if cfg.orth_reg_weight == 0 or not any(ad.lora_A.requires_grad for _, _, ad in found):
            return None
        terms = []
        for _, _, ad in found:
            for cov in (ad.lora_A @ ad.lora_A.T, ad.lora_B.T @ ad.lora_B):
                terms.append(torch.norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device), p="fro"))
        return cfg.orth_reg_weight * (torch.stack(terms).sum() / len(terms))


def ranks(model: nn.Module, name: str | None = None) -> dict[str, int]:
    """The current rank of every module of IncreLoRA adapter ``name`` (default: all)."""
    return {lname: ad.rank for _, lname, ad in adapters_of(model, "increlora", name)}
