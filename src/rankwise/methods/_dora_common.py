"""Pieces shared by the weight-decomposed methods ``dora`` and ``edora``.

Both adapt ``W = diag(g) (W0 + s·B A)`` with ``g = m / ‖W0 + s·B A‖_row`` (one norm per output
unit: a row of the canonical ``out × in`` matrix, PEFT's convention) and the norm *detached*
from autograd, as the DoRA paper (Sec. 4.3) suggests and PEFT does.

* :func:`row_norm_sq` — ``‖W0 + s·B A‖²`` per row without forming ``B A``::

      ‖W0_i + s (BA)_i‖² = ‖W0_i‖² + 2s ⟨W0_i, (BA)_i⟩ + s² ‖(BA)_i‖²
                         = ‖W0_i‖² + 2s Σ_k B_ik (W0 Aᵀ)_ik + s² Σ_k (B (A Aᵀ))_ik B_ik

  with ``W0 Aᵀ`` (``out × r``) and ``A Aᵀ`` (``r × r``): ``O(out·in·r)`` flops (one pass over
  ``W0``) and no ``out × in`` temporary.
* :class:`BaseStats` — caches what depends only on the frozen ``W0`` (``‖W0‖²`` per row, and for
  a frozen ``A``: ``W0 Aᵀ``, ``A Aᵀ``), keyed on the storage and version counter of ``W0`` (and
  ``A``), so an in-place change of ``W0`` (``rw.merge`` of another adapter, ``load_state_dict``)
  recomputes it. Edits through ``.data`` bypass version counters: call ``clear()`` after them.
  Under ``torch.compile`` (``torch.compiler.is_compiling()``) the cache is neither read nor
  written: the quantities are computed in the graph every forward. Dynamo cannot trace the
  ``data_ptr()`` comparison (a graph break at every adapted layer) and would freeze ``_version``
  as a constant without a guard (a stale cache), so recomputing is the only safe traceable choice;
  it costs one pass over ``W0`` (``out·in`` flops for ``‖W0‖²``, next to the ``2·N·in·out`` of the
  base matmul: 1/(2N) of it for ``N`` tokens; ``out·in·r`` more for EDoRA's ``W0 Aᵀ``).
* :func:`dora_forward` — the activation view ``base_out + (g−1)⊙(base_out − bias) + g⊙s·B(A x)``
  (PEFT's formula; with dropout ``p > 0`` in training, ``base_out − bias`` is recomputed on the
  dropped input, also as PEFT does). On linear layers it is one autograd node
  (:class:`_DoraLinear`) that saves ``base_out`` and ``x`` (or, for a frozen ``A``, ``A x``);
  elsewhere (other kinds, dropout, autocast, mixed dtypes) the low-rank term goes through
  ``core.ops.low_rank_apply`` with ``diag(g) B``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.layers import LayerView
from ..core.ops import autocast_on, low_rank_apply


def channel_view(v: torch.Tensor, view: LayerView, ndim: int) -> torch.Tensor:
    """A per-output-unit vector shaped to broadcast over an output of ``ndim`` dimensions."""
    if view.channel_dim == 1:
        return v.view(1, -1, *([1] * (ndim - 2)))
    return v


@torch.no_grad()
def row_norm_sq(w0sq: torch.Tensor, w0a: torch.Tensor, aat: torch.Tensor, b: torch.Tensor,
                scale: float) -> torch.Tensor:
    """``‖W0 + s·B A‖²`` per row from ``‖W0‖²`` (out), ``W0 Aᵀ`` (out × r), ``A Aᵀ`` (r × r), ``B``."""
    b = b.detach().to(w0a.dtype)
    cross = (b * w0a).sum(1)
    quad = ((b @ aat) * b).sum(1)
    return (w0sq + (2.0 * scale) * cross + (scale * scale) * quad).clamp_min_(torch.finfo(w0sq.dtype).tiny)


class BaseStats:
    """Quantities of the frozen base weight, recomputed only when ``W0`` (or a frozen ``A``) changes."""

    def __init__(self, view: LayerView):
        self.view = view
        self._w0sq = None
        self._proj = None

    def clear(self) -> None:
        self._w0sq = self._proj = None

    @staticmethod
    def _stamp(t: torch.Tensor):
        return (t.data_ptr(), t._version, t.dtype, t.device)

    @torch.no_grad()
    def w0sq(self, dtype: torch.dtype) -> torch.Tensor:
        """``‖W0‖²`` per row (out,), in ``dtype`` (computed, never cached, under ``torch.compile``)."""
        if torch.compiler.is_compiling():
            return self.view.weight2d().detach().to(dtype).square().sum(1)
        w = self.view.weight
        stamp = (self._stamp(w), dtype)
        if self._w0sq is None or self._w0sq[0] != stamp:
            w2 = self.view.weight2d().detach().to(dtype)
            self._w0sq = (stamp, w2.square().sum(1))
        return self._w0sq[1]

    @torch.no_grad()
    def projections(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W0 Aᵀ, A Aᵀ)`` for a frozen ``A``, cached (computed, never cached, under ``torch.compile``)."""
        if torch.compiler.is_compiling():
            return base_projections(self.view, a)
        stamp = (self._stamp(self.view.weight), self._stamp(a))
        if self._proj is None or self._proj[0] != stamp:
            self._proj = (stamp, base_projections(self.view, a))
        return self._proj[1]


@torch.no_grad()
def base_projections(view: LayerView, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W0 Aᵀ (out × r), A Aᵀ (r × r))`` in ``A``'s dtype (uncached: for a trained ``A``)."""
    a = a.detach()
    w2 = view.weight2d().detach()
    if w2.dtype != a.dtype:
        w2 = w2.to(a.dtype)
    return w2 @ a.t(), a @ a.t()


class _DoraLinear(torch.autograd.Function):
    """DoRA's branch of a linear layer as one autograd node (dropout 0)::

        out = base_out + (g − 1) ⊙ (base_out − bias) + (g·s) ⊙ (x Aᵀ) Bᵀ
            = g ⊙ base_out + (1 − g) ⊙ bias + h (diag(g·s) B)ᵀ,     h = x Aᵀ

    ``g`` is an input (its gradient goes on to the magnitude through autograd); ``bias`` is a
    frozen constant. Saves ``base_out`` and, when ``A`` is trained, ``x`` (rebuilding ``h`` in
    backward with one ``r``-column product), else only ``h`` (N × r; EDoRA's frozen ``A``).
    Backward, with ``G`` the output gradient::

        ∂base_out = g ⊙ G,   ∂B = s·g ⊙ (Gᵀ h),   ∂A = (diag(g·s) B)ᵀ Gᵀ x,   ∂x = G diag(g·s) B A
        ∂g = Σ_tokens G ⊙ (base_out − bias) + s · rowsum(B ⊙ Gᵀ h)
    """

    @staticmethod
    def forward(ctx, x, base_out, a, b, g, bias, scale):
        n_in, n_out = a.shape[1], b.shape[0]
        x2 = x.reshape(-1, n_in)
        bo = base_out.reshape(-1, n_out)
        ctx.scale, ctx.x_shape = scale, x.shape
        h = torch.mm(x2, a.t())
        keep_x = ctx.needs_input_grad[2]  # A is trained: keep x (held anyway), rebuild h
        ctx.save_for_backward(x if keep_x else None, None if keep_x else h, base_out, a, b, g, bias)
        # one pass over the N × out output for g ⊙ base_out (+ (1 − g) ⊙ bias), one for the low-rank term
        out = bo * g if bias is None else torch.addcmul(bias * (1.0 - g), bo, g)
        out.addmm_(h, (b * (g * scale)[:, None]).t())
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad):
        x, h, base_out, a, b, g, bias = ctx.saved_tensors
        need_x, need_base, need_a, need_b, need_g = ctx.needs_input_grad[:5]
        s = ctx.scale
        n_in, n_out = a.shape[1], b.shape[0]
        g2 = grad.reshape(-1, n_out)
        x2 = None if x is None else x.reshape(-1, n_in)
        grad_x = grad_base = grad_a = grad_b = grad_g = None
        if need_base:
            grad_base = (g2 * g).view(base_out.shape)
        if need_b or need_g:
            if h is None:
                h = torch.mm(x2, a.t())
            p = torch.mm(h.t(), g2).t()  # Gᵀ h: out × r
            if need_b:
                grad_b = p * (g * s)[:, None]
            if need_g:
                bo = base_out.reshape(-1, n_out)
                grad_g = torch.linalg.vecdot(g2, bo, dim=0) + s * (b * p).sum(1)
                if bias is not None:
                    grad_g = grad_g - bias * g2.sum(0)
        if need_x or need_a:
            gh_t = torch.mm((b * (g * s)[:, None]).t(), g2.t())  # (∂L/∂h)ᵀ: r × N
            if need_a:
                grad_a = torch.mm(gh_t, x2)
            if need_x:
                grad_x = torch.mm(gh_t.t(), a).view(ctx.x_shape)
        return grad_x, grad_base, grad_a, grad_b, grad_g, None, None


def dora_forward(view: LayerView, x: torch.Tensor, base_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 g: torch.Tensor, scale: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """The adapted output ``diag(g)(W0 + s·BA) x + bias`` of ``view``'s layer (see module docstring)."""
    bias = None if view.kind == "embedding" else view.base.bias
    dropping = dropout > 0 and training
    if (view.is_linear and not dropping and x.dtype == a.dtype == b.dtype == base_out.dtype == g.dtype
            and (bias is None or bias.dtype == g.dtype) and not autocast_on(x.device.type)):
        return _DoraLinear.apply(x, base_out, a, b, g, None if bias is None else bias.detach(), scale)
    if x.is_floating_point() and x.dtype != a.dtype:
        x = x.to(a.dtype)
    if dropping and x.is_floating_point():
        x = F.dropout(x, dropout, training=True)
        w0 = view.weight2d().detach()
        base_term = view.functional(x, w0 if w0.dtype == x.dtype else w0.to(x.dtype), bias=False)
    else:
        base_term = base_out if bias is None else base_out - channel_view(bias.detach(), view, base_out.dim())
    gv = channel_view(g, view, base_out.dim())
    rescaled = base_out + ((gv - 1) * base_term).to(base_out.dtype)
    return low_rank_apply(view, x, rescaled, a, b * g[:, None].to(b.dtype), scale)
