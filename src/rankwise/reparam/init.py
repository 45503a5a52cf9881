"""Initializations with a chosen rank at a fixed norm (``rw.init``), for rich-vs-lazy studies.

Following Liu, Baratin, Cornford, Mihalas, Shea-Brown & Lajoie, "How connectivity structure shapes rich
and lazy learning in neural circuits" (ICLR 2024, arXiv:2310.08513): a rank-``r`` initial weight is the
rank-``r`` truncation of a random Gaussian matrix, rescaled so that its norm equals the full-rank draw's —
only the *structure* (effective rank) changes, not the scale, which on its own moves a network between
the rich and lazy regimes.

``low_rank_(tensor, rank)``
    ``G ~ N(0, std²)`` of the tensor's shape (as ``(out, in)``), ``G = U S Vᵀ``,
    ``W = c · U_r S_r V_rᵀ`` with ``c`` chosen so that ``‖W‖ = ‖G‖`` in the chosen norm:
    ``norm="fro"`` (the paper) matches the Frobenius norm, ``norm="spectral"`` the top singular value
    (the control in which low-rank weights keep the full-rank draw's largest gain instead of its energy).
    ``std=None`` keeps the tensor's own scale: the target norm is the current tensor's instead of the draw's.
``aligned_low_rank_(tensor, target, rank)``
    The same spectrum, but the singular vectors come from ``target`` (an ``(out, in)`` matrix of task or
    data statistics — the input-output cross-covariance ``Σ_yx``, a teacher's weights, the outer product
    of a readout and an input vector): ``W = c · U_r(target) S_r V_r(target)ᵀ``, ``S_r`` the draw's top
    ``r`` singular values. With a rank-1 ``target = u βᵀ`` this is the paper's aligned initialization
    (Proposition 1: the first layer's row space along the teacher direction ``β``).

Both work in place on any floating tensor of dimension ≥ 2 (a convolution's weight is seen as
``(out, in·k)``), draw on the tensor's device in float32/float64 (the SVD needs it) and write back in the
tensor's dtype, and take ``generator`` for seeded draws.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, ShapeMismatchError

__all__ = ["aligned_low_rank_", "low_rank_"]
NORMS = ("fro", "spectral")


def _check(tensor: torch.Tensor, rank, norm: str, std, where: str) -> tuple[int, int]:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2 or not tensor.is_floating_point():
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ShapeMismatchError(f"{where}: got {shape}; pass a floating tensor with at least 2 dimensions "
                                 "(a weight matrix or a convolution kernel).")
    m, n = tensor.shape[0], tensor[0].numel()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"{where}: rank={rank!r} must be an int ≥ 1 (≥ min(out, in) = {min(m, n)} gives full rank).")
    if norm not in NORMS:
        raise ConfigError(f"{where}: norm={norm!r}; use 'fro' (match the Frobenius norm) or 'spectral' (match the "
                          "top singular value).")
    if std is not None and (isinstance(std, bool) or not isinstance(std, (int, float)) or not std > 0):
        raise ConfigError(f"{where}: std={std!r} must be a positive number, or None to keep the tensor's norm.")
    return m, n


@torch.no_grad()
def _fill(tensor, u, s_r, vh, target_norm, norm):
    w = (u * s_r) @ vh
    s_w = torch.linalg.svdvals(w) if norm == "spectral" else None
    now = s_w[0] if norm == "spectral" else w.norm()
    w = w * (target_norm / now) if now > 0 else w
    tensor.copy_(w.reshape(tensor.shape).to(tensor.dtype))
    return tensor


def _draw(tensor, m, n, std, generator):
    dev = tensor.device if generator is None else generator.device
    g = torch.randn(m, n, generator=generator, dtype=torch.float64, device=dev).to(tensor.device)
    if std is not None:
        return g * std
    cur = tensor.detach().reshape(m, n).double()
    return g, cur


@torch.no_grad()
def low_rank_(tensor: torch.Tensor, rank: int, std: float | None = None, norm: str = "fro",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``tensor`` with the rank-``rank`` truncation of a Gaussian draw at the draw's norm (see the
    module docstring). ``std=None``: rescale to the tensor's current norm instead. Returns ``tensor``."""
    m, n = _check(tensor, rank, norm, std, "low_rank_")
    drawn = _draw(tensor, m, n, std, generator)
    g, ref = (drawn, drawn) if std is not None else drawn
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    target = torch.linalg.svdvals(ref)[0] if norm == "spectral" else ref.norm()
    r = min(rank, s.numel())
    return _fill(tensor, u[:, :r], s[:r], vh[:r], target, norm)


@torch.no_grad()
def aligned_low_rank_(tensor: torch.Tensor, target: torch.Tensor, rank: int | None = None, std: float | None = None,
                      norm: str = "fro", generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``tensor`` with ``U_r S_r V_rᵀ``: singular vectors of ``target`` (task statistics, shaped like
    the tensor as ``(out, in)``), singular values the top ``rank`` of a Gaussian draw, rescaled as in
    :func:`low_rank_`. ``rank``: at most the numerical rank of ``target`` (beyond it ``target`` has no
    directions to give); ``None`` takes all of them. Returns ``tensor``."""
    m, n = _check(tensor, 1 if rank is None else rank, norm, std, "aligned_low_rank_")
    if not isinstance(target, torch.Tensor) or target.reshape(target.shape[0], -1).shape != (m, n):
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ShapeMismatchError(f"aligned_low_rank_: target has shape {shape}; it must be ({m}, {n}) like the tensor "
                                 "seen as (out, in).")
    t = target.detach().reshape(m, n).to(device=tensor.device, dtype=torch.float64)
    ut, st, vht = torch.linalg.svd(t, full_matrices=False)
    eps = torch.finfo(target.dtype if target.is_floating_point() else torch.float64).eps  # the target's own precision
    numerical = int((st > st[0] * max(m, n) * eps).sum()) if st.numel() and st[0] > 0 else 0
    if numerical == 0:
        raise ConfigError("aligned_low_rank_: target is the zero matrix; it has no directions to align with.")
    r = numerical if rank is None else min(rank, numerical)
    drawn = _draw(tensor, m, n, std, generator)
    g, ref = (drawn, drawn) if std is not None else drawn
    s = torch.linalg.svdvals(g)
    want = torch.linalg.svdvals(ref)[0] if norm == "spectral" else ref.norm()
    return _fill(tensor, ut[:, :r], s[:r], vht[:r], want, norm)
