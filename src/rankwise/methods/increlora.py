"""IncreLoRA: incremental parameter allocation (Zhang et al., 2023, arXiv:2308.12043).

Where AdaLoRA starts large and prunes, IncreLoRA starts small and *adds* rank to the modules that
matter. The update is in the same SVD-like form, one triplet per rank::

    ΔW = s · B diag(λ) A = s · Σ_i λ_i b_i a_iᵀ,     s = α / (r + 1e-5)

with ``r`` the module's *current* rank (the reference's ``ranknum``; α defaults to the initial rank
``r₀``, the reference's ``scaling = lora_alpha or r``), so ``s`` shrinks as a module grows: a growth
rescales the module's existing update by ``r_old / r_new``, exactly as in the reference.

Importance (reference ``SVDLinear.backward_hook`` and ``RankAllocator.update_ipt``): one scalar per
module, taken on the incremental matrix itself,

    S = Σ |ΔW ⊙ ∂L/∂ΔW| / √numel(ΔW),   Ī ← β₁ Ī + (1-β₁) S,   Ū ← β₂ Ū + (1-β₂) |S - Ī|,   score Ī·Ū.

The reference forms ``ΔW`` densely in forward so a backward hook sees ``∂L/∂ΔW``; rankwise keeps
LoRA's cheap forward and gets the same gradient exactly from a hook on the layer's output: for
``y = base + ΔW x``, ``∂L/∂ΔW = Σ_n g_n x_nᵀ`` (``g = ∂L/∂y``) — one ``out × in`` product per
backward, the cost of a full weight gradient (convolutions: the layer's own weight-gradient
operation). It runs only while allocation is open (the reference removes its hook at the budget too),
and a dropped input is used as dropped. Under gradient accumulation the scores of the micro-batches
are summed (the reference keeps the last micro-batch's; the exact score of the summed gradient would
need an ``out × in`` buffer per layer).

Allocation, run by :func:`rankwise.rank_step` after optimizer step ``t``: the EMA is updated every step
while the total rank is below the budget ``target_rank · n_layers``; when ``t > tinit`` and
``t % delta_t == 0`` (and up to ``total_step - tfinal`` when a total is known) the ``grow_per_step``
highest-scoring modules (the reference's ``top_h``) each get ``grow_rank`` more ranks (default
``target_rank // 2``, the reference's ``rank_dic = {2: 1, 4: 2, 6: 3, 8: 4}``). Deviation: a growth
never passes the budget or ``min(in, out)`` (the reference may overshoot the target total by up to
``top_h · (grow_rank - 1)`` ranks). The orthogonality regularizer of AdaLoRA keeps the new
components apart from the old ones (``orth_reg_weight``; :func:`rankwise.rank_regularization`; the
reference orthogonalises only within each added chunk, rankwise the whole ``A`` and ``B``).

A new triplet starts with ``a, b ~ N(0, init_std²)`` and ``λ = 0`` (the reference without advance
learning); ``λ``'s gradient is non-zero at once, so it starts to train in the next step.

Rank changes and optimizer state: growing resizes ``A`` (rows), ``λ`` and ``B`` (columns) *in place*
(same Parameter objects) and pads every optimizer state tensor of those parameters with zeros
(Adam: fresh first and second moments for the new entries, the parameter's shared ``step`` count
kept — the reference adds a new param group, whose Adam bias correction restarts). The new ranks go
into the adapter's per-module overrides (``layer_rank``), so ``rw.save``/``rw.load`` rebuild the
grown shapes.

Left out: the paper's "advance learning" (training the reserve components before they are switched
on) and "restart warmup" (re-warming the learning rate after each allocation); the learning-rate
schedule is the caller's. Importance scores are not saved (as in AdaLoRA).

Parameters per layer: ``r (in + out + 1)`` with the layer's current rank ``r``.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.api import adapter_state
from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.ops import low_rank_apply, normal_
from ..core.registry import register
from ._rank_common import Triplets, adapters_of, layer_rank_check, record_rank, resize_

EPS = 1e-5  # the reference: scaling / (ranknum + 1e-5)


@dataclass
class IncreLoraConfig(RankAlphaConfig):
    """rank: r₀, the initial rank of every module; target_rank: the average final rank (budget =
    target_rank · n_layers; None: 2·r₀); alpha: s = α/(r + 1e-5) with r the current rank (None: α = r₀);
    dropout; rslora: not supported; delta_t: steps between allocations; grow_per_step: modules selected
    per allocation (the reference's top_h); grow_rank: ranks each selected module gets (None:
    target_rank // 2, at least 1); tinit: steps before the first allocation; total_step / tfinal: no
    allocation after total_step - tfinal (total_step None: the loop's, rank_step's total_steps, else no
    end); beta1 / beta2: EMA factors; orth_reg_weight; init_std: std of new a, b; seed: of the new
    triplets; layer_rank: a module's current rank (written by rank allocation, saved per module)."""

    rank: int = 2
    target_rank: int | None = None
    delta_t: int = 10
    grow_per_step: int = 1
    grow_rank: int | None = None
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
        self._check(not self.rslora, "rslora", "IncreLoRA scales by α/(current rank), as its reference; "
                    "rsLoRA is not supported.")
        self._check_int("seed", low=0)
        self._check(self.target_rank is None or (isinstance(self.target_rank, int) and self.target_rank >= self.rank),
                    "target_rank", f"target_rank is the average final rank: an integer ≥ rank={self.rank} (or None).")
        for f in ("delta_t", "grow_per_step"):
            self._check_int(f)
        if self.grow_rank is not None:
            self._check_int("grow_rank")
        self._check_int("tinit", low=0)
        self._check_int("tfinal", low=0)
        if self.total_step is not None:
            self._check_int("total_step")
            self._check(self.tinit < self.total_step - self.tfinal, "total_step",
                        f"tinit={self.tinit} + tfinal={self.tfinal} leave no allocation phase in total_step="
                        f"{self.total_step}; lower them or raise total_step.")
        for b in ("beta1", "beta2"):
            self._check(0.0 < getattr(self, b) < 1.0, b, f"{b} is an EMA factor in (0, 1), e.g. 0.85.")
        self._check(self.orth_reg_weight >= 0, "orth_reg_weight", "orth_reg_weight must be ≥ 0.")
        self._check(self.init_std > 0, "init_std", "init_std must be positive.")
        layer_rank_check(self)

    @property
    def final_rank(self) -> int:
        return 2 * self.rank if self.target_rank is None else self.target_rank

    @property
    def ranks_per_growth(self) -> int:
        """Ranks a selected module gets per allocation (the reference's ``incre_rank_num``)."""
        return max(1, self.final_rank // 2) if self.grow_rank is None else self.grow_rank


@register("increlora")
class IncreLora(Triplets):
    """SVD-like low-rank update that grows where importance is high (see module docstring)."""

    Config = IncreLoraConfig
    summary = "ΔW = α/r·B diag(λ) A, ranks added every k steps to the modules with the top ΔW importance (Zhang et al. 2023)"
    resizes = True  # grows its rank while training (FSDP2 cannot shard it)

    def __init__(self, view: LayerView, config: IncreLoraConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, self.name)
        self._init_triplets(config.init_std, generator)
        self.tracking = True  # compute the ΔW score in backward (while allocation is open)
        self._score = None  # Σ|ΔW ⊙ ∂L/∂ΔW|/√numel of the backward passes since the last rank_step
        self.ipt = self.unc = 0.0  # the EMAs Ī, Ū of the module score

    @property
    def scale(self) -> float:
        return self.config.lora_alpha / (self.rank + EPS)

    @property
    def max_rank(self) -> int:
        return min(self.view.in_features, self.view.out_features)

    # ---- importance ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:
            return base_out
        track = self.tracking and self.training and torch.is_grad_enabled()
        p = self.config.dropout
        if track and p > 0:  # the score needs the input as the update saw it
            x, p = F.dropout(x, p, training=True), 0.0
        out = low_rank_apply(self.view, x, base_out, self.lora_A, self.lora_B * self.lora_E.view(1, -1),
                             self.scale, p, self.training)
        if track and out.requires_grad:
            out.register_hook(functools.partial(self._score_hook, x.detach()))
        return out

    @torch.no_grad()
    def _score_hook(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """Add ``Σ |ΔW ⊙ ∂L/∂ΔW| / √numel`` of this backward, ``∂L/∂ΔW = Σ_n g_n x_nᵀ`` (exact)."""
        dw = self.delta2d().float()
        if self.view.is_linear:
            grad = g.reshape(-1, dw.shape[0]).float().t() @ x.reshape(-1, dw.shape[1]).float()
        else:  # the layer's own operation's weight gradient
            with torch.enable_grad():
                w = torch.zeros_like(dw, requires_grad=True)
                (grad,) = torch.autograd.grad(self.view.apply_in(x.float(), w), w, g.float())
        s = (dw * grad).abs().sum() / math.sqrt(dw.numel())
        self._score = s if self._score is None else self._score + s

    def update_importance(self) -> None:
        """Fold the step's score into ``Ī`` and ``Ū`` (the reference's ``update_ipt``)."""
        s = 0.0 if self._score is None else float(self._score)
        b1, b2 = self.config.beta1, self.config.beta2
        self.ipt = b1 * self.ipt + (1 - b1) * s
        self.unc = b2 * self.unc + (1 - b2) * abs(s - self.ipt)
        self._score = None

    def importance(self) -> float:
        """``Ī · Ū`` of the module score."""
        return self.ipt * self.unc

    # ---- allocation ------------------------------------------------------------------------------
    def _params(self):
        return (("A", self.lora_A, 0), ("E", self.lora_E, 0), ("B", self.lora_B, 1))

    @torch.no_grad()
    def grow_(self, extra: int, optimizers=(), generator=None) -> int:
        """Add ``extra`` triplets (a, b ~ N(0, init_std²), λ = 0) and pad the optimizer state; return the rank."""
        std, p0 = self.config.init_std, self.lora_A
        g = generator if generator is not None else torch.Generator().manual_seed(
            self.config.seed * 1_000_003 + zlib.crc32(f"{self.view.name}/{self.rank}".encode()))
        kw = {"dtype": p0.dtype, "device": p0.device}
        new = {"A": normal_(torch.empty(extra, p0.shape[1], **kw), std, g),
               "E": torch.zeros(extra, 1, **kw),
               "B": normal_(torch.empty(self.lora_B.shape[0], extra, **kw), std, g)}
        for key, p, dim in self._params():
            resize_(p, dim, optimizers, new=new[key])
        return self.rank

    @classmethod
    def on_step(cls, model: nn.Module, name: str, step: int, optimizers, total_steps=None) -> dict | None:
        cfg = adapter_state(model)[name]["config"]
        found = adapters_of(model, "increlora", name)
        budget = cfg.final_rank * len(found)
        total = sum(ad.rank for _, _, ad in found)
        end = cfg.total_step if cfg.total_step is not None else total_steps
        if total >= budget or not (end is None or step <= end - cfg.tfinal):
            for _, _, ad in found:
                ad.tracking, ad._score = False, None
            return None
        for _, _, ad in found:
            ad.update_importance()
        if step <= cfg.tinit or step % cfg.delta_t != 0:
            return None
        scores = [(ad.importance(), i) for i, (_, _, ad) in enumerate(found) if ad.rank < ad.max_rank]
        scores.sort(key=lambda t: (-t[0], t[1]))
        grown, left = {}, budget - total
        for _, i in scores[: cfg.grow_per_step]:
            _, lname, ad = found[i]
            extra = min(cfg.ranks_per_growth, ad.max_rank - ad.rank, left)
            if extra <= 0:
                break
            grown[lname] = ad.grow_(extra, optimizers)
            left -= extra
            record_rank(model, name, lname, ad, layer_rank=ad.rank)
        return {"budget": budget, "total_rank": budget - left, "grown": grown} if grown else None


def ranks(model: nn.Module, name: str | None = None) -> dict[str, int]:
    """The current rank of every module of IncreLoRA adapter ``name`` (default: all)."""
    return {lname: ad.rank for _, lname, ad in adapters_of(model, "increlora", name)}
