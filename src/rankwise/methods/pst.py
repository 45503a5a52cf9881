"""PST: parameter-efficient sparsity training — a LoRA weight update, and a sparse mask chosen by an
importance score that is data-free magnitude plus a low-rank and structured (row + column) learned part.

Paper: Li, Luo, Tan, Wang, Huang, Li & Bai, "Parameter-Efficient Sparsity for Large Language Models
Fine-Tuning" (IJCAI 2022, arXiv:2205.11005; the brief calls it "PST: Parameter-efficient Sparsity
Training", Li et al.). Read: the abstract, the introduction and a review of the method (its Figure 1: "the
update of weight is replaced by two small matrices (U and V), and the data-driven importance score is
decomposed into two sets of small matrices (A, B and R, C) based on its low-rankness and structuredness").
The equations below are rankwise's transcription of that description; the paper's exact normalization of
the two score parts could not be checked. No public code was found.

Weight (``out × in``), all in the canonical layout::

    W   = W0 + s · B A                        A ∈ R^{r×in}, B ∈ R^{out×r}  (the weight update, LoRA)
    S   = |W| + A_s B_s + R 1ᵀ + 1 Cᵀ          A_s ∈ R^{out×r_s}, B_s ∈ R^{r_s×in}, R ∈ R^{out}, C ∈ R^{in}
    M   = Top_k(S)                             1 on the k largest entries of S, 0 elsewhere
    W'  = M ⊙ W                                (the sparse fine-tuned weight)
    ΔW  = W' − W0 = M ⊙ (s B A) + (M − 1) ⊙ W0

``|W|`` is the data-free criterion (magnitude, detached: a criterion, not a trained path); ``A_s B_s + R +
C`` the data-driven one, trained by the straight-through estimator of movement pruning (Sanh et al.
2020): ``∂L/∂S = ∂L/∂M = ∂L/∂W' ⊙ W``, so ``∂L/∂A_s = (∂L/∂W' ⊙ W) B_sᵀ``, ``∂L/∂R = (∂L/∂W' ⊙ W) 1``, ….

Sparsity schedule (cubic, Zhu & Gupta 2017, as movement pruning and PST): with final sparsity ``s_f``,
``k = D − round(s_t D)`` kept entries and::

    s_t = 0                                  t ≤ t_w
    s_t = s_f (1 − (1 − (t − t_w)/(T − t_w))³)  t_w < t < T
    s_t = s_f                                t ≥ T

advanced by ``rw.rank_step`` (``on_step``: ``T`` = ``total_steps`` or the loop's length; without either the
final sparsity applies from the first step). ``finish_warmup`` jumps to ``s_f``. ``t`` and the loop's ``T`` are an int64
buffer (``pst_schedule``), saved with the adapter.

``score_rank`` is clamped to ``min(out, in)``. Init: ``A`` Kaiming-uniform, ``B = 0`` (LoRA); ``A_s`` Kaiming-uniform, ``B_s = 0``, ``R = C = 0``; ``s_0 =
0``, so ``M = 1`` and the adapted model is the base (``identity_at_init``). Parameters per layer:
``(r + r_s)(in + out) + in + out``. The masked weight is dense anyway: one product with ``W0 + ΔW``
(``computes_base``); ``reads_base`` (ΔW reads ``W0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import kaiming_bound, uniform_
from ..core.registry import register
from ..errors import ConfigError
from ._mask_common import StraightThrough, adapters_named, dense_forward


@dataclass
class PstConfig(AdapterConfig):
    """rank: r of the weight update B A; alpha: its scale s = α/r (None: α = r); score_rank: r_s of the
    low-rank importance A_s B_s; sparsity: final share s_f of pruned weights, in [0, 1); total_steps: T of
    the cubic schedule (None: the training loop's length); warmup_steps: t_w, steps at sparsity 0."""

    rank: int = 8
    alpha: float | None = None
    score_rank: int = 8
    sparsity: float = 0.5
    total_steps: int | None = None
    warmup_steps: int = 0

    def __post_init__(self):
        super().__post_init__()
        self._check_int("rank")
        self._check_int("score_rank")
        self._check_int("warmup_steps", low=0)
        self._check(self.alpha is None or (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
                                           and 0 < self.alpha < 1e30), "alpha", "use a positive number or None.")
        self._check(isinstance(self.sparsity, (int, float)) and not isinstance(self.sparsity, bool)
                    and 0 <= self.sparsity < 1, "sparsity", "use the final share of pruned weights, in [0, 1).")
        self._check(self.total_steps is None or (isinstance(self.total_steps, int)
                                                 and not isinstance(self.total_steps, bool)
                                                 and self.total_steps > self.warmup_steps),
                    "total_steps", f"use None (the loop's length) or an integer > warmup_steps={self.warmup_steps}.")

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else float(self.alpha)) / self.rank


def cubic_sparsity(step: int, final: float, total: int | None, warmup: int = 0) -> float:
    """``s_t`` of the cubic schedule (module docstring)."""
    if total is None:
        return final if step > 0 else 0.0
    if step <= warmup:
        return 0.0
    if step >= total:
        return final
    return final * (1.0 - (1.0 - (step - warmup) / (total - warmup)) ** 3)


def score_rank(view: LayerView, config: PstConfig) -> int:
    """``r_s`` clamped to ``min(out, in)`` (a larger one adds parameters, not rank)."""
    return min(config.score_rank, view.out_features, view.in_features)


def _smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(flat, k, largest=False, sorted=False).indices


def _smallest_sorted(flat: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(flat, k, largest=False, sorted=True).indices


@register("pst")
class Pst(Method):
    """``W' = Top_k(|W| + A_s B_s + R + C) ⊙ (W0 + s B A)`` (see module docstring)."""

    Config = PstConfig
    summary = "W' = Top_k(|W| + A_sB_s + R + C) ⊙ (W0 + s·BA): LoRA + learned low-rank/structured sparsity mask (PST)"
    computes_base = True
    reads_base = True
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: PstConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, self.name)
        if not view.weight.is_floating_point():
            raise ConfigError(f"pst: module '{view.name}' has a {view.weight.dtype} weight (quantized?); PST "
                              "prunes the weight itself, so adapt a floating-point model.")
        kw, n_out, n_in = view.factory_kwargs, view.out_features, view.in_features
        self.scale = config.scale
        self.lora_A = nn.Parameter(uniform_(torch.empty(config.rank, n_in, **kw), kaiming_bound(n_in), generator))
        self.lora_B = nn.Parameter(torch.zeros(n_out, config.rank, **kw))
        rs = score_rank(view, config)
        self.score_A = nn.Parameter(uniform_(torch.empty(n_out, rs, **kw), kaiming_bound(rs), generator))
        self.score_B = nn.Parameter(torch.zeros(rs, n_in, **kw))
        self.score_R = nn.Parameter(torch.zeros(n_out, **kw))
        self.score_C = nn.Parameter(torch.zeros(n_in, **kw))
        # [t, T] of the schedule (T = 0: unknown); int64, so it keeps its dtype in a bf16 model
        self.register_buffer("pst_schedule", torch.zeros(2, dtype=torch.int64, device=view.weight.device))

    @classmethod
    def num_params(cls, view: LayerView, config: PstConfig) -> int:
        n_out, n_in = view.out_features, view.in_features
        return (config.rank + score_rank(view, config)) * (n_in + n_out) + n_in + n_out

    def finish_warmup(self) -> None:
        """Jump to the end of the schedule (sparsity ``s_f``)."""
        self.pst_schedule.fill_(0)
        self.pst_schedule[0] = max(self.config.total_steps or 1, 1)

    def sparsity_tensor(self) -> torch.Tensor:
        """``s_t`` as a float64 scalar tensor on the buffer's device, read from ``pst_schedule`` by tensor
        operations only (no host sync, traceable by ``torch.compile``): :func:`cubic_sparsity`, term by term."""
        c = self.config
        sched = self.pst_schedule.to(torch.float64)
        step, loop_total = sched[0], sched[1]
        final, warm = float(c.sparsity), float(c.warmup_steps)
        total = loop_total if c.total_steps is None else torch.full_like(step, float(c.total_steps))
        u = 1.0 - (step - warm) / (total - warm)  # inf/nan only where a branch below is not taken
        s = torch.where(step <= warm, 0.0, torch.where(step >= total, final, final * (1.0 - u * u * u)))
        if c.total_steps is None:  # loop length unknown (0): s_f from the first step
            s = torch.where(loop_total == 0, torch.where(step > 0, final, 0.0), s)
        return s

    @property
    def sparsity(self) -> float:
        """``s_t`` now."""
        return float(self.sparsity_tensor())

    # ---- the two views ----------------------------------------------------------------------------
    def scores(self, weight: torch.Tensor) -> torch.Tensor:
        """``S = |W| (detached) + A_s B_s + R 1ᵀ + 1 Cᵀ`` for the fine-tuned weight ``W`` (canonical)."""
        return (weight.detach().abs() + self.score_A @ self.score_B
                + self.score_R[:, None] + self.score_C[None, :])

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """``Top_k(S)`` with the straight-through gradient to ``S``: the ``p = D − k = min(round(s_t D), D − 1)``
        smallest scores are pruned. Eagerly one ``topk(p, largest=False)``. Under ``torch.compile``, where
        ``p`` is a tensor, the shapes stay static: ``p ≤ p_max = min(round(s_f D), D − 1)``, so the ``p_max``
        smallest are found and the first ``p`` of them pruned — unsorted ``topk`` once ``p = p_max`` (the
        schedule's end, the same call as eager), sorted (about 4× slower) while the schedule ramps, where
        equal scores at the threshold may be broken differently than eagerly."""
        numel = scores.numel()
        with torch.no_grad():
            flat = scores.detach().flatten()
            pruned = torch.round(self.sparsity_tensor() * numel).clamp(max=numel - 1).to(torch.int64)
            hard = torch.ones(numel, dtype=torch.bool, device=scores.device)
            if not torch.compiler.is_compiling():
                p = int(pruned)
                if p > 0:
                    hard[torch.topk(flat, p, largest=False, sorted=False).indices] = False
            else:
                p_max = min(round(self.config.sparsity * numel), numel - 1)
                if p_max > 0:
                    hard = hard.scatter(0, torch.cond(pruned == p_max, _smallest, _smallest_sorted, (flat, p_max)),
                                        torch.arange(p_max, device=flat.device) >= pruned)
        return StraightThrough.apply(scores, hard.reshape(scores.shape), None)

    def delta2d(self) -> torch.Tensor:
        """``ΔW = M ⊙ (s B A) + (M − 1) ⊙ W0`` (canonical)."""
        w0 = self.view.weight2d().detach()
        update = (self.lora_B @ self.lora_A) * self.scale
        m = self.mask(self.scores(w0 + update.to(w0.dtype)))
        return m * update + (m - 1) * w0.to(update.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param(self.delta2d()).to(self.view.param_dtype)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        return dense_forward(self.view, x, base_out, self.delta2d())

    # ---- the sparsity schedule --------------------------------------------------------------------
    @classmethod
    def on_step(cls, model, name, step, optimizers, total_steps):
        layers = adapters_named(model, name, cls)
        if not layers:
            return None
        for ad in layers:
            ad.pst_schedule[0] = step
            ad.pst_schedule[1] = total_steps or 0
        return {"pst_sparsity": layers[0].sparsity}
