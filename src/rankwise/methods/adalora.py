"""AdaLoRA: adaptive budget allocation (Zhang et al., ICLR 2023, arXiv:2303.10512).

The update is kept in SVD form, ``P Λ Q``::

    ΔW = s · B diag(E) A,     A ∈ R^{r×in} (Q),  E ∈ R^{r} (Λ),  B ∈ R^{out×r} (P),  s = α / (r + 1e-5)

with ``r`` the initial rank ``init_r`` (PEFT keeps ``ranknum = r`` and divides by ``ranknum + 1e-5``;
``s`` never changes when ranks are masked or cut). Init as PEFT: ``A, B ~ N(0, 0.02²)``, ``E = 0``,
so the adapted model starts as the base.

Orthogonality regularizer (added to the loss; :func:`rankwise.rank_regularization` returns it)::

    R = w · mean over every A and B of ‖A Aᵀ - I‖_F  and  ‖Bᵀ B - I‖_F          (w = orth_reg_weight)

Budget allocation, run by :func:`rankwise.rank_step` after each optimizer step ``t`` (1-based, while
the step's gradients are in ``.grad``): every entry ``θ`` of ``A, E, B`` gets the importance
``I = |θ ∇θ|``, smoothed ``Ī ← β₁ Ī + (1-β₁) I`` and its uncertainty ``Ū ← β₂ Ū + (1-β₂) |I - Ī|``
(only while ``t < T - t_final``). Triplet ``i`` of a layer scores

    S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji),      s = Ī ⊙ Ū.

The total budget (sum of ranks over the adapter's layers) follows the cubic schedule from
``b₀ = Σ r`` to ``b_T = target_rank · n_layers``::

    b(t) = b₀                                              t ≤ t_init
         = ⌊(b₀ - b_T)(1 - (t - t_init)/(T - t_final - t_init))³ + b_T⌋     otherwise, masking when t % ΔT = 0
         = b_T                                             t > T - t_final

and masking sets ``E_i = 0`` for every triplet with ``S_i`` ≤ the ``(b₀ - b(t))``-th smallest score of
all layers. At ``t = T - t_final`` the mask is fixed at ``b_T`` (so the adapter ends at its target
budget) and the scores are reset; afterwards the fixed mask is re-applied every step. This is PEFT
0.21's ``RankAllocator`` step for step (same masks from the same gradients; tested).

Rank changes and optimizer state: masking only writes zeros into ``E`` (shapes never change), so
the optimizer's state stays valid as it is — exactly PEFT's behaviour: a masked ``E_i`` still gets
gradients and may move between two masking steps (``ΔT > 1``) before it is zeroed again.
:func:`prune` (or ``resize=True``, at ``t = T - t_final``) then cuts the masked triplets out for real:
the rows of ``A`` and ``E``, the columns of ``B``, and the same slices of every optimizer state
tensor of those parameters (Adam's moments), keeping the same Parameter objects. The new ranks
go into the adapter's per-module overrides (``layer_rank``), so ``rw.save``/``rw.load`` rebuild the
cut shapes. After the cut the regularizer sees only the kept triplets (PEFT keeps regularizing
the masked ones too), which is the one difference from PEFT's final phase.

PEFT format: ``peft_type = "ADALORA"``, tensors ``lora_A``, ``lora_E``, ``lora_B`` of the kept
triplets, and ``rank_pattern`` (``"<module>.lora_E"`` → booleans over the ``init_r`` slots), which
PEFT uses to rebuild the cut shapes on load.

Not stored: the importance scores (as in PEFT), so a training run resumed from a checkpoint
restarts them; a checkpoint taken after a cut must be resumed on a model rebuilt with the cut
ranks (``rw.load`` the adapter first).

Parameters per layer: ``r (in + out + 1)`` with the layer's current rank ``r``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.api import adapter_state
from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.registry import register
from ..errors import ConfigError, ShapeMismatchError
from ._rank_common import Sensitivity, Triplets, adapters_of, layer_rank_check, record_rank, resize_

EPS = 1e-5  # PEFT: scaling / (ranknum + 1e-5)


@dataclass
class AdaLoraConfig(RankAlphaConfig):
    """rank: initial rank r (PEFT's init_r); target_rank: average final rank (PEFT's target_r; None:
    2r/3 rounded down); alpha: s = α/(r + 1e-5) (None: α = r); dropout; rslora: not supported (PEFT's
    AdaLoRA has no rsLoRA scaling); tinit / tfinal: steps
    without masking at the start / with the final mask at the end; delta_t: steps between
    masks; beta1 / beta2: EMA factors of sensitivity and uncertainty; orth_reg_weight: w;
    total_step: T, the number of training steps (None: the loop's, from rank_step's total_steps); resize: cut the masked
    triplets for real at step T - tfinal; layer_rank: a module's rank after a cut (written by
    rank allocation, saved per module)."""

    rank: int = 12
    target_rank: int | None = None
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    resize: bool = False
    layer_rank: int | None = None

    def __post_init__(self):
        super().__post_init__()
        self._check(not self.rslora, "rslora", "AdaLoRA scales by α/(r + 1e-5), as PEFT; rsLoRA is not supported.")
        self._check(self.target_rank is None or (isinstance(self.target_rank, int) and 0 <= self.target_rank
                                                 <= self.rank), "target_rank",
                    f"target_rank is the average final rank: an integer in [0, rank={self.rank}] (or None).")
        self._check_int("tinit", low=0)
        self._check_int("tfinal", low=0)
        self._check_int("delta_t")
        for b in ("beta1", "beta2"):
            self._check(0.0 < getattr(self, b) < 1.0, b, f"{b} is an EMA factor in (0, 1), e.g. 0.85.")
        self._check(self.orth_reg_weight >= 0, "orth_reg_weight", "orth_reg_weight must be ≥ 0.")
        if self.total_step is not None:
            self._check_int("total_step")
            self._check(self.tinit < self.total_step - self.tfinal, "total_step",
                        f"tinit={self.tinit} + tfinal={self.tfinal} leave no budgeting phase in total_step="
                        f"{self.total_step} steps; lower tinit/tfinal or raise total_step.")
        layer_rank_check(self)
        self._check(self.layer_rank is None or self.layer_rank <= self.rank, "layer_rank",
                    f"a module's rank after a cut cannot exceed the initial rank {self.rank}.")

    @property
    def scale(self) -> float:
        return self.lora_alpha / (self.rank + EPS)

    @property
    def final_rank(self) -> int:
        return self.rank * 2 // 3 if self.target_rank is None else self.target_rank


class _Allocator:
    """AdaLoRA's budget state for one adapter: the initial and target budgets (fixed at the first
    step), and whether the final mask has been set."""

    def __init__(self, init_bgt: int, target_bgt: int):
        self.init_bgt, self.target_bgt = init_bgt, target_bgt

    def budget(self, step: int, cfg: AdaLoraConfig, total: int) -> tuple[int, bool]:
        """PEFT's ``budget_schedule`` (the same float expression, so the same integer budgets)."""
        tinit, tfinal = cfg.tinit, cfg.tfinal
        if step <= tinit:
            return self.init_bgt, False
        if step > total - tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff ** 3) + self.target_bgt)
        return budget, step % cfg.delta_t == 0


@register("adalora")
class AdaLora(Triplets):
    """SVD-form low-rank update with importance-based rank budget (see module docstring)."""

    Config = AdaLoraConfig
    summary = "ΔW = s·B diag(E) A, triplets masked by smoothed importance to a cubic rank budget (Zhang et al. 2023)"

    def __init__(self, view: LayerView, config: AdaLoraConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, self.name)
        self._init_triplets(0.02, generator)
        self.register_buffer("rank_mask", torch.ones(self.rank, dtype=torch.bool, device=view.weight.device))
        self.reset_sensitivity()

    # ---- budget allocation ----------------------------------------------------------------------
    def reset_sensitivity(self) -> None:
        self._sens = {k: Sensitivity(self.config.beta1, self.config.beta2) for k in ("A", "E", "B")}

    def _params(self):
        return (("A", self.lora_A), ("E", self.lora_E), ("B", self.lora_B))

    def _update_importance(self) -> None:
        for key, p in self._params():
            self._sens[key].update(p)

    def triplet_scores(self) -> torch.Tensor:
        """``S_i`` of every triplet (see module docstring), shape ``(r,)``."""
        s_a = self._sens["A"].score(self.lora_A).mean(dim=1)
        s_b = self._sens["B"].score(self.lora_B).mean(dim=0)
        return self._sens["E"].score(self.lora_E).view(-1) + (s_a + s_b)

    @torch.no_grad()
    def _apply_mask(self) -> None:
        self.lora_E.masked_fill_(~self.rank_mask.view(-1, 1), 0.0)

    @torch.no_grad()
    def prune_(self, optimizers=()) -> int:
        """Cut the masked triplets out (and the matching optimizer state); return the new rank."""
        keep = torch.nonzero(self.rank_mask).flatten()
        if keep.numel() == self.rank:
            return self.rank
        for key, p, dim in (("A", self.lora_A, 0), ("E", self.lora_E, 0), ("B", self.lora_B, 1)):
            resize_(p, dim, optimizers, keep=keep)
            self._sens[key].resize(dim, keep=keep)
        self.rank_mask = self.rank_mask[keep]
        return self.rank

    @classmethod
    def on_step(cls, model: nn.Module, name: str, step: int, optimizers, total_steps=None) -> dict | None:
        entry = adapter_state(model)[name]
        cfg = entry["config"]
        total = cfg.total_step if cfg.total_step is not None else total_steps
        if total is None or cfg.tinit >= total - cfg.tfinal:
            raise ConfigError(f"adapter '{name}' (adalora): total_step={total} with tinit={cfg.tinit}, tfinal="
                              f"{cfg.tfinal}; rank allocation needs the number of training steps, with room for a "
                              "budgeting phase: rw.adapt(model, 'adalora', total_step=..., ...) or "
                              "rw.rank_step(..., total_steps=...).")
        found = adapters_of(model, "adalora", name)
        if entry.get("allocator") is None:
            entry["allocator"] = _Allocator(sum(ad.rank for _, _, ad in found), cfg.final_rank * len(found))
        alloc = entry["allocator"]
        end = total - cfg.tfinal
        if step < end:
            for _, _, ad in found:
                ad._update_importance()
            budget, mask = alloc.budget(step, cfg, total)
            if not mask:
                return None
            return {"budget": budget, "ranks": cls._mask_to_budget(found, alloc.init_bgt - budget)}
        if step == end:
            ranks = cls._mask_to_budget(found, alloc.init_bgt - alloc.target_bgt)
            for _, _, ad in found:
                ad.reset_sensitivity()
            if cfg.resize:
                ranks = prune(model, name, optimizers)[name]
            return {"budget": alloc.target_bgt, "ranks": ranks, "final": True}
        for _, _, ad in found:
            ad._apply_mask()
        return None

    @staticmethod
    @torch.no_grad()
    def _mask_to_budget(found, k: int) -> dict[str, int]:
        """Zero ``E_i`` of every triplet scoring ≤ the ``k``-th smallest score of all layers."""
        scores = [ad.triplet_scores() for _, _, ad in found]
        if k > 0:
            threshold = torch.kthvalue(torch.cat(scores), k=k)[0].item()
        else:  # the budget is the whole initial rank: nothing to mask
            threshold = float("-inf")
        ranks = {}
        for (_, lname, ad), s in zip(found, scores):
            ad.rank_mask.copy_(s > threshold)
            ad._apply_mask()
            ranks[lname] = int(ad.rank_mask.sum())
        return ranks

    # ---- PEFT format (used by rankwise.io.peft) -----------------------------------------------
    peft_type = "ADALORA"

    @classmethod
    def peft_accepts(cls, pcfg: dict) -> bool:
        return pcfg.get("peft_type") == "ADALORA"

    @classmethod
    def to_peft_config(cls, config: AdaLoraConfig, views: list[LayerView]) -> dict:
        for v in views:
            if v.kind == "conv1d" or (v.kind == "conv2d" and v.base.padding_mode != "zeros"):
                raise ConfigError(
                    f"module '{v.name}' is a {v.kind} (padding_mode={getattr(v.base, 'padding_mode', '?')!r}); PEFT's "
                    "AdaLoRA adapts Linear, Conv1D and zero-padded Conv2d only. Save it with rw.save() instead.")
        total = config.total_step if config.total_step is not None else config.tinit + config.tfinal + 1
        return {
            "peft_type": "ADALORA", "r": 8, "init_r": config.rank, "target_r": config.final_rank,
            "lora_alpha": config.lora_alpha, "lora_dropout": config.dropout, "tinit": config.tinit,
            "tfinal": config.tfinal, "deltaT": config.delta_t, "beta1": config.beta1, "beta2": config.beta2,
            "orth_reg_weight": config.orth_reg_weight, "total_step": total, "bias": "none",
            "fan_in_fan_out": any(v.kind == "hf_conv1d" for v in views), "init_lora_weights": True,
            "use_rslora": False, "rank_pattern": None, "alpha_pattern": {},
        }

    @classmethod
    def peft_patterns(cls, config: AdaLoraConfig, adapters: dict) -> dict:
        """``rank_pattern``: which of the ``init_r`` slots each module keeps (None when none is cut or masked)."""
        pattern = {}
        for mname, ad in adapters.items():
            kept = ad.rank_mask.tolist()
            pattern[f"{mname}.lora_E"] = [bool(k) for k in kept] + [False] * (config.rank - len(kept))
        if all(all(v) for v in pattern.values()):
            return {"rank_pattern": None}
        return {"rank_pattern": pattern}

    @classmethod
    def from_peft_config(cls, pcfg: dict) -> dict:
        if pcfg.get("bias", "none") != "none":
            raise ConfigError("PEFT AdaLoRA adapter trains biases (bias != 'none'); rankwise leaves biases frozen.")
        return {"rank": int(pcfg["init_r"]), "target_rank": int(pcfg["target_r"]),
                "alpha": float(pcfg["lora_alpha"]) if pcfg.get("lora_alpha", 0) > 0 else None,
                "dropout": float(pcfg.get("lora_dropout") or 0.0), "tinit": int(pcfg.get("tinit", 0)),
                "tfinal": int(pcfg.get("tfinal", 0)), "delta_t": int(pcfg.get("deltaT", 1)),
                "beta1": float(pcfg.get("beta1", 0.85)), "beta2": float(pcfg.get("beta2", 0.85)),
                "orth_reg_weight": float(pcfg.get("orth_reg_weight", 0.5)), "total_step": pcfg.get("total_step")}

    @classmethod
    def peft_module_overrides(cls, pcfg: dict, modules: list[str]) -> dict | None:
        pattern = pcfg.get("rank_pattern") or {}
        if not pattern:
            return None
        out = {}
        for key, mask in pattern.items():
            mod = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
            mod = mod.rsplit(".lora_E", 1)[0]
            if mod in modules:
                k = int(sum(bool(v) for v in mask))
                if k != int(pcfg["init_r"]):
                    out[mod] = {"layer_rank": k}
        return out or None

    @classmethod
    def peft_suffixes(cls) -> tuple[str, ...]:
        return ("lora_A", "lora_E", "lora_B")

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        keep = torch.nonzero(self.rank_mask).flatten()
        return {"lora_A": self.lora_A[keep], "lora_E": self.lora_E[keep], "lora_B": self.lora_B[:, keep]}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, p in (("lora_A", self.lora_A), ("lora_E", self.lora_E), ("lora_B", self.lora_B)):
            t = tensors.get(key)
            if t is None or t.numel() != p.numel() or (t.dim() == p.dim() and tuple(t.shape) != tuple(p.shape)):
                raise ShapeMismatchError(
                    f"module '{self.view.name}': PEFT tensor {key} has shape "
                    f"{None if t is None else tuple(t.shape)}, rankwise expects {tuple(p.shape)} (rank {self.rank}, "
                    f"weight {self.view.out_features}x{self.view.in_features}). Load it onto the model it was trained on.")
        with torch.no_grad():
            for key, p in (("lora_A", self.lora_A), ("lora_E", self.lora_E), ("lora_B", self.lora_B)):
                p.copy_(tensors[key].reshape(p.shape))
        self.rank_mask.fill_(True)


def prune(model: nn.Module, name: str | None = None, optimizer=None) -> dict:
    """Cut the masked triplets of every AdaLoRA adapter (or adapter ``name``) out for real and record
    the new ranks (``layer_rank`` per module) so ``rw.save``/``rw.load`` keep them. With ``optimizer``
    (one or a list) its state is cut the same way; the parameters stay the same objects, so
    training goes on. Returns {adapter: {module: rank}}."""
    opts = [] if optimizer is None else [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
    ranks: dict[str, dict[str, int]] = {}
    for aname, lname, ad in adapters_of(model, "adalora", name):
        r = ad.prune_(opts)
        ranks.setdefault(aname, {})[lname] = r
        if r != ad.config.rank or ad.config.layer_rank is not None:
            record_rank(model, aname, lname, ad, layer_rank=r)
    return ranks


def ranks(model: nn.Module, name: str | None = None) -> dict[str, int]:
    """The current (unmasked) rank of every module of AdaLoRA adapter ``name`` (default: all)."""
    return {lname: int(ad.rank_mask.sum()) for _, lname, ad in adapters_of(model, "adalora", name)}
