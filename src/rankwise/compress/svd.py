"""SVD-family factorizations: ``svd``, ``asvd``, ``svd_llm``, ``fwsvd`` (and the whitened truncation
``eora`` reuses).

Every method is one SVD of a *transformed* weight ``T = L W R`` (``W`` the canonical ``out × in``
weight, ``L``/``R`` invertible), truncated to rank ``r`` and mapped back::

    T = U Σ Vᵀ,     Ŵ = L⁻¹ U_r Σ_r V_rᵀ R⁻¹,   up = L⁻¹ U_r Σ_r^½ (out × r),  down = Σ_r^½ V_rᵀ R⁻¹ (r × in)

so ``Ŵ`` is the best rank-``r`` approximation of ``W`` in the norm ``‖L (W − Ŵ) R‖_F``
(Eckart–Young in the transformed space) and one SVD serves every rank (energy thresholds, rank
searches). The factors are split ``Σ^½ / Σ^½`` so ``up`` and ``down`` have equal scale (SVD-LLM
splits the same way; it matters for fine-tuning them afterwards).

===========  ====================================  =================================================
method       transform                             minimizes
===========  ====================================  =================================================
``svd``      ``L = R = I``                         ``‖W − Ŵ‖_F``
``asvd``     ``R = diag(s)``, ``s_j = E[x_j²]^{α/2}``  ``‖(W − Ŵ) diag(s)‖_F`` (activation-aware)
``svd_llm``  ``R = Q Λ^½`` with ``E[x xᵀ] = Q Λ Qᵀ``  ``‖(W − Ŵ) X‖_F`` — the layer's output error
``fwsvd``    ``L = diag(√I)``, ``I_i = Σ_j F_ij``    ``Σ_i I_i ‖W_i − Ŵ_i‖²`` (Fisher-weighted rows)
===========  ====================================  =================================================

References and deviations:

* ASVD — Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition for Compressing
  LLMs" (arXiv:2312.05821): ``S_jj = (mean_i |X_ij|)^α``, α = 0.5. Here the scale is the RMS of the
  channel, ``E[x_j²]^{α/2}``, because the streamed :class:`~rankwise.core.calibrate.Calibration` keeps
  second moments (bounded memory), not absolute means — a deviation; both are "channel magnitude^α".
* SVD-LLM — Wang et al., ICLR 2025 (arXiv:2403.07378): whitening ``S`` with ``S Sᵀ = X Xᵀ`` makes
  every discarded ``σ_i`` an exact share of the output loss (``‖(W−Ŵ)X‖_F² = Σ_{i>r} σ_i²``). The paper
  takes ``S`` from a Cholesky factor, which fails on the (often) singular ``X Xᵀ`` of real calibration
  data; here ``S = Q Λ^½`` from a float64 eigendecomposition with eigenvalues clamped to
  ``jitter · λ_max`` (default 1e-8) — the route SVD-LLM V2 takes ("two rounds of SVD", no Cholesky).
  The result is the same ``Ŵ = U_r U_rᵀ W`` (``U_r`` the top left singular vectors of ``W X``)
  whenever ``X Xᵀ`` is well conditioned; it never fails.
* FWSVD — Hsu et al., ICLR 2022, "Language model compression with weighted low-rank factorization"
  (arXiv:2207.00112): Fisher information ``F = Σ_batches (∂L/∂W)²`` summed over each output row.
  Gradients here are per calibration batch (the engine's mean gradient of one batch), as the
  authors' code accumulates ``grad²`` after each batch's backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CalibrationError

#: smallest eigenvalue kept, relative to the largest, when whitening (svd_llm, eora)
JITTER = 1e-8


@dataclass
class Decomposition:
    """``T = L W R = U diag(s) Vh``; ``left_inv`` (a vector, ``L⁻¹`` diagonal) and ``right_inv``
    (a vector for diagonal ``R⁻¹`` or an ``in × in`` matrix) map the truncated factors back."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    left_inv: torch.Tensor | None = None
    right_inv: torch.Tensor | None = None

    @property
    def spectrum(self) -> torch.Tensor:
        return self.s

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up (out × r), down (r × in))`` with ``up @ down = L⁻¹ [T]_r R⁻¹``."""
        root = self.s[:rank].clamp_min(0).sqrt()
        up = self.u[:, :rank] * root
        down = root[:, None] * self.vh[:rank]
        if self.left_inv is not None:
            up = self.left_inv[:, None] * up
        if self.right_inv is not None:
            down = down * self.right_inv if self.right_inv.dim() == 1 else down @ self.right_inv
        return up, down

    def kept_energy(self, rank: int) -> float:
        e = self.s.double() ** 2
        total = float(e.sum())
        return float(e[:rank].sum()) / total if total > 0 else 1.0


def _svd(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..linalg import svd_flip

    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    u, vh = svd_flip(u, vh)
    return u, s, vh


def work_dtype(w: torch.Tensor, high: bool = False) -> torch.dtype:
    return torch.float64 if (high or w.dtype == torch.float64) else torch.float32


def svd(w: torch.Tensor) -> Decomposition:
    """Plain truncated SVD (Eckart–Young: optimal in ``‖·‖_F`` and ``‖·‖₂``)."""
    return Decomposition(*_svd(w.to(work_dtype(w))))


def asvd(w: torch.Tensor, second_moment: torch.Tensor, alpha: float = 0.5, eps: float = 1e-6) -> Decomposition:
    """Activation-aware SVD: ``T = W diag(s)``, ``s_j = E[x_j²]^{α/2}`` (floored at ``eps · max s``)."""
    dt = work_dtype(w)
    s = torch.diagonal(second_moment).to(dt).clamp_min(0) ** (alpha / 2)
    if not bool(torch.isfinite(s).all()) or float(s.max()) <= 0:
        raise CalibrationError("asvd: the calibration inputs of a layer are zero or non-finite; check the batches.")
    s = s.clamp_min(eps * float(s.max()))
    u, sv, vh = _svd(w.to(dt) * s[None, :])
    return Decomposition(u, sv, vh, right_inv=1.0 / s)


def whitening(second_moment: torch.Tensor, jitter: float = JITTER) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S⁻¹)`` with ``S Sᵀ = C`` (``C = E[x xᵀ]``, eigenvalues below ``jitter · λ_max`` raised to
    it), in float64, from ``C = Q Λ Qᵀ``: ``S = Q Λ^½``, ``S⁻¹ = Λ^{-½} Qᵀ``. Never fails on a finite,
    non-zero ``C`` (an eigendecomposition, not a Cholesky)."""
    c = second_moment.to(torch.float64)
    if not bool(torch.isfinite(c).all()):
        raise CalibrationError("whitening: the calibration second moment has non-finite entries; check the inputs.")
    c = (c + c.T) / 2
    lam, q = torch.linalg.eigh(c)
    top = float(lam.max())
    if top <= 0:
        raise CalibrationError("whitening: the calibration inputs of a layer are all zero; give other batches.")
    lam = lam.clamp_min(jitter * top)
    root = lam.sqrt()
    return q * root[None, :], (q / root[None, :]).T


def svd_llm(w: torch.Tensor, second_moment: torch.Tensor, jitter: float = JITTER) -> Decomposition:
    """Truncation-aware whitening (SVD-LLM): ``T = W S`` with ``S Sᵀ = E[x xᵀ]``; the rank-``r``
    result minimizes the layer's output error ``E‖(W − Ŵ) x‖²`` over calibration inputs."""
    s, s_inv = whitening(second_moment, jitter)
    u, sv, vh = _svd(w.to(torch.float64) @ s)
    return Decomposition(u, sv, vh, right_inv=s_inv)


def fwsvd(w: torch.Tensor, fisher: torch.Tensor, eps: float = 1e-6) -> Decomposition:
    """Fisher-weighted SVD: ``T = diag(√I) W`` with row importances ``I_i = Σ_j F_ij``."""
    dt = work_dtype(w)
    imp = fisher.to(dt).sum(dim=1).clamp_min(0).sqrt()
    if not bool(torch.isfinite(imp).all()) or float(imp.max()) <= 0:
        raise CalibrationError("fwsvd: the Fisher information of a layer is zero or non-finite (the loss does not "
                               "depend on it); check loss_fn and the calibration batches.")
    imp = imp.clamp_min(eps * float(imp.max()))
    u, sv, vh = _svd(imp[:, None] * w.to(dt))
    return Decomposition(u, sv, vh, left_inv=1.0 / imp)
