"""LaMDA: spectrally decomposed low-dimensional adaptation (Azizi, Kundu, Pedram, EMNLP Findings
2024, arXiv:2406.12832).

A LoRA path with a trainable ``r × r`` *low-dimensional adapter* ``S`` between two projections::

    ΔW = s · B S A,     A ∈ R^{r×in} (PMA, frozen),  S ∈ R^{r×r} (trainable),  B ∈ R^{out×r} (PMB)

``A`` is frozen from the start; ``B`` trains at first and is frozen gradually, one rank
component (column) at a time, during the first ``freeze_steps`` optimizer steps, after which only
``S`` trains — ``r²`` parameters per layer, independent of the layer's width. The projections
start from the spectrum of ``W0 = U Σ Vᵀ``: ``A = V_rᵀ``, ``B = U_r`` (top-``r`` singular vectors),
and ``S = 0``, so the adapted model equals the base exactly at init.

Freezing schedule (``rw.rank_step`` / ``rankwise.train`` drive it through the ``on_step`` hook;
in a hand-written loop call :func:`freeze_step` after each ``optimizer.step()``, or once with any
step count): component ``j`` (0-based, in the order ``freeze_order`` — by default the one with the
largest singular value first) is frozen once ``step ≥ ⌈freeze_steps · (j+1) / r⌉``. A frozen
column keeps the value it had when frozen (a frozen copy is used from then on, so momentum or
weight decay in the optimizer cannot move it); once every column is frozen ``B`` stops requiring
gradients, so backward no longer computes its ``out × r`` gradient. ``freeze_steps = 0`` freezes
``B`` at init (pure low-dimensional adaptation). The state is saved with the adapter, and
``rw.load`` restores it (the ``loaded`` hook).

Choices (stated; the paper's text leaves them open): the adapter is additive on a frozen,
unchanged ``W0`` (no residual ``W0 − B S A`` is formed), so ``S`` starts at 0; the freezing order
and the linear spacing of the per-column freeze steps are options/assumptions. LaMDA++'s
spectrum-based rank allocation is not implemented.

rankwise follows the paper's text; the authors' code (github.com/ArminAzizi98/LaMDA) differs, so
results will differ from theirs:

* init: their ``A``, ``B`` come from PEFT's LoRA init (random ``A``, ``B = 0``; ``train_clm.py``)
  or from LoftQ, not from the SVD of ``W0``, and ``S`` is an ``nn.Linear(r, r)`` with PyTorch's
  default (non-zero) init (``lamda.py``);
* freezing (``custom_trainer.py`` ``gradual_freeze_B``): they zero the gradient of the first
  ``t = ⌊step / (0.3 · max_steps)⌋`` columns of ``B`` (one column per ``0.3 · max_steps``
  steps), so AdamW's momentum and weight decay still move a "frozen" column; rankwise freezes a
  column for good (a frozen copy) over ``freeze_steps`` steps.

The top singular vectors come from a randomized SVD (Halko, Martinsson & Tropp 2011) with the
caller's generator: range sketch of width ``k = min(r + 8, out, in)`` and two power iterations,
``O(out · in · k)`` instead of a full SVD's ``O(out · in · min(out, in))``. When
``k = min(out, in)`` the sketch spans the whole range and the vectors are exact; otherwise the
error of the captured subspace decays like ``(σ_{k+1} / σ_r)^{5}``. Singular-vector signs are
arbitrary in any SVD; here they follow the random sketch, so another seed gives another (equally
valid) sign pattern.

Activation view: ``base_out + s · (B S) (A drop(x))`` — ``B S`` is ``out × r``, so the cost is LoRA's
(``core.ops.low_rank_apply``).

Parameters per layer at init: ``r² + out · r`` (``r²`` once ``B`` is frozen).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.api import adapted_layers
from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import low_rank_apply, seeded_
from ..core.registry import register
from ..errors import ConfigError
from ._rank_common import adapters_of


@dataclass
class LamdaConfig(RankAlphaConfig):
    """rank: r; alpha: s = α/r (None: α = r); dropout: on the adapter's input; freeze_steps:
    optimizer steps over which B is frozen column by column (0: frozen from the start);
    freeze_order: 'largest' | 'smallest' singular value first."""

    freeze_steps: int = 100
    freeze_order: str = "largest"

    def __post_init__(self):
        super().__post_init__()
        self._check_int("freeze_steps", low=0)
        self._check(self.freeze_order in ("largest", "smallest"), "freeze_order",
                    "use 'largest' (freeze the components of the largest singular values first) or 'smallest'.")



def top_singular(w: torch.Tensor, r: int, generator=None, oversample: int = 8, iters: int = 2):
    """``(U_r, σ_r, V_rᵀ)`` of ``w`` by randomized subspace iteration (see module docstring)."""
    m, n = w.shape
    k = min(r + oversample, m, n)
    omega = seeded_(torch.empty(n, k, dtype=w.dtype, device=w.device), lambda b, g: b.normal_(generator=g), generator)
    q = torch.linalg.qr(w @ omega).Q
    for _ in range(iters):
        q = torch.linalg.qr(w.t() @ q).Q
        q = torch.linalg.qr(w @ q).Q
    ub, s, vh = torch.linalg.svd(q.t() @ w, full_matrices=False)
    return (q @ ub)[:, :r], s[:r], vh[:r]


@register("lamda")
class Lamda(Method):
    """``s · B S A`` with frozen spectral ``A``, trainable core ``S``, gradually frozen ``B``."""

    Config = LamdaConfig
    summary = "ΔW = s·B S A: frozen spectral A, r×r trainable S, B frozen gradually (Azizi et al. 2024)"
    default_lr = 3e-3

    def __init__(self, view: LayerView, config: LamdaConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, "lamda")
        r = config.rank
        self.rank, self.scale = r, config.scale
        kw = view.factory_kwargs
        with torch.no_grad():
            w = view.weight2d().detach()
            w = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
            u, _, vh = top_singular(w, r, generator)
        self.register_buffer("lamda_A", vh.to(**kw).contiguous())
        self.lamda_B = nn.Parameter(u.to(**kw).contiguous())
        self.lamda_S = nn.Parameter(torch.zeros(r, r, **kw))
        self.register_buffer("lamda_B_frozen", self.lamda_B.detach().clone())
        self.register_buffer("lamda_frozen", torch.zeros(r, dtype=torch.bool, device=kw["device"]))
        self._n_frozen: int | None = 0  # host-side count of frozen columns (None: read the buffer)
        if config.freeze_steps == 0:
            self.freeze_due(0)

    @classmethod
    def num_params(cls, view: LayerView, config: LamdaConfig) -> int:
        r = config.rank
        return r * r + (view.out_features * r if config.freeze_steps > 0 else 0)

    # ---- freezing -----------------------------------------------------------------------------
    @classmethod
    def on_step(cls, model: nn.Module, name: str, step: int, optimizers, total_steps=None) -> dict | None:
        """``rw.rank_step`` hook (``rankwise.train`` calls it): advance the freezing schedule of
        adapter ``name`` to optimizer step ``step``; reports the frozen columns when they change."""
        before = sum(layer.adapters[name].frozen_columns() for _, layer in adapted_layers(model)
                     if name in layer.adapters)
        frozen = sum(freeze_step(model, step, name).values())
        return {"frozen B columns": frozen} if frozen != before else None

    def frozen_columns(self) -> int:
        """How many columns of ``B`` are frozen (kept on the host: forward never syncs a device)."""
        if self._n_frozen is None:
            self._n_frozen = int(self.lamda_frozen.sum())
        return self._n_frozen

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._n_frozen = None

    @torch.no_grad()
    def freeze_due(self, step: int) -> int:
        """Freeze the columns of ``B`` the schedule has reached by optimizer step ``step``;
        return how many are frozen. The frozen columns are always a prefix of the freezing order,
        so the host-side count says which (no device read, and it works on a meta tensor)."""
        r, total = self.rank, self.config.freeze_steps
        due = r if total == 0 else min(r, (step * r) // total)
        n = self.frozen_columns()
        if due > n:
            order = torch.arange(r) if self.config.freeze_order == "largest" else torch.arange(r - 1, -1, -1)
            new = order[n:due].to(self.lamda_frozen.device)
            self.lamda_B_frozen[:, new] = self.lamda_B.detach()[:, new]
            self.lamda_frozen[new] = True
            self._n_frozen = due
        self._stop_b_grad()
        return self.frozen_columns()

    def loaded(self) -> None:
        """Re-read the frozen state (after ``rw.load`` copied the buffers)."""
        self._n_frozen = None
        self._stop_b_grad()

    def _stop_b_grad(self) -> None:
        """Once every column is frozen, ``B`` stops requiring gradients."""
        if self.frozen_columns() == self.rank and self.lamda_B.requires_grad:
            self.lamda_B.requires_grad_(False)
            self.lamda_B.grad = None

    def _b(self) -> torch.Tensor:
        n = self.frozen_columns()
        if n == self.rank:
            return self.lamda_B_frozen
        if n == 0:
            return self.lamda_B
        return torch.where(self.lamda_frozen, self.lamda_B_frozen, self.lamda_B)

    # ---- the two views ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return low_rank_apply(self.view, x, base_out, self.lamda_A, self._b() @ self.lamda_S, self.scale,
                              self.config.dropout, self.training)

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param((self._b() @ self.lamda_S @ self.lamda_A) * self.scale)


def freeze_step(model: nn.Module, step: int, name: str | None = None) -> dict[str, int]:
    """Advance LaMDA's freezing schedule of every lamda adapter (or adapter ``name``) to optimizer
    step ``step`` (call it after ``optimizer.step()``). Returns {module name: frozen columns}."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ConfigError(f"freeze_step: step={step!r} must be a non-negative integer (the optimizer step count).")
    out = {}
    for _, lname, ad in adapters_of(model, "lamda", name):
        out[lname] = ad.freeze_due(step)
    return out
