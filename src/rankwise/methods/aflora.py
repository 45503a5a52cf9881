"""AfLoRA: adaptive freezing of low-rank adaptation (Liu et al., ACL 2024 Findings, arXiv:2403.13269).

A LoRA path whose down- and up-projections are each followed by a trainable feature-transformation
vector (as in ELoRA/VeRA, but with low-rank *trainable* projections)::

    ΔW = diag(u) B diag(d) A,     A ∈ R^{r×in},  B ∈ R^{out×r},  d ∈ R^{r},  u ∈ R^{out}

Init as the reference's GLUE scripts (``--init_type 1 --d_init_type 94``, ``lora_layer.py``):
``A`` and ``B`` ``kaiming_uniform_`` with ``a = 0``, i.e. ``U(±√(6/fan_in))`` with fan-in ``in`` for ``A``
and ``r`` for ``B``; ``d = 0.1``, ``u = 0`` (so the adapted model starts as the base). No scale factor.

Freezing (reference ``glue/utils.py``, ``Pruner`` with PLATON scores): the projection matrices
``A`` and ``B`` are frozen progressively while ``d`` and ``u`` train to the end. With ``s = t - 1``
(the reference counts optimizer steps from 0) every entry of a trainable projection ``P`` gets

    I_s = |sign(P) ⊙ ∇P|   (= |∇P|: the gradient alone, not |P ⊙ ∇P|),

averaged over windows of ``delta_t`` steps; when a window closes (``s % delta_t = 0``) its mean ``Ĩ``
is folded into ``Ī ← β₁ Ī + (1-β₁) Ĩ``, ``Ū ← β₂ Ū + (1-β₂) |Ĩ - Ī|``, and the matrix scores
``mean(Ī ⊙ Ū)``. :func:`rankwise.rank_step` updates the scores after each optimizer step ``t``.

Schedule: the fraction of the adapter's projection matrices that are frozen follows the cubic
``1 - (1 - (t - t_init)/(T - t_final - t_init))³`` (0 up to ``t_init``, 1 from ``T - t_final``); at the
window boundaries of that phase, when the fraction has risen, the still-trainable matrices with the
lowest score are frozen. Defaults follow the reference's GLUE runs (``initial_warmup`` 1 epoch,
``final_warmup`` 14 of 20 / 7 of 10 epochs, ``deltaT = 10``, ``β₁ = 0.85``, ``β₂ = 0.95``), translated
to steps from the run's length ``T``: ``t_init = max(delta_t, T // 20)`` (one epoch of 20, and at
least one full averaging window, so nothing is ever frozen on the all-zero scores of the first steps
— at step 1 ``u = 0`` makes ``∇A = ∇B = 0``) and ``t_final = 7T // 10``.

Deviation: the reference freezes, at each boundary, every matrix whose mean score is below the
``(1 - threshold)``-quantile of the *entry* scores of the still-trainable matrices (a quantile re-taken
over a shrinking set, so the frozen fraction is not the schedule's); rankwise makes the schedule the
frozen fraction itself and picks the matrices by their score. Not reproduced either: the reference
keeps ``A, B`` frozen from the start on square layers (an ``in == out`` special case of its ELoRA mode).

Rank changes and optimizer state: freezing sets ``requires_grad = False``, drops ``.grad`` and
removes the matrix's entry from ``optimizer.state`` (freeing Adam's moments); the parameter stays in
its param group, and since it never gets a gradient again, optimizers skip it. Shapes never change.
The adapter's file is unaffected (every tensor is saved; ``rw.load`` makes all trainable again).
A checkpoint resumed with ``rankwise.train`` needs the same frozen set.

Parameters per layer (at init, all trainable): ``r (in + out) + r + out``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.api import adapter_state
from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import low_rank_apply, uniform_
from ..core.registry import register
from ..errors import ConfigError
from ._rank_common import adapters_of, cubic


@dataclass
class AfLoraConfig(AdapterConfig):
    """rank: r; dropout; delta_t: steps per score-averaging window (freezing happens at window ends);
    tinit: steps before any freezing (None: max(delta_t, T // 20)); tfinal: steps at the end with every
    projection frozen (None: 7T // 10); total_step: T (None: the loop's, rank_step's total_steps);
    beta1 / beta2: EMA factors of the score."""

    rank: int = 4
    dropout: float = 0.0
    delta_t: int = 10
    tinit: int | None = None
    tfinal: int | None = None
    total_step: int | None = None
    beta1: float = 0.85
    beta2: float = 0.95

    def __post_init__(self):
        super().__post_init__()
        self._check_int("rank")
        self._check_int("delta_t")
        self._check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0, "dropout",
                    "dropout must be in [0, 1).")
        for f in ("tinit", "tfinal"):
            if getattr(self, f) is not None:
                self._check_int(f, low=0)
        if self.total_step is not None:
            self._check_int("total_step")
            self.schedule(self.total_step)
        for b in ("beta1", "beta2"):
            self._check(0.0 < getattr(self, b) < 1.0, b, f"{b} is an EMA factor in (0, 1), e.g. 0.85.")

    def schedule(self, total: int) -> tuple[int, int]:
        """``(t_init, t_final)`` for a run of ``total`` steps (see the module docstring)."""
        tinit = max(self.delta_t, total // 20) if self.tinit is None else self.tinit
        tfinal = 7 * total // 10 if self.tfinal is None else self.tfinal
        if tinit >= total - tfinal:
            raise ConfigError(f"{type(self).__name__}: tinit={tinit} and tfinal={tfinal} (None: the defaults "
                              f"max(delta_t, T//20) and 7T//10) leave no freezing phase in T={total} steps; set "
                              "tinit / tfinal / delta_t for a short run, or raise total_step.")
        return tinit, tfinal


class WindowScore:
    """The reference's PLATON score of one projection: ``|sign(P) ⊙ ∇P|`` averaged over windows of
    ``delta_t`` steps, each closed window folded into the EMAs ``Ī``, ``Ū``."""

    def __init__(self, cfg: AfLoraConfig):
        self.cfg = cfg
        self.window = self.ipt = self.unc = None

    @torch.no_grad()
    def update(self, p: torch.Tensor, s: int) -> None:
        if p.grad is None:
            return
        cur = (torch.sign(p) * p.grad).abs().float()
        if self.window is None:
            self.window, self.ipt, self.unc = (torch.zeros_like(cur) for _ in range(3))
        local, b1, b2 = s % self.cfg.delta_t, self.cfg.beta1, self.cfg.beta2
        if local == 0:
            self.ipt = b1 * self.ipt + (1 - b1) * self.window
            self.unc = b2 * self.unc + (1 - b2) * (self.window - self.ipt).abs()
            self.window = cur
        else:
            self.window = (self.window * local + cur) / (local + 1)

    def score(self) -> float:
        return 0.0 if self.ipt is None else float((self.ipt * self.unc).mean())


@register("aflora")
class AfLora(Method):
    """LoRA with feature-transformation vectors whose projections freeze progressively (see module docstring)."""

    Config = AfLoraConfig
    summary = "ΔW = diag(u) B diag(d) A; A, B frozen progressively by a smoothed |gradient| score (Liu et al. 2024)"
    default_lr = 3e-2  # demo task, 1 seed: 3e-3 loss 1.68, 1e-2 0.574, 3e-2 0.426 (the reference init, d = 0.1, starts small)

    def __init__(self, view: LayerView, config: AfLoraConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, self.name)
        self.rank = r = config.rank
        kw = view.factory_kwargs
        self.lora_A = nn.Parameter(uniform_(torch.empty(r, view.in_features, **kw), math.sqrt(6 / view.in_features),
                                            generator))
        self.lora_B = nn.Parameter(uniform_(torch.empty(view.out_features, r, **kw), math.sqrt(6 / r), generator))
        self.vec_d = nn.Parameter(torch.full((r,), 0.1, **kw))
        self.vec_u = nn.Parameter(torch.zeros(view.out_features, **kw))
        self._scores = {k: WindowScore(config) for k in ("A", "B")}

    @classmethod
    def num_params(cls, view: LayerView, config: AfLoraConfig) -> int:
        return config.rank * (view.in_features + view.out_features + 1) + view.out_features

    def _factors(self):
        return self.lora_A * self.vec_d.view(-1, 1), self.lora_B * self.vec_u.view(-1, 1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self._factors()
        return low_rank_apply(self.view, x, base_out, a, b, 1.0, self.config.dropout, self.training)

    def delta_weight(self) -> torch.Tensor:
        a, b = self._factors()
        return self.view.to_param(b @ a)

    def projections(self):
        return (("A", self.lora_A), ("B", self.lora_B))

    def freezing_score(self, key: str) -> float:
        return self._scores[key].score()

    @classmethod
    def on_step(cls, model: nn.Module, name: str, step: int, optimizers, total_steps=None) -> dict | None:
        cfg = adapter_state(model)[name]["config"]
        total = cfg.total_step if cfg.total_step is not None else total_steps
        if total is None:
            raise ConfigError(f"adapter '{name}' (aflora): the freezing schedule needs the number of training "
                              "steps: rw.adapt(model, 'aflora', total_step=..., ...) or rw.rank_step(..., "
                              "total_steps=...).")
        tinit, tfinal = cfg.schedule(total)
        found = adapters_of(model, "aflora", name)
        live = [(lname, ad, key, p) for _, lname, ad in found for key, p in ad.projections() if p.requires_grad]
        if not live:
            return None
        s = step - 1  # the reference's 0-based step
        for _, ad, key, p in live:
            ad._scores[key].update(p, s)
        if s % cfg.delta_t != 0 and step < total - tfinal:
            return None  # the reference decides at window ends only (and every step of the final phase)
        n_all = 2 * len(found)
        want = n_all - math.floor(n_all * cubic(step, tinit, tfinal, total) + 1e-9)
        todo = want - (n_all - len(live))
        if todo <= 0:
            return None
        order = sorted(range(len(live)), key=lambda i: (live[i][1].freezing_score(live[i][2]), i))
        frozen = []
        for i in order[:todo]:
            lname, ad, key, p = live[i]
            p.requires_grad_(False)
            p.grad = None
            for opt in optimizers:
                opt.state.pop(p, None)
            ad._scores[key] = WindowScore(cfg)
            frozen.append(f"{lname}.lora_{key}")
        return {"frozen": frozen, "frozen_total": want}


def frozen(model: nn.Module, name: str | None = None) -> list[str]:
    """``"<module>.lora_A"`` / ``"<module>.lora_B"`` for every frozen projection of AfLoRA adapters."""
    return [f"{lname}.lora_{key}" for _, lname, ad in adapters_of(model, "aflora", name)
            for key, p in ad.projections() if not p.requires_grad]
