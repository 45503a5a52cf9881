"""EDoRA: Efficient Weight-Decomposed Low-Rank Adaptation via SVD (Nasiri & Garraghan, 2025,
arXiv:2501.12067).

DoRA's decomposition with frozen SVD factors and a small trainable core between them::

    W = diag(m) (W0 + s·B R A) / ‖W0 + s·B R A‖_row,     W0 ≈ U_r diag(S_r) V_rᵀ  (top r)
    B = U_r (out × r),  A = diag(S_r) V_rᵀ (r × in)   frozen;   R ∈ R^{r×r},  m ∈ R^out  trained

as in the authors' code (built on LoRA-XS: ``A`` carries the singular values, ``B`` the left
singular vectors). Init: ``R ~ N(0, init_std²)`` (the reference's ``σ = 1e-5``; ``init_std=0``
gives an exact identity at init), ``m = ‖W0‖_row``; ``s = α/r``. The norm is detached in
backward, as in DoRA/PEFT. Dropout (default 0) acts on the adapter's input, as DoRA's.

Cost: ``W0 Aᵀ`` and ``A Aᵀ`` depend only on frozen tensors and are cached (recomputed only when
``W0`` changes), so the per-step norm ``‖W0‖² + 2s⟨W0, BRA⟩ + s²‖BRA‖²`` costs ``O(out·r²)``;
the activation view is DoRA's (``x → A x → R → B``), never forming ``B R A``.

``A`` and ``B`` are non-persistent buffers: a deterministic function of ``W0`` (thin SVD with a
canonical sign per triplet), recomputed by ``rw.load`` from the fresh base, so files hold only
``R`` and ``m``. Parameters per layer: ``r² + out``. Every layer kind works
(convolutions and embeddings through their canonical ``out × in`` matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import normal_
from ..core.registry import register
from ._dora_common import BaseStats, dora_forward, row_norm_sq


@dataclass
class EdoraConfig(RankAlphaConfig):
    """rank: r (SVD rank of the frozen factors, size of the trained r×r core); alpha: s = α/r
    (None: α = r); dropout: on the adapter's input; rslora: s = α/√r; init_std: standard deviation
    of the core's Gaussian init (0: exact identity)."""

    init_std: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        self._check(math.isfinite(self.init_std) and self.init_std >= 0, "init_std",
                    "init_std must be a finite number ≥ 0 (the reference uses 1e-5).")


@torch.no_grad()
def svd_factors(view: LayerView, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = U_r`` (out × r) and ``A = diag(S_r) V_rᵀ`` (r × in) of ``W0``'s thin SVD (float32, float64
    for float64 weights), each singular pair signed so the largest-magnitude entry of ``U``'s column
    is positive: the factors do not depend on LAPACK's sign choice."""
    w = view.weight2d().detach()
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    u, s, vt = torch.linalg.svd(w.to(dt), full_matrices=False)
    u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    sign = torch.where(u.gather(0, u.abs().argmax(0, keepdim=True)).squeeze(0) < 0, -1.0, 1.0).to(dt)
    out_dt = view.param_dtype
    return (u * sign).to(out_dt).contiguous(), ((s * sign)[:, None] * vt).to(out_dt).contiguous()


@register("edora")
class Edora(Method):
    """DoRA with frozen SVD factors and a trainable ``r × r`` core (see module docstring)."""

    Config = EdoraConfig
    summary = "DoRA with frozen SVD factors U_r, S_rV_rᵀ and a trained r×r core + magnitudes (Nasiri 2025)"
    identity_at_init = False  # R starts at N(0, init_std²), not 0 (init_std=0 is exact)
    reads_base = True
    default_lr = 1e-2
    demo_options = {"rank": 16}

    def __init__(self, view: LayerView, config: EdoraConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, self.name)
        self.rank, self.scale = config.rank, config.scale
        u, a = svd_factors(view, config.rank)
        self.register_buffer("edora_B", u, persistent=False)
        self.register_buffer("edora_A", a, persistent=False)
        self.edora_R = nn.Parameter(torch.zeros(config.rank, config.rank, **view.factory_kwargs))
        if config.init_std > 0:
            normal_(self.edora_R, config.init_std, generator)
        self.stats = BaseStats(view)
        with torch.no_grad():
            self.magnitude = nn.Parameter(self.stats.w0sq(u.dtype).sqrt())

    @classmethod
    def num_params(cls, view: LayerView, config: EdoraConfig) -> int:
        return config.rank * config.rank + view.out_features

    def scale_vector(self, b_eff: torch.Tensor) -> torch.Tensor:
        a = self.edora_A
        w0a, aat = self.stats.projections(a)
        return self.magnitude / row_norm_sq(self.stats.w0sq(a.dtype), w0a, aat, b_eff, self.scale).sqrt()

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        b_eff = self.edora_B @ self.edora_R  # out × r
        return dora_forward(self.view, x, base_out, self.edora_A, b_eff, self.scale_vector(b_eff), self.scale,
                            self.config.dropout, self.training)

    def delta_weight(self) -> torch.Tensor:
        b_eff = self.edora_B @ self.edora_R
        g = self.scale_vector(b_eff)
        w0 = self.view.weight2d().detach().to(g.dtype)
        return self.view.to_param((g - 1)[:, None] * w0 + (g * self.scale)[:, None] * (b_eff @ self.edora_A))

    def clear_cache(self) -> None:
        """Forget cached ``W0`` statistics (needed only after editing ``W0`` through ``.data``)."""
        self.stats.clear()
