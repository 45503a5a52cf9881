"""AfLoRA: adaptive freezing of low-rank adaptation (Liu et al., ACL 2024 Findings, arXiv:2403.13269).

A LoRA path whose down- and up-projections are each followed by a trainable feature-transformation
vector (as in ELoRA/VeRA, but with low-rank *trainable* projections)::

    ΔW = diag(u) B diag(d) A,     A ∈ R^{r×in},  B ∈ R^{out×r},  d ∈ R^{r},  u ∈ R^{out}

Init: ``A`` kaiming-uniform ``±1/√in``, ``B`` kaiming-uniform ``±1/√r``, ``d = 1``, ``u = 0`` (so the
adapted model starts as the base).

Freezing: the projection matrices ``A`` and ``B`` are frozen progressively while ``d`` and ``u`` train
to the end. Each projection matrix ``P`` has the freezing score

    I = |P ⊙ ∇P|,  Ī ← β₁ Ī + (1-β₁) I,  Ū ← β₂ Ū + (1-β₂) |I - Ī|,  score(P) = mean(Ī ⊙ Ū),

updated by :func:`rankwise.rank_step` after each optimizer step ``t``. The fraction of the adapter's
projection matrices that are frozen follows a cubic schedule, ``1 - (1 - (t - t_init)/(T - t_final -
t_init))³`` (0 up to ``t_init``, 1 from ``T - t_final``); when it rises, the still-trainable matrices
with the lowest score are frozen — a small score means the matrix barely moves the loss any more.
Once frozen, a matrix stays frozen; by ``T - t_final`` only the vectors train, as in ELoRA but at a
low rank.

Rank changes and optimizer state: freezing sets ``requires_grad = False``, drops ``.grad`` and
removes the matrix's entry from ``optimizer.state`` (freeing Adam's moments); the parameter stays in
its param group, and since it never gets a gradient again, optimizers skip it. Shapes never change.
The adapter's file is unaffected (every tensor is saved; ``rw.load`` makes all trainable again).

Ambiguities: the paper computes the freezing score as above (AdaLoRA's sensitivity with
uncertainty) and uses a cubic freezing schedule; whether a matrix is frozen by comparing its score
with a scheduled threshold or by ranking is not fully specified — here the schedule sets the
*fraction* frozen and the ranking picks which. The vector inits (``d = 1``, ``u = 0``) are chosen so
the update starts at zero. A checkpoint resumed with ``rankwise.train`` needs the same frozen set.

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
from ..core.registry import register
from ..errors import ConfigError
from ._rank_common import Sensitivity, adapters_of, cubic
from ._shared_common import float_kw, low_rank_forward, positive_int


@dataclass
class AfLoraConfig(AdapterConfig):
    """rank: r; dropout; tinit: steps before any freezing; tfinal: steps at the end with every
    projection frozen; total_step: T (None: the loop's, rank_step's total_steps); beta1 / beta2: EMA factors of the score."""

    rank: int = 4
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    total_step: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85

    def __post_init__(self):
        super().__post_init__()
        positive_int(self, "rank")
        self._check(0.0 <= self.dropout < 1.0, "dropout", "dropout must be in [0, 1).")
        positive_int(self, "tinit", allow_zero=True)
        positive_int(self, "tfinal", allow_zero=True)
        if self.total_step is not None:
            positive_int(self, "total_step")
            self._check(self.tinit < self.total_step - self.tfinal, "total_step",
                        f"tinit={self.tinit} + tfinal={self.tfinal} leave no freezing phase in total_step="
                        f"{self.total_step}; lower them or raise total_step.")
        for b in ("beta1", "beta2"):
            self._check(0.0 < getattr(self, b) < 1.0, b, f"{b} is an EMA factor in (0, 1), e.g. 0.85.")


@register("aflora")
class AfLora(Method):
    """LoRA with feature-transformation vectors whose projections freeze progressively (see module docstring)."""

    Config = AfLoraConfig
    kinds = ("linear", "hf_conv1d", "conv1d", "conv2d", "embedding")
    summary = "ΔW = diag(u) B diag(d) A; A, B frozen progressively by a smoothed sensitivity score (Liu et al. 2024)"
    identity_at_init = True
    merge_atol = 1e-5
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: AfLoraConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, "aflora")
        self.view, self.config, self.rank = view, config, config.rank
        kw = float_kw(view)
        r, n_in, n_out = config.rank, view.in_features, view.out_features
        self.lora_A = nn.Parameter(torch.zeros(r, n_in, **kw))
        self.lora_B = nn.Parameter(torch.zeros(n_out, r, **kw))
        self.vec_d = nn.Parameter(torch.ones(r, **kw))
        self.vec_u = nn.Parameter(torch.zeros(n_out, **kw))
        with torch.no_grad():
            self.lora_A.uniform_(-1 / math.sqrt(n_in), 1 / math.sqrt(n_in), generator=generator)
            self.lora_B.uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r), generator=generator)
        self._sens = {k: Sensitivity(config.beta1, config.beta2) for k in ("A", "B")}

    @classmethod
    def num_params(cls, view: LayerView, config: AfLoraConfig) -> int:
        return config.rank * (view.in_features + view.out_features + 1) + view.out_features

    def _factors(self):
        return self.lora_A * self.vec_d.view(-1, 1), self.lora_B * self.vec_u.view(-1, 1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self._factors()
        return low_rank_forward(self.view, x, base_out, a, b, 1.0, self.config.dropout, self.training)

    def delta_weight(self) -> torch.Tensor:
        a, b = self._factors()
        return self.view.to_param(b @ a)

    def projections(self):
        return (("A", self.lora_A), ("B", self.lora_B))

    def freezing_score(self, key: str) -> float:
        p = dict(self.projections())[key]
        return float(self._sens[key].score(p).mean())

    @classmethod
    def on_step(cls, model: nn.Module, name: str, step: int, optimizers, total_steps=None) -> dict | None:
        cfg = adapter_state(model)[name]["config"]
        total = cfg.total_step if cfg.total_step is not None else total_steps
        if total is None or cfg.tinit >= total - cfg.tfinal:
            raise ConfigError(f"adapter '{name}' (aflora): total_step={total} with tinit={cfg.tinit}, tfinal="
                              f"{cfg.tfinal}; the freezing schedule needs the number of training steps, with room "
                              "for a freezing phase: rw.adapt(model, 'aflora', total_step=..., ...) or "
                              "rw.rank_step(..., total_steps=...).")
        found = adapters_of(model, "aflora", name)
        live = [(lname, ad, key, p) for _, lname, ad in found for key, p in ad.projections() if p.requires_grad]
        if not live:
            return None
        for _, ad, key, p in live:
            ad._sens[key].update(p)
        n_all = 2 * len(found)
        want = n_all - math.floor(n_all * cubic(step, cfg.tinit, cfg.tfinal, total) + 1e-9)
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
            ad._sens[key] = Sensitivity(cfg.beta1, cfg.beta2)
            frozen.append(f"{lname}.lora_{key}")
        return {"frozen": frozen, "frozen_total": want}


def frozen(model: nn.Module, name: str | None = None) -> list[str]:
    """``"<module>.lora_A"`` / ``"<module>.lora_B"`` for every frozen projection of AfLoRA adapters."""
    return [f"{lname}.lora_{key}" for _, lname, ad in adapters_of(model, "aflora", name)
            for key, p in ad.projections() if not p.requires_grad]
