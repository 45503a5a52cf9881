"""LoRA-SB: LoRA Silver Bullet (Ponkshe, Singhal, Gorbunov, Tumanov, Horváth & Vepakomma, 2024,
arXiv:2411.19557, "Initialization using update approximation is a silver bullet for extremely
efficient low-rank fine-tuning").

LoRA-XS's layout — frozen ``B (out × r)``, ``A (r × in)`` and a trainable ``r × r`` core ``R`` — with
the frozen factors taken from the *first full fine-tuning update* instead of the weight::

    ΔW₁ = −η · G           (update="grad": an SGD step)   or   −η · sign(G)    (update="sign":
                            Adam's first step, the paper's reference approximation),  η = lr / warmup_steps
    ΔW₁ ≈ U S Vᵀ  (top r)  →  B = U_r,  A = V_rᵀ  (orthonormal, frozen),  R₀ = S_r / s

    W = W0 + s · B R A,     s = α / r (α = r by default → s = 1)

``G`` is the gradient of ``loss_fn`` w.r.t. ``W0`` averaged over the calibration batches (the
engine's ``calibration_needs = ("grad",)``). With ``init="update"`` (default) the adapter starts at
``s·B R₀ A = [ΔW₁]_r``, the best rank-``r`` approximation of the first full-FT update
(Eckart–Young); ``init="zero"`` starts at ``R₀ = 0`` (the model unchanged at init).

Why this layout (the paper's Theorems): since ``B, A`` have orthonormal columns/rows, a step on
``R`` with gradient ``∂L/∂R = s·Bᵀ G_t Aᵀ`` changes the weight by ``−lr·s²·B Bᵀ G_t Aᵀ A`` — the
orthogonal projection of the full-FT step onto ``span(U_r) × span(V_r)``, i.e. the optimal update
expressible in that basis, at every step (``s = 1``: exactly). At the first step, where
``G_t = G`` spans those singular vectors, this is ``−lr·[G]_r``: the best rank-``r`` approximation
of the full fine-tuning update. No scale hyperparameter is needed (``s = 1``).

Learning rate of the approximated step: the reference code (RaghavSinghal10/lora-sb,
``train_glue.py``/``train_arithmetic.py``) approximates the *first warm-up step* of its linear
schedule, ``−(lr / (warmup_ratio·T))·sign(G)`` with the training ``lr`` and ``T`` training steps.
Here ``lr`` is the training learning rate and ``warmup_steps`` the warm-up length ``warmup_ratio·T``
of the run that follows: the step approximated is ``−(lr / warmup_steps)·sign(G)``, the reference's
init when both are set as in training. The defaults ``lr = 1e-3, warmup_steps = 1`` (a run without
warm-up) are kept, since rankwise cannot know the schedule at ``adapt`` time and ``default_lr`` was
measured with them; with the reference's settings (``lr = 1e-4``, ``warmup_ratio = 0.02``, thousands
of steps) its initial jump ``[ΔW₁]_r`` is two to three orders of magnitude smaller than the
default's — pass ``lr`` and ``warmup_steps`` to reproduce it.
The reference fixes ``α = r`` (``s = 1``) and stores ``R₀ = S_r``; rankwise stores ``R₀ = S_r / s``
so that ``s·B R₀ A`` is the same approximation for any ``α`` (identical at the default ``α = r``).

Activation view: ``y = W0 x + b + s·B (R (A x))`` — thin products only, through
:func:`rankwise.core.ops.low_rank_apply` with ``B R`` (``out × r``) as the left factor.
Parameters per layer: ``r²`` (plus the frozen ``A, B`` buffers, saved with the adapter since they
come from data). Any layer kind (the gradient is taken in the canonical ``out × in`` layout).
Not in PEFT 0.21 (no PEFT export).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import low_rank_apply
from ..core.registry import register
from ..errors import CalibrationError
from ..linalg import randomized_svd, truncated_svd
from ._init_common import no_data


@dataclass
class LoraSbConfig(RankAlphaConfig):
    """rank, alpha (default r, so s = 1), dropout, rslora as LoRA; update: first-update approximation
    'sign' (−lr·sign G, Adam's first step) or 'grad' (−lr·G, SGD's); lr, warmup_steps: the step
    approximated has learning rate lr / warmup_steps (the first step of a linear warm-up, as the
    reference code); init: 'update' (R₀ = S_r/s, start at the rank-r approximation of the first
    update) or 'zero' (R₀ = 0); svd: 'exact' or 'randomized' (niter power iterations, 2r test vectors)."""

    update: str = "sign"
    lr: float = 1e-3
    warmup_steps: int = 1
    init: str = "update"
    svd: str = "exact"
    niter: int = 4

    def __post_init__(self):
        super().__post_init__()
        self._check(self.update in ("sign", "grad"), "update", "use 'sign' (Adam's first step) or 'grad' (SGD's).")
        self._check(isinstance(self.lr, (int, float)) and self.lr > 0, "lr",
                    "use the positive learning rate of the full fine-tuning step being approximated.")
        self._check_int("warmup_steps")
        self._check(self.init in ("update", "zero"), "init", "use 'update' or 'zero'.")
        self._check(self.svd in ("exact", "randomized"), "svd", "use 'exact' or 'randomized'.")
        self._check_int("niter", 0)


def first_update(grad: torch.Tensor, config: LoraSbConfig) -> torch.Tensor:
    """The approximated first full fine-tuning update ``ΔW₁`` (``out × in``, float32)."""
    g = grad.float()
    return -(config.lr / config.warmup_steps) * (torch.sign(g) if config.update == "sign" else g)


@register("lora_sb")
class LoraSb(Method):
    """``ΔW = s · B R A`` with ``B, A`` the top singular vectors of the first full-FT update, ``R`` trained."""

    Config = LoraSbConfig
    summary = "LoRA-XS layout B·R·A with B, A from the SVD of the first full-FT update, R trained (Ponkshe 2024)"
    calibration_needs = ("grad",)
    identity_at_init = False
    default_lr = 3e-3  # demo task: 3e-3 beats 1e-3 (loss 2.08 vs 2.26 after 80 steps)

    @property
    def deterministic_init(self) -> bool:
        return self.config.svd == "exact" or 2 * self.rank >= min(self.view.out_features, self.view.in_features)

    def __init__(self, view: LayerView, config: LoraSbConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, self.name)
        self.rank, self.scale, r, kw = config.rank, config.scale, config.rank, view.factory_kwargs
        a, b = torch.zeros(r, view.in_features, **kw), torch.zeros(view.out_features, r, **kw)
        core = torch.zeros(r, r, **kw)
        if not no_data(view, calibration):
            if calibration is None or not hasattr(calibration, "grad"):
                raise CalibrationError(f"lora_sb: module '{view.name}' got no gradient; adapt with "
                                       "rw.adapt(model, 'lora_sb', ..., calibration=batches, loss_fn=...).")
            upd = first_update(calibration.grad, config)
            if config.svd == "exact":
                u, s, vh = truncated_svd(upd, r)
            else:
                u, s, vh = randomized_svd(upd, r, oversample=r, niter=config.niter, generator=generator)
            a.copy_(vh)
            b.copy_(u)
            if config.init == "update":
                core.copy_(torch.diag(s / self.scale))
        self.register_buffer("lora_A", a)
        self.register_buffer("lora_B", b)
        self.lora_R = nn.Parameter(core)

    @classmethod
    def num_params(cls, view: LayerView, config: LoraSbConfig) -> int:
        return config.rank ** 2

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return low_rank_apply(self.view, x, base_out, self.lora_A, self.lora_B @ self.lora_R, self.scale,
                              self.config.dropout, self.training)

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param(((self.lora_B @ self.lora_R) @ self.lora_A) * self.scale)
