"""SVFT: Parameter-Efficient Fine-Tuning with Singular Vectors
(Lingam, Tejaswi, Vavre, Shetty, Gudur, Ghosh, Dimakis, Choi, Bojchevski, Sanghavi, NeurIPS 2024,
arXiv:2405.19597).

With the (thin) SVD of the base weight ``W0 = U Σ Vᵀ`` (all ``p = min(out, in)`` singular
vectors, or the top ``num_vectors`` — the reference code's ``rank`` argument), the update is a
sparse combination of outer products of the singular vectors; only the non-zero coefficients of
``M`` are trained::

    W = W0 + U M Vᵀ,      U (out × p), V (in × p) frozen,   M (p × p) sparse, trained

Sparsity patterns of ``M`` (``pattern``):

* ``"plain"``  — diagonal (SVFT^P): ``p`` parameters, ``= min(out, in)``;
* ``"banded"`` — the diagonal and ``off_diag = d`` bands on each side (SVFT^B_d):
  ``p(2d + 1) − d(d + 1)`` parameters (``d`` clamped to ``p − 1``);
* ``"random"`` — the diagonal plus ``num_random = k`` distinct off-diagonal positions drawn from
  the generator (SVFT^R): ``p + k`` parameters; ``k`` defaults to the banded budget minus the
  diagonal, ``2pd − d(d + 1)``, clamped to ``p(p − 1)``. The positions are a persistent buffer,
  so they survive ``rw.save``/``rw.load``.

The paper's Top-k pattern (chosen by singular-vector alignment) is not implemented.

Deviations from the authors' code (``svft/svft_layers.py``), kept on purpose:

* random pattern law: the reference draws all ``p(2d + 1) − d(d + 1)`` positions with
  ``torch.randint`` for rows and columns independently — with replacement, the diagonal not
  guaranteed (repeated positions add up). Here the same budget is the whole diagonal plus
  distinct off-diagonal positions, so every coefficient is its own entry of ``M`` and ``plain`` is
  contained in every pattern.
* ``num_vectors < p``: the reference's ``rank`` argument rebuilds the weight from the top ``p'``
  triplets only, ``W = U_p' (Σ_p' + M) V_p'ᵀ``, dropping the residual ``W0 − U_p' Σ_p' V_p'ᵀ``
  (the model changes at init). Here ``W = W0 + U_p' M V_p'ᵀ`` keeps it; with all ``p`` vectors
  (the default) the two agree.

Init: the reference code draws the coefficients from Kaiming-normal over the ``k`` entries and
multiplies them by a trainable gate ``sigmoid(g)``, ``g = 0``; we keep the same initial values,
``N(0, 1/(2k))`` (``init="random"``), without the gate so the parameter count is the paper's
formula. ``init="zero"`` starts at ``M = 0`` (then ``W = W0`` exactly).

Activation view — never forms ``U M Vᵀ``::

    h = x V              (N × p, the layer's own op with Vᵀ as an (p, in) weight)
    h' = M h             (diagonal: one scale; banded: 2d shifted multiply-adds, O(N · nnz))
    y = W0 x + b + h' Uᵀ
    random pattern: y = W0 x + b + h (U M)ᵀ with U M formed per step by index_add over the
    nnz columns (O(out · nnz), independent of N; an out × p matrix, not ΔW)

Cost: two products of the size of the base layer (``N·in·p + N·p·out``), as in the paper (SVFT
trades FLOPs and ``(out + in) · p`` frozen memory for very few trained parameters).
``U``, ``V`` are non-persistent buffers recomputed from ``W0`` (see ``_svd_common``).
Works on every layer kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import low_rank_apply, normal_, seeded_
from ..core.registry import register
from ._svd_common import check_rank_fits, weight_svd

PATTERNS = ("plain", "banded", "random")


@dataclass
class SvftConfig(AdapterConfig):
    """pattern: 'plain' | 'banded' | 'random'; off_diag: d (banded; sets random's default budget);
    num_random: off-diagonal entries of the random pattern (None: 2pd − d(d+1));
    num_vectors: top singular vectors used (None: all min(out, in)); init: 'random' | 'zero'."""

    pattern: str = "plain"
    off_diag: int = 2
    num_random: int | None = None
    num_vectors: int | None = None
    init: str = "random"

    def __post_init__(self):
        super().__post_init__()
        self._check(self.pattern in PATTERNS, "pattern", f"use one of {PATTERNS}.")
        self._check_int("off_diag", low=0)
        if self.num_random is not None:
            self._check_int("num_random", low=0)
        if self.num_vectors is not None:
            self._check_int("num_vectors")
        self._check(self.init in ("random", "zero"), "init", "use 'random' or 'zero'.")


def _sizes(view: LayerView, config: SvftConfig) -> tuple[int, int, int]:
    """(p, d, k): singular vectors used, band half-width, random off-diagonal entries."""
    p = check_rank_fits(view, config.num_vectors)
    d = min(config.off_diag, p - 1)
    k = 2 * p * d - d * (d + 1) if config.num_random is None else config.num_random
    return p, d, min(k, p * (p - 1))


def _band_index(p: int, d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the off-diagonal band entries, offsets ±1 … ±d."""
    rows, cols = [], []
    for o in range(1, d + 1):
        i = torch.arange(p - o, device=device)
        rows += [i, i + o]
        cols += [i + o, i]
    if not rows:
        return torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(rows), torch.cat(cols)


def _random_index(p: int, k: int, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` distinct off-diagonal positions of a ``p × p`` matrix, drawn from ``generator``."""
    perm = seeded_(torch.empty(p * (p - 1), dtype=torch.long, device=device),
                   lambda b, g: torch.randperm(b.numel(), generator=g, out=b), generator)
    flat = perm[:k].sort().values
    rows = flat // (p - 1)
    cols = flat % (p - 1)
    cols = cols + (cols >= rows).long()  # skip the diagonal
    return rows, cols


def _bcast(v: torch.Tensor, h: torch.Tensor, dim: int) -> torch.Tensor:
    """``v`` shaped to broadcast along axis ``dim`` of ``h``."""
    return v.view(*([1] * dim), -1, *([1] * (h.dim() - dim - 1)))


class _BandMix(torch.autograd.Function):
    """``h' = M h`` on channel axis ``dim`` for a banded ``M`` (diagonal ``diag``; off-diagonal
    entries in ``offdiag``, per offset ``o = 1 … d``: ``M[i, i+o]`` then ``M[i+o, i]``).

    Forward and backward are ``2d + 1`` shifted multiply-adds on contiguous slices plus, for the
    coefficient gradients, one product-and-sum per segment; only ``h`` is saved."""

    @staticmethod
    def forward(ctx, h, diag, offdiag, band, dim):
        ctx.band, ctx.dim = band, dim
        ctx.save_for_backward(h, diag, offdiag)
        p = h.shape[dim]
        out = h * _bcast(diag, h, dim)
        start = 0
        for o in range(1, band + 1):
            n = p - o
            up, lo = offdiag[start:start + n], offdiag[start + n:start + 2 * n]
            start += 2 * n
            out.narrow(dim, 0, n).addcmul_(h.narrow(dim, o, n), _bcast(up, h, dim))
            out.narrow(dim, o, n).addcmul_(h.narrow(dim, 0, n), _bcast(lo, h, dim))
        return out

    @staticmethod
    def backward(ctx, g):
        h, diag, offdiag = ctx.saved_tensors
        band, dim = ctx.band, ctx.dim
        p = h.shape[dim]
        others = [a for a in range(h.dim()) if a != dim]
        need_h, need_d, need_o = ctx.needs_input_grad[:3]
        grad_h = g * _bcast(diag, h, dim) if need_h else None
        grad_d = (g * h).sum(others) if need_d else None
        grads_o, start = [], 0
        for o in range(1, band + 1):
            n = p - o
            up, lo = offdiag[start:start + n], offdiag[start + n:start + 2 * n]
            start += 2 * n
            g_lo_rows, g_up_rows = g.narrow(dim, o, n), g.narrow(dim, 0, n)  # out rows i+o and i
            if need_h:  # out[i] += up_i h[i+o];  out[i+o] += lo_i h[i]
                grad_h.narrow(dim, o, n).addcmul_(g_up_rows, _bcast(up, h, dim))
                grad_h.narrow(dim, 0, n).addcmul_(g_lo_rows, _bcast(lo, h, dim))
            if need_o:
                grads_o += [(g_up_rows * h.narrow(dim, o, n)).sum(others), (g_lo_rows * h.narrow(dim, 0, n)).sum(others)]
        grad_o = torch.cat(grads_o) if need_o else None
        return grad_h, grad_d, grad_o, None, None


@register("svft")
class Svft(Method):
    """``ΔW = U M Vᵀ`` with a sparse trained ``M`` (see module docstring)."""

    Config = SvftConfig
    summary = "ΔW = U M Vᵀ, all singular vectors of W0 frozen, sparse M (plain/banded/random) trained (SVFT)"
    identity_at_init = False
    default_lr = 5e-3

    def __init__(self, view: LayerView, config: SvftConfig, generator=None, calibration=None):
        super().__init__(view, config)
        p, d, k = _sizes(view, config)
        self.rank, self.band = p, d
        u, _, vt = weight_svd(view, p)
        self.register_buffer("u", u, persistent=False)  # out × p
        self.register_buffer("vt", vt, persistent=False)  # p × in
        dev, kw = u.device, view.factory_kwargs
        if config.pattern == "banded":
            rows, cols = _band_index(p, d, dev)
        elif config.pattern == "random":
            rows, cols = _random_index(p, k, generator, dev)
        else:
            rows = cols = torch.zeros(0, dtype=torch.long, device=dev)
        # off-diagonal positions: random ones must be saved; banded ones are a function of (p, d)
        self.register_buffer("rows", rows, persistent=config.pattern == "random")
        self.register_buffer("cols", cols, persistent=config.pattern == "random")
        self.svft_diag = nn.Parameter(torch.zeros(p, **kw))
        self.svft_offdiag = nn.Parameter(torch.zeros(rows.numel(), **kw)) if rows.numel() else None
        if config.init == "random":  # N(0, 1/(2 nnz)): the reference's Kaiming-normal times sigmoid(0)
            std = 1.0 / math.sqrt(2.0 * (p + rows.numel()))
            for t in (self.svft_diag, self.svft_offdiag):
                if t is not None:
                    normal_(t, std, generator)

    @classmethod
    def num_params(cls, view: LayerView, config: SvftConfig) -> int:
        p, d, k = _sizes(view, config)
        if config.pattern == "banded":
            return p * (2 * d + 1) - d * (d + 1)
        if config.pattern == "random":
            return p + k
        return p

    def _band_mix(self, h: torch.Tensor) -> torch.Tensor:
        """Banded ``M h``: shifted, contiguous multiply-adds in one autograd node (no gather/scatter)."""
        dim = 1 if self.view.channel_dim == 1 else h.dim() - 1
        return _BandMix.apply(h, self.svft_diag.to(h.dtype), self.svft_offdiag.to(h.dtype), self.band, dim)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        u, diag = self.u, self.svft_diag
        if self.config.pattern == "banded" and self.rows.numel():
            return low_rank_apply(self.view, x, base_out, self.vt, u, mid=self._band_mix)
        if self.rows.numel():
            # random: fold M into U once per step: U M = U diag + Σ_(i,j) M_ij U[:, i] e_jᵀ (O(out · nnz)),
            # cheaper than a gather/scatter over all N tokens (one more GEMM in backward instead)
            return low_rank_apply(self.view, x, base_out, self.vt, (u * diag).index_add(
                1, self.cols, u.index_select(1, self.rows) * self.svft_offdiag))
        return low_rank_apply(self.view, x, base_out, self.vt, u * diag)  # plain: U diag(m)

    def dense_m(self) -> torch.Tensor:
        """``M`` as a dense ``p × p`` matrix."""
        m = torch.diag(self.svft_diag)
        if self.rows.numel():
            m = m.index_put((self.rows, self.cols), self.svft_offdiag, accumulate=True)
        return m

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param(self.u @ self.dense_m() @ self.vt)
