"""DyLoRA: dynamic search-free low-rank adaptation (Valipour et al., EACL 2023, arXiv:2210.07558).

LoRA factors ``A ∈ R^{r×in}``, ``B ∈ R^{out×r}`` trained so that *every* truncation works: each
training step samples ``b ~ U{r_min, …, r}`` and the layer uses only the first ``b`` rows of ``A`` and
columns of ``B`` (nested-dropout style ordering of the rank components)::

    ΔW_b = (α / b) · B[:, :b] A[:b, :]

With ``update="last"`` (the paper's Algorithm 1, "frozen" in its ablation) only the ``b``-th row/column
receives the gradient — the first ``b - 1`` are detached in that step; ``update="all"`` trains all of
the first ``b``. After training, any ``b ≤ r`` is usable without retraining: ``set_rank(model, b)``
(or ``eval_rank=b`` in the config) picks it for evaluation, and the layer then equals a LoRA of rank
``b`` holding the truncated factors with the same ``α`` (tested for every ``b``).

Sampling: ``b`` is drawn by :func:`rankwise.rank_step` for the next step from a generator seeded by
``(seed, step)`` — one ``b`` for all layers of the adapter per step, reproducible, independent of the
global RNG. Before the first ``rank_step`` the sample for step 0 is used. In eval mode (and in
``delta_weight``/``merge``) the layer uses ``eval_rank`` (default ``r``).

Rank changes and optimizer state: nothing is resized — the truncation is a slice in forward, so the
parameters keep their full ``r`` and the optimizer state stays as it is; rows beyond ``b`` get a zero
gradient that step (Adam's moments for them decay, as for any zero gradient).

Init as LoRA: ``A`` kaiming-uniform ``±1/√in``, ``B = 0`` (embeddings swap: ``A = 0``, ``B ~ N(0, 1)``).
Ambiguity: the paper samples from a uniform distribution over ``[r_min, r_max]``; its code also
allows other distributions — only the uniform one is provided here.

Parameters per layer: ``r (in + out)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.api import adapter_state
from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import kaiming_bound, low_rank_apply, normal_, uniform_
from ..core.registry import register
from ..errors import ConfigError
from ._rank_common import adapters_of


@dataclass
class DyLoraConfig(RankAlphaConfig):
    """rank: r (the largest rank trained); min_rank: the smallest b sampled; alpha: ΔW_b = (α/b)·B_b A_b
    (None: α = r); dropout; rslora: not supported; update: 'last' (only the b-th row/column is trained each step) or 'all';
    eval_rank: the rank used in eval mode and by merge (None: r); seed: for the sampled ranks."""

    min_rank: int = 1
    update: str = "last"
    eval_rank: int | None = None
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        self._check(not self.rslora, "rslora", "DyLoRA scales each truncation by α/b; rsLoRA is not supported.")
        self._check_int("min_rank")
        self._check(self.min_rank <= self.rank, "min_rank", f"min_rank must be in [1, rank={self.rank}].")
        self._check(self.update in ("last", "all"), "update", "use 'last' (the paper's frozen mode) or 'all'.")
        self._check(self.eval_rank is None or (isinstance(self.eval_rank, int) and 1 <= self.eval_rank <= self.rank),
                    "eval_rank", f"eval_rank must be an integer in [1, rank={self.rank}] (or None: the full rank).")
        self._check_int("seed", low=0)

    def sample(self, step: int) -> int:
        """The rank ``b`` trained at step ``step + 1``: uniform on [min_rank, rank], seeded by (seed, step)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return int(torch.randint(self.min_rank, self.rank + 1, (1,), generator=g, device="cpu"))


@register("dylora")
class DyLora(Method):
    """LoRA trained at a random truncation each step (see module docstring)."""

    Config = DyLoraConfig
    summary = "nested LoRA ranks: a random truncation b ≤ r each step, any b usable after training (Valipour et al. 2022)"
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: DyLoraConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, self.name)
        self.rank = r = config.rank
        self.lora_A = nn.Parameter(torch.zeros(r, view.in_features, **view.factory_kwargs))
        self.lora_B = nn.Parameter(torch.zeros(view.out_features, r, **view.factory_kwargs))
        if view.kind == "embedding":
            normal_(self.lora_B, 1.0, generator)
        else:
            uniform_(self.lora_A, kaiming_bound(view.in_features), generator)
        self.train_rank = config.sample(0)
        self.eval_rank = config.rank if config.eval_rank is None else config.eval_rank

    @classmethod
    def num_params(cls, view: LayerView, config: DyLoraConfig) -> int:
        return config.rank * (view.in_features + view.out_features)

    def active_rank(self) -> int:
        """``b`` in use: the sampled rank while training, ``eval_rank`` otherwise."""
        return self.train_rank if self.training else self.eval_rank

    def _factors(self, b: int):
        a, bb = self.lora_A[:b], self.lora_B[:, :b]
        if self.training and self.config.update == "last" and b > 1:
            a = torch.cat([a[:-1].detach(), a[-1:]], dim=0)
            bb = torch.cat([bb[:, :-1].detach(), bb[:, -1:]], dim=1)
        return a, bb

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        b = self.active_rank()
        a, bb = self._factors(b)
        return low_rank_apply(self.view, x, base_out, a, bb, self.config.lora_alpha / b,
                              self.config.dropout, self.training)

    def delta_weight(self) -> torch.Tensor:
        b = self.active_rank()
        return self.view.to_param((self.lora_B[:, :b] @ self.lora_A[:b]) * (self.config.lora_alpha / b))

    @classmethod
    def on_step(cls, model: nn.Module, name: str, step: int, optimizers, total_steps=None) -> dict:
        b = adapter_state(model)[name]["config"].sample(step)
        for _, _, ad in adapters_of(model, "dylora", name):
            ad.train_rank = b
        return {"train_rank": b}


def set_rank(model: nn.Module, rank: int | None, name: str | None = None) -> None:
    """Use rank ``rank`` (None: the full rank) in eval mode for every DyLoRA adapter (or adapter ``name``).
    A merged adapter must be unmerged first (its merged ΔW was formed at the old rank)."""
    found = adapters_of(model, "dylora", name)
    for aname, lname, ad in found:
        r = ad.rank if rank is None else rank
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= ad.rank:
            raise ConfigError(f"set_rank: rank={rank!r} for module '{lname}' of adapter '{aname}' must be an "
                              f"integer in [1, {ad.rank}].")
        layer = model.get_submodule(lname)
        if aname in layer.merged:
            raise ConfigError(f"set_rank: adapter '{aname}' is merged into module '{lname}'; rw.unmerge(model) "
                              "first, then set the rank and merge again.")
    for _, _, ad in found:
        ad.eval_rank = ad.rank if rank is None else rank


def truncated(model: nn.Module, rank: int, name: str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A[:b], B[:, :b])}`` — the factors of the rank-``b`` LoRA each layer equals."""
    return {lname: (ad.lora_A[:rank].detach().clone(), ad.lora_B[:, :rank].detach().clone())
            for _, lname, ad in adapters_of(model, "dylora", name)}
