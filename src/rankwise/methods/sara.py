"""SaRA: retrain the smallest-magnitude ("ineffective") weights as a sparse update, with a nuclear-norm
low-rank constraint and a progressive re-selection.

Paper: Hu, Zhang, Yi, Huang, Wang & Ma, "SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive
Sparse Low-Rank Adaptation" (ICLR 2025, arXiv:2409.06633); the abstract and the authors' code
(``sjtuplayer/SaRA``, ``optim/adamw.py`` and ``optim/adamw2.py``, ``finetune.sh``) were read; the body of
the paper could not be read from here. What the code does, and rankwise follows:

* select, per weight, the entries with the smallest ``|W0|`` (the code: ``|W0| < threshold``, 2e-3 in
  ``finetune.sh``); only those are trained, the rest stay frozen — a sparse update on a fixed support
  ``Ω`` (``k = |Ω|`` entries, flat indices ``sara_index``)::

      W = W0 + P_Ω(δ),    δ ∈ R^k (zero at init),   P_Ω scatters δ onto the positions Ω

* nuclear-norm constraint (the code's ``lambda_rank · ‖param ⊙ mask‖_*`` on one randomly drawn 2-D layer
  per step, ``lambda_rank = 5e-4`` in ``finetune.sh``): the penalized matrix is the *trained sparse
  matrix* — the current weights on the support, ``P_Ω(W0|_Ω + δ)`` — not the update alone::

      L_rank = λ · mean over the adapter's layers of  ‖ P_Ω(W0|_Ω + δ) ‖_*

  ``rankwise.train`` (any loop using ``rw.rank_regularization``) adds it to the loss; it is the
  expectation of the code's one-random-layer estimate, computed deterministically on every layer;
* progressive parameter adjustment (the code's ``progressive_iter``): at that step the support shrinks to
  the entries still below the selection threshold, ``Ω' = {i ∈ Ω : |W_i| ≤ τ}`` (``adamw2.py``:
  the new mask is ``(|W| < threshold) ⊙ old mask``); entries that grew past it are frozen at their
  trained value (buffer ``sara_frozen``, flag ``sara_active``) and get no gradient any more::

      W = W0 + P_Ω(where(active, δ, frozen))

Init: ``δ = 0``, so the adapted model equals the base (``identity_at_init``); the selection is a function of
``W0`` alone (``deterministic_init``).

Deviations, stated: the support is the ``fraction`` of smallest-magnitude entries *of each layer* (the
paper finds the smallest 10-20 % ineffective; an absolute threshold such as the code's 2e-3 depends on the
model's weight scale) and ``τ`` is that layer's selection threshold (the largest selected ``|W0|``); the
nuclear norm covers every adapted layer (the code only 2-D layers with both sides > 64, one at a time);
the "unstructured backpropagation" (a custom autograd that never forms the dense gradient of ``W``) is
not reproduced — the weight view ``P_Ω(δ)`` is formed densely per forward (``computes_base``: one product
with ``W0 + ΔW``), memory ``O(D)`` per layer. The progressive step defaults to half the training loop
(``finetune.sh``: 2500 of 5005 steps).

Parameters per layer: ``k = ⌈fraction · D⌉`` (``D`` = entries of the weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.registry import register
from ..errors import ConfigError
from ._mask_common import adapters_named, dense_forward, param_to_2d


@dataclass
class SaraConfig(AdapterConfig):
    """fraction: share of each layer's smallest-|W0| entries that are retrained, in (0, 1];
    nuclear_weight: λ of the nuclear-norm term ``rankwise.train`` adds (0: none);
    progressive_step: optimizer step of the progressive re-selection (None: half the training loop when
    its length is known, else never; 0: never)."""

    fraction: float = 0.1
    nuclear_weight: float = 5e-4
    progressive_step: int | None = None

    def __post_init__(self):
        super().__post_init__()
        self._check(isinstance(self.fraction, (int, float)) and not isinstance(self.fraction, bool)
                    and 0 < self.fraction <= 1, "fraction",
                    "use a share in (0, 1] of each layer's entries to retrain (the paper: 0.1-0.2).")
        self._check(isinstance(self.nuclear_weight, (int, float)) and not isinstance(self.nuclear_weight, bool)
                    and 0 <= self.nuclear_weight < float("inf"), "nuclear_weight",
                    "use a finite number ≥ 0 (0 turns the nuclear-norm term off; the authors' script: 5e-4).")
        self._check(self.progressive_step is None or (isinstance(self.progressive_step, int)
                                                      and not isinstance(self.progressive_step, bool)
                                                      and self.progressive_step >= 0),
                    "progressive_step", "use None (half the loop), 0 (never) or a step number ≥ 1.")


def support_size(view: LayerView, config: SaraConfig) -> int:
    return max(1, math.ceil(config.fraction * view.weight.numel()))


@register("sara")
class Sara(Method):
    """Sparse update on the smallest-|W0| entries, nuclear-norm term, progressive freeze (module docstring)."""

    Config = SaraConfig
    summary = "ΔW = P_Ω(δ) on the smallest-|W0| entries, nuclear-norm term, progressive re-selection (SaRA)"
    computes_base = True
    deterministic_init = True
    default_lr = 1e-4

    def __init__(self, view: LayerView, config: SaraConfig, generator=None, calibration=None):
        super().__init__(view, config)
        w = view.weight
        if not w.is_floating_point():
            raise ConfigError(f"sara: module '{view.name}' has a {w.dtype} weight (quantized?); SaRA retrains "
                              "entries of the weight itself, so adapt a floating-point model.")
        k = support_size(view, config)
        with torch.no_grad():
            idx = torch.topk(w.detach().abs().flatten(), k, largest=False, sorted=False).indices.sort().values
        self.register_buffer("sara_index", idx)
        self.register_buffer("sara_active", torch.ones(k, dtype=torch.bool, device=w.device))
        self.register_buffer("sara_frozen", torch.zeros(k, **view.factory_kwargs))
        self.sara_delta = nn.Parameter(torch.zeros(k, **view.factory_kwargs))

    @classmethod
    def num_params(cls, view: LayerView, config: SaraConfig) -> int:
        return support_size(view, config)

    # ---- the update -----------------------------------------------------------------------------
    def values(self) -> torch.Tensor:
        """The trained values on the support: ``δ`` where active, the frozen value elsewhere."""
        return torch.where(self.sara_active, self.sara_delta, self.sara_frozen.to(self.sara_delta.dtype))

    def _scatter(self, vals: torch.Tensor) -> torch.Tensor:
        w = self.view.weight
        flat = torch.zeros(w.numel(), dtype=vals.dtype, device=vals.device)
        return flat.scatter(0, self.sara_index, vals).reshape(w.shape)

    def delta_weight(self) -> torch.Tensor:
        return self._scatter(self.values()).to(self.view.param_dtype)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        return dense_forward(self.view, x, base_out, param_to_2d(self.view, self.delta_weight()))

    # ---- nuclear-norm term ------------------------------------------------------------------------
    def sparse_weight(self) -> torch.Tensor:
        """``P_Ω(W0|_Ω + values)`` as the canonical ``(out, in)`` matrix (the penalized matrix)."""
        w0 = self.view.weight.detach().flatten()[self.sara_index]
        return param_to_2d(self.view, self._scatter(w0.to(self.sara_delta.dtype) + self.values()))

    def nuclear_norm(self) -> torch.Tensor:
        """``‖P_Ω(W0|_Ω + values)‖_*`` (computed in float32 at least)."""
        m = self.sparse_weight()
        return torch.linalg.matrix_norm(m.float() if m.dtype in (torch.float16, torch.bfloat16) else m, ord="nuc")

    @classmethod
    def rank_regularization(cls, model: nn.Module, name: str) -> torch.Tensor | None:
        """``λ ·`` the mean nuclear norm over adapter ``name``'s layers (None if λ = 0)."""
        layers = adapters_named(model, name, cls)
        if not layers or not layers[0].config.nuclear_weight:
            return None
        return layers[0].config.nuclear_weight * torch.stack([ad.nuclear_norm() for ad in layers]).mean()

    # ---- progressive re-selection --------------------------------------------------------------
    @torch.no_grad()
    def reselect(self) -> int:
        """Freeze the support entries whose weight grew past the selection threshold ``τ`` (the largest
        selected ``|W0|``); returns how many stay trainable."""
        w0 = self.view.weight.detach().flatten()[self.sara_index]
        tau = w0.abs().max()
        current = w0.to(self.sara_delta.dtype) + self.values()
        still = self.sara_active & (current.abs() <= tau.to(current.dtype))
        newly = self.sara_active & ~still
        self.sara_frozen.copy_(torch.where(newly, self.sara_delta.detach().to(self.sara_frozen.dtype),
                                           self.sara_frozen))
        self.sara_active.copy_(still)
        return int(still.sum())

    @classmethod
    def on_step(cls, model, name, step, optimizers, total_steps):
        layers = adapters_named(model, name, cls)
        if not layers:
            return None
        at = layers[0].config.progressive_step
        if at is None:
            at = total_steps // 2 if total_steps else 0
        if not at or step != at:
            return None
        kept = sum(ad.reselect() for ad in layers)
        return {"sara_reselected": kept, "sara_support": sum(int(ad.sara_index.numel()) for ad in layers)}
