"""LoRA-SB: LoRA Silver Bullet (Ponkshe, Singhal, Gorbunov, Tumanov, Horváth & Vepakomma, 2024,
arXiv:2411.19557, "Initialization using update approximation is a silver bullet for extremely
efficient low-rank fine-tuning").

LoRA-XS's layout — frozen ``B (out × r)``, ``A (r × in)`` and a trainable ``r × r`` core ``R`` — with
the frozen factors taken from the *first full fine-tuning update* instead of the weight::

    ΔW₁ = −lr · G          (update="grad": an SGD step)   or   −lr · sign(G)   (update="sign":
                            Adam's first step, the paper's reference approximation)
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

Activation view: ``y = W0 x + b + (s·B R)(A x)`` — two thin products, ``B R`` is ``out × r``.
Parameters per layer: ``r²`` (plus the frozen ``A, B`` buffers, saved with the adapter since they
come from data). Any layer kind (the gradient is taken in the canonical ``out × in`` layout).
Not in PEFT 0.21 (no PEFT export).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.registry import register
from ..errors import CalibrationError
from ..linalg import randomized_svd, truncated_svd
from ._init_common import ALL_KINDS, factor_dtype, loading
from ._svd_common import low_rank_out


@dataclass
class LoraSbConfig(AdapterConfig):
    """rank: r; alpha: α (default r, so s = 1); update: first-update approximation 'sign' (−lr·sign G,
    Adam's first step) or 'grad' (−lr·G, SGD's); lr: its learning rate; init: 'update' (R₀ = S_r/s,
    start at the rank-r approximation of the first update) or 'zero' (R₀ = 0); svd: 'exact' or
    'randomized' (niter power iterations, 2r test vectors)."""

    rank: int = 8
    alpha: float | None = None
    update: str = "sign"
    lr: float = 1e-3
    init: str = "update"
    svd: str = "exact"
    niter: int = 4

    def __post_init__(self):
        super().__post_init__()
        self._check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
                    "rank", "rank must be a positive integer.")
        self._check(self.alpha is None or (isinstance(self.alpha, (int, float)) and self.alpha > 0),
                    "alpha", "alpha must be positive (or None: alpha = rank, s = 1).")
        self._check(self.update in ("sign", "grad"), "update", "use 'sign' (Adam's first step) or 'grad' (SGD's).")
        self._check(isinstance(self.lr, (int, float)) and self.lr > 0, "lr",
                    "use the positive learning rate of the full fine-tuning step being approximated.")
        self._check(self.init in ("update", "zero"), "init", "use 'update' or 'zero'.")
        self._check(self.svd in ("exact", "randomized"), "svd", "use 'exact' or 'randomized'.")
        self._check(isinstance(self.niter, int) and self.niter >= 0, "niter", "use a non-negative integer.")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else float(self.alpha)

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank


def first_update(grad: torch.Tensor, config: LoraSbConfig) -> torch.Tensor:
    """The approximated first full fine-tuning update ``ΔW₁`` (``out × in``, float32)."""
    g = grad.float()
    return -config.lr * (torch.sign(g) if config.update == "sign" else g)


@register("lora_sb")
class LoraSb(Method):
    """``ΔW = s · B R A`` with ``B, A`` the top singular vectors of the first full-FT update, ``R`` trained."""

    Config = LoraSbConfig
    kinds = ALL_KINDS
    summary = "LoRA-XS layout B·R·A with B, A from the SVD of the first full-FT update, R trained (Ponkshe 2024)"
    calibration_needs = ("grad",)
    identity_at_init = False
    merge_atol = 1e-5
    default_lr = 3e-3  # demo task: 3e-3 beats 1e-3 (loss 2.08 vs 2.26 after 80 steps)

    @property
    def deterministic_init(self) -> bool:
        return self.config.svd == "exact" or 2 * self.rank >= min(self.view.out_features, self.view.in_features)

    def __init__(self, view: LayerView, config: LoraSbConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, self.name)
        self.view, self.config, self.rank = view, config, config.rank
        self.scale = config.scale
        r, dt, dev = config.rank, factor_dtype(view), view.weight.device
        a = torch.zeros(r, view.in_features, dtype=dt)
        b = torch.zeros(view.out_features, r, dtype=dt)
        core = torch.zeros(r, r, dtype=dt)
        if not loading(calibration):
            if calibration is None or not hasattr(calibration, "grad"):
                raise CalibrationError(f"lora_sb: module '{view.name}' got no gradient; adapt with "
                                       "rw.adapt(model, 'lora_sb', ..., calibration=batches, loss_fn=...).")
            upd = first_update(calibration.grad, config)
            if config.svd == "exact":
                u, s, vh = truncated_svd(upd, r)
            else:
                u, s, vh = randomized_svd(upd, r, oversample=r, niter=config.niter, generator=generator)
            a, b = vh.to(dt), u.to(dt)
            if config.init == "update":
                core = torch.diag(s / self.scale).to(dt)
        self.register_buffer("lora_A", a.to(dev).contiguous())
        self.register_buffer("lora_B", b.to(dev).contiguous())
        self.lora_R = nn.Parameter(core.to(dev))

    @classmethod
    def num_params(cls, view: LayerView, config: LoraSbConfig) -> int:
        return config.rank ** 2

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return low_rank_out(self.view, x, base_out, self.lora_A, (self.lora_B @ self.lora_R) * self.scale)

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param(((self.lora_B @ self.lora_R) @ self.lora_A) * self.scale)
