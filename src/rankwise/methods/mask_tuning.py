"""Regularized mask tuning: a learned binary mask over the frozen weights (straight-through), with
gradient dropout on the mask's scores.

Paper: Zheng, Wu, Feng, Zhu, Liu, Zhao, Zha, Chen & Shen, "Regularized Mask Tuning: Uncovering Hidden
Knowledge in Pre-trained Vision-Language Models" (ICCV 2023, arXiv:2307.15049). No code is public; the
abstract and a summary of the method section were read, not the full paper. The mask (as the summary
transcribes the paper, after Piggyback, Mallya et al. 2018)::

    W = W0 ⊙ M_bin,     M_bin = 1[M > α],     M ∈ R^{out×in} real-valued scores (trained), W0 frozen

    ΔW = W0 ⊙ (M_bin − 1)        (merge folds the mask into the weight)

``M_bin`` is not differentiable; the straight-through estimator uses ``∂L/∂M_bin`` as ``∂L/∂M``::

    ∂L/∂M = ∂L/∂M_bin = ∂L/∂W ⊙ W0

Init: every score at ``init`` (1e-2) above the threshold ``α`` (5e-3) — Piggyback's values — so
``M_bin = 1`` and the adapted model is the base (``identity_at_init``; the init does not depend on the
seed, ``deterministic_init``). The paper masks a task-relevant subset of layers (the attention weights it
finds important): here that choice is ``targets``.

Regularizer: the paper's *gradient dropout* regularizes the mask updates (so the mask forgets less of the
pre-trained knowledge and overfits less). Its exact rule — a keep probability per entry from the agreement
between the task gradient and the gradient of a KL term to the zero-shot model — could not be read, and
needs a second (frozen) model's predictions that an adapter cannot see. rankwise implements the plain form:
in training, each score's gradient is kept with probability ``1 − grad_dropout`` (an independent Bernoulli
per entry, drawn in forward from the global RNG, no rescaling)::

    ∂L/∂M = (∂L/∂W ⊙ W0) ⊙ ξ,     ξ_ij ~ Bernoulli(1 − p)

It acts on the gradient, so it is not a loss term for ``rw.rank_regularization``; eval mode and
``delta_weight()`` outside autograd are unaffected. ``grad_dropout = 0`` (the default) is Piggyback's mask.

Activation view: the masked weight is dense anyway, so the layer runs one product with ``W0 ⊙ M_bin``
(``computes_base``). Parameters per layer: ``D`` (one score per weight entry) — small adapters come from
narrow ``targets``, as in the paper (2.56 % of CLIP's parameters masked on average).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.registry import register
from ..errors import ConfigError
from ._mask_common import StraightThrough, dense_forward, param_to_2d


@dataclass
class MaskTuningConfig(AdapterConfig):
    """init: initial score of every entry (> threshold: the mask starts at 1); threshold: α of
    ``M_bin = 1[M > α]``; grad_dropout: probability of dropping each score's gradient in training."""

    init: float = 1e-2
    threshold: float = 5e-3
    grad_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        for f in ("init", "threshold"):
            v = getattr(self, f)
            self._check(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < float("inf"), f,
                        "use a finite number (Piggyback: init 1e-2, threshold 5e-3).")
        self._check(self.init > self.threshold, "init",
                    f"init must exceed threshold={self.threshold!r}, so the mask starts at 1 (the base model).")
        self._check(isinstance(self.grad_dropout, (int, float)) and not isinstance(self.grad_dropout, bool)
                    and 0 <= self.grad_dropout < 1, "grad_dropout", "use a probability in [0, 1).")


@register("mask_tuning")
class MaskTuning(Method):
    """``W = W0 ⊙ 1[M > α]`` with straight-through scores ``M`` (see module docstring)."""

    Config = MaskTuningConfig
    summary = "W = W0 ⊙ 1[M > α], scores M by straight-through, gradient dropout (regularized mask tuning)"
    computes_base = True
    reads_base = True
    deterministic_init = True
    default_lr = 5e-4

    def __init__(self, view: LayerView, config: MaskTuningConfig, generator=None, calibration=None):
        super().__init__(view, config)
        if not view.weight.is_floating_point():
            raise ConfigError(f"mask_tuning: module '{view.name}' has a {view.weight.dtype} weight (quantized?); "
                              "the mask multiplies the weight itself, so adapt a floating-point model.")
        self.mask_scores = nn.Parameter(torch.full(view.weight.shape, float(config.init), **view.factory_kwargs))

    @classmethod
    def num_params(cls, view: LayerView, config: MaskTuningConfig) -> int:
        return view.weight.numel()

    def binary_mask(self) -> torch.Tensor:
        """``M_bin`` in the weight's layout, differentiable to the scores by straight-through (with
        gradient dropout in training)."""
        m = self.mask_scores
        keep = None
        p = self.config.grad_dropout
        if p and self.training and torch.is_grad_enabled() and m.requires_grad:
            keep = torch.rand(m.shape, device=m.device) >= p
        return StraightThrough.apply(m, (m > self.config.threshold).detach(), keep)

    def delta_weight(self) -> torch.Tensor:
        w0 = self.view.weight.detach()
        return (w0 * (self.binary_mask() - 1).to(w0.dtype)).to(self.view.param_dtype)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        return dense_forward(self.view, x, base_out, param_to_2d(self.view, self.delta_weight()))
