"""SoRA: Sparse low-Rank Adaptation (Ding et al., EMNLP 2023, arXiv:2311.11696).

LoRA with a gate vector ``g ∈ R^r`` between the two factors::

    ΔW = s · B diag(g) A,      A ∈ R^{r×in},  B ∈ R^{out×r},  s = α / r₀   (rsLoRA: α / √r₀)

The gate is driven sparse by a proximal gradient step on ``λ‖g‖₁``: after the optimizer's
ordinary step, :func:`proximal_step` soft-thresholds it,

    g ← sign(g) · max(|g| − η λ, 0)          (η: the current learning rate)

so ranks whose gate reaches exactly zero stop contributing; raising ``λ`` during training (the
paper's sparsifying scheduler) is up to the caller. :func:`prune` then removes those ranks for
real — the rows of ``A``, columns of ``B`` and entries of ``g`` — which leaves ``ΔW`` unchanged
(up to float summation order) and shrinks the adapter. The pruned ranks are written into the
adapter's config as ``rank_pattern`` (module name → rank), which ``rw.save`` records, so
``rw.load`` rebuilds the pruned shapes. ``s`` keeps the initial rank ``r₀`` (``config.rank``),
so pruning never rescales the update.

``rankwise.train`` (or any loop calling ``rw.rank_step(model, step, optimizer, total_steps)``)
does this through the ``on_step`` hook: after each optimizer step the gates are soft-thresholded by
``lam · lr`` (``lr`` of the gates' param group), and at the last step the zero gates are pruned
(``prune_at_end``). A hand-written loop with the paper's proximal gradient descent on the gates (a
plain gradient step, then the threshold; ``A`` and ``B`` train with any optimizer)::

    gate_opt = torch.optim.SGD(sora.gate_parameters(model), lr=lr_g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad
                             and all(p is not g for g in sora.gate_parameters(model))], lr=lr)
    ...
    opt.step(); gate_opt.step(); sora.proximal_step(model, lr=lr_g, lam=λ)
    ...
    sora.prune(model, optimizer=opt)   # any time; the optimizer's state is cut to match

The authors' code (github.com/TsinghuaC3I/SoRA) differs from the paper, and rankwise states where
it follows which:

* ``run_glue.py`` steps the gates with its own AdamW (``src/sparse_optimizer.py``
  ``SparseAdamW``) and then thresholds by a *constant* ``ξ`` (``sparse_lambda_2``), not by
  ``η λ``; the ``λ · lr`` variant is ``src/sparse_optimizer_multiply_lr.py``, which the script
  does not use. ``on_step`` thresholds by ``lam · lr`` (the paper's ``η λ``); with a constant
  learning rate this is the official step with ``ξ = lam · lr`` (with a decaying schedule the
  official threshold stays ``ξ`` while ours shrinks with ``lr``). Under AdamW (≈ ``lr`` per step)
  a threshold above ``lr`` zeroes every gate, so ``lam < 1`` there.
* Its threshold is three in-place masks, ``g[g > ξ] -= ξ; g[g < -ξ] += ξ; g[|g| < ξ] = 0``; the
  last one sees the already-shrunk values, so gates with ``ξ < |g| < 2ξ`` are zeroed too (a hard
  threshold at ``2ξ`` after the shrink). rankwise applies the soft-threshold ``T_ξ`` of the
  paper's proximal step; the two agree except on ``ξ < |g| < 2ξ``.
* Its trainer also adds ``sparse_lambda · mean |g|`` to the loss (``src/trainer.py``); rankwise
  adds no loss term (the proximal step is the paper's treatment of the L1 penalty) — add
  ``λ₁ · torch.cat(sora.gate_parameters(model)).abs().mean()`` to the loss to reproduce it.

Init: as the authors' ``src/lora.py``: ``A`` kaiming-uniform ``±1/√in``, ``B = 0`` and the gate
``g ~ N(0, 1)`` (their ``torch.randn(1, r)``), from the caller's generator; embeddings swap the
factors (``A = 0``, ``B ~ N(0, 1)``) so both get gradients. ``ΔW = 0``: the adapted model equals
the base.

Activation view: ``base_out + s · (B ⊙ g) (A x)`` — the gate folds into ``B`` (``out × r``), so
the cost is LoRA's (``core.ops.low_rank_apply``).

Parameters per layer: ``r (in + out + 1)`` with the layer's current rank ``r``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
class SoraConfig(RankAlphaConfig):
    """rank: r₀, the initial rank; alpha: s = α/r₀ (None: α = r₀); dropout: on the adapter's input;
    lam: λ of the L1 penalty the ``on_step`` hook applies (threshold λ·lr per step; 0: off);
    prune_at_end: prune the zero gates at the last step of a loop that knows its length;
    rank_pattern: module name → rank after pruning (written by :func:`prune`)."""

    lam: float = 0.1
    prune_at_end: bool = True
    rank_pattern: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        self._check(isinstance(self.lam, (int, float)) and not isinstance(self.lam, bool) and self.lam >= 0, "lam",
                    "lam (λ of the gate's L1 penalty) must be a number ≥ 0; 0 turns the proximal step off.")
        self._check(isinstance(self.rank_pattern, dict) and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= self.rank
            for k, v in self.rank_pattern.items()), "rank_pattern",
            f"give a dict of module name → pruned rank in [0, rank={self.rank}] (prune() writes it).")
        self.rank_pattern = dict(self.rank_pattern)

    def rank_of(self, module_name: str) -> int:
        return self.rank_pattern.get(module_name, self.rank)


@register("sora")
class Sora(Method):
    """LoRA with a sparse gate on the rank dimension (see module docstring)."""

    Config = SoraConfig
    summary = "ΔW = s·B diag(g) A, proximal L1 on the gate g prunes ranks while training (Ding et al. 2023)"
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: SoraConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, "sora")
        r = config.rank_of(view.name)
        self.rank, self.scale = r, config.scale
        kw = view.factory_kwargs
        self.sora_A = nn.Parameter(torch.zeros(r, view.in_features, **kw))
        self.sora_B = nn.Parameter(torch.zeros(view.out_features, r, **kw))
        if view.kind == "embedding":
            normal_(self.sora_B, 1.0, generator)
        else:
            uniform_(self.sora_A, kaiming_bound(view.in_features), generator)
        self.sora_gate = nn.Parameter(normal_(torch.empty(r, **kw), 1.0, generator))

    @classmethod
    def num_params(cls, view: LayerView, config: SoraConfig) -> int:
        return config.rank_of(view.name) * (view.in_features + view.out_features + 1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:
            return base_out
        return low_rank_apply(self.view, x, base_out, self.sora_A, self.sora_B * self.sora_gate, self.scale,
                                self.config.dropout, self.training)

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param(((self.sora_B * self.sora_gate) @ self.sora_A) * self.scale)

    # ---- sparsity -----------------------------------------------------------------------------
    @classmethod
    def on_step(cls, model: nn.Module, name: str, step: int, optimizers, total_steps=None) -> dict | None:
        """``rw.rank_step`` hook (``rankwise.train`` calls it after each optimizer step): the
        proximal step with threshold ``λ · lr`` (``lr``: the learning rate of the param group that
        holds the gates, read from ``optimizers``; no optimizer holding them, no step), then, at
        ``step == total_steps`` with ``prune_at_end``, :func:`prune` with the optimizers' state."""
        found = _sora_adapters(model, name)
        if not found:
            return None
        cfg = found[0][2].config
        lr = _gate_lr(optimizers, found[0][2].sora_gate)
        info = {}
        if cfg.lam and lr is not None:
            info["nonzero gates"] = sum(ad.proximal_(lr * cfg.lam) for _, _, ad in found)
        if cfg.prune_at_end and total_steps is not None and step == total_steps:
            info["ranks"] = prune(model, name, optimizer=list(optimizers))[name]
        return info or None

    @torch.no_grad()
    def proximal_(self, threshold: float) -> int:
        """Soft-threshold the gate in place; return how many gates are non-zero."""
        g = self.sora_gate
        g.copy_(torch.sign(g) * (g.abs() - threshold).clamp_(min=0))
        return int(torch.count_nonzero(g))

    @torch.no_grad()
    def prune_(self, optimizers=()) -> int:
        """Drop the ranks whose gate is exactly zero (and the matching optimizer state); return the new rank."""
        keep = torch.nonzero(self.sora_gate).flatten()
        if keep.numel() == self.rank:
            return self.rank
        for p, dim in ((self.sora_A, 0), (self.sora_B, 1), (self.sora_gate, 0)):
            old = p.shape
            p.data = p.data.index_select(dim, keep).contiguous()
            p.grad = None
            for opt in optimizers:
                state = opt.state.get(p) or {}
                for k, v in state.items():
                    if torch.is_tensor(v) and v.shape == old:
                        state[k] = v.index_select(dim, keep.to(v.device)).contiguous()
        self.rank = keep.numel()
        return self.rank


def _sora_adapters(model: nn.Module, name: str | None):
    """(adapter name, module name, Sora) for every SoRA adapter (or adapter ``name``) of ``model``."""
    return adapters_of(model, "sora", name)


def _gate_lr(optimizers, gate: torch.Tensor) -> float | None:
    for opt in optimizers:
        for group in opt.param_groups:
            if any(p is gate for p in group["params"]):
                return float(group["lr"])
    return None


def gate_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The gate vectors of every SoRA adapter (or adapter ``name``), e.g. for their own param group."""
    return [ad.sora_gate for _, _, ad in _sora_adapters(model, name)]


def proximal_step(model: nn.Module, lr: float, lam: float, name: str | None = None) -> int:
    """The proximal step on ``λ‖g‖₁``: soft-threshold every gate by ``lr · lam``. Call it after
    ``optimizer.step()`` with the learning rate that step used. Returns the non-zero gate count."""
    if not (lr >= 0 and lam >= 0):
        raise ConfigError(f"proximal_step: lr={lr} and lam={lam} must be ≥ 0.")
    return sum(ad.proximal_(lr * lam) for _, _, ad in _sora_adapters(model, name))


def prune(model: nn.Module, name: str | None = None, optimizer=None) -> dict:
    """Remove the zero-gate ranks of every SoRA adapter (or adapter ``name``) and record the new
    ranks in its config (``rank_pattern``), so ``rw.save``/``rw.load`` keep them. With
    ``optimizer`` (one or a list), its per-parameter state (Adam's moments) is cut the same way and
    the parameters stay the same objects, so training goes on. Returns {adapter: {module: rank}}."""
    found = _sora_adapters(model, name)
    state = adapter_state(model)
    opts = [] if optimizer is None else [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
    ranks: dict[str, dict[str, int]] = {}
    for aname, lname, ad in found:
        ranks.setdefault(aname, {})[lname] = ad.prune_(opts)
    for aname, per_module in ranks.items():
        cfg = state[aname]["config"]
        pattern = dict(cfg.rank_pattern)
        pattern.update({m: r for m, r in per_module.items() if r != cfg.rank or m in pattern})
        new = cfg.replace(rank_pattern=pattern)
        state[aname]["config"] = new
        for n, _, ad in found:
            if n == aname:
                ad.config = new
    return ranks
