"""Small tensor operations shared by adapter methods: seeded initializers that work on any device,
dropout masks, the autocast check, and :func:`low_rank_apply` — the one activation path of every
update that factors as ``ΔW = s · B A`` (LoRA, the inits, VeRA-style bases, HRA, NoLA, the SVD
family …): one fused autograd node on linear layers, the layer's own operation elsewhere."""

from __future__ import annotations

import functools
import math
import platform

import torch
import torch.nn.functional as F


def autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


@functools.cache
def cpu_bernoulli_is_fast() -> bool:
    """PyTorch's CPU ``bernoulli_`` uses MKL's generator only on Intel CPUs; elsewhere it is a
    serial per-element loop, about twice as slow as ``rand() < p`` (measured on an AMD EPYC)."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" in line
    except OSError:
        pass
    return "intel" in platform.processor().lower()


def keep_mask(x: torch.Tensor, keep: float) -> torch.Tensor:
    """Bool mask of ``x``'s shape, each entry True with probability ``keep`` (from the global RNG),
    drawn with whichever of ``bernoulli_`` and ``rand < keep`` is faster on ``x``'s device."""
    if x.device.type == "cpu" and not cpu_bernoulli_is_fast():
        return torch.rand(x.shape) < keep
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(keep)


def seeded_(t: torch.Tensor, draw, generator=None) -> torch.Tensor:
    """Fill ``t`` in place with ``draw(buf, generator)`` — e.g. ``lambda b, g: b.normal_(0, 1, generator=g)``.

    A ``torch.Generator`` belongs to one device (the CPU by default), and drawing into a tensor on
    another device with it fails. Where the devices differ, the numbers are drawn on the
    generator's device (so the same seed gives the same adapter on CPU and CUDA) and copied into
    ``t``; a meta tensor has no values to fill. Otherwise they are drawn in place.
    """
    with torch.no_grad():
        if generator is None or t.device == generator.device:
            return draw(t, generator)
        if t.device.type == "meta":
            return t
        buf = torch.empty(t.shape, dtype=t.dtype, device=generator.device)
        return t.copy_(draw(buf, generator))


def uniform_(t: torch.Tensor, bound: float, generator=None) -> torch.Tensor:
    """``U(-bound, bound)`` in place; ``bound = 1/√fan_in`` is PyTorch's Linear default (kaiming-uniform
    with a = √5), which PEFT's adapters use."""
    return seeded_(t, lambda b, g: b.uniform_(-bound, bound, generator=g), generator)


def normal_(t: torch.Tensor, std: float = 1.0, generator=None, mean: float = 0.0) -> torch.Tensor:
    """``N(mean, std²)`` in place."""
    return seeded_(t, lambda b, g: b.normal_(mean, std, generator=g), generator)


def kaiming_bound(fan_in: int) -> float:
    """``1/√fan_in``: the bound of PyTorch's Linear default init."""
    return 1.0 / math.sqrt(max(1, fan_in))


def low_rank_apply(view, x: torch.Tensor, base_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   scale: float = 1.0, dropout: float = 0.0, training: bool = False, mid=None) -> torch.Tensor:
    """``base_out + scale · B mid(A drop(x))`` on any layer kind, never forming ``B A``.

    ``a`` is ``(k, in)`` and ``b`` is ``(out, k)`` in the canonical layout; they may be parameters or
    computed tensors (``U G``, ``B ⊙ g``, a concatenation …): autograd carries gradients back.
    ``mid`` (optional) acts on the ``k``-channel intermediate ``h = A x`` (a diagonal or a small
    ``k × k`` map). Paths, chosen here and only here:

    * linear kinds, one dtype, no autocast, no ``mid``: :class:`LowRankLinear` — one autograd node
      that saves only ``x`` (and a 1-byte dropout mask), with ``r``-row products in backward;
    * otherwise: ``h`` by the layer's own operation (``view.apply_in``: linear, conv with ``k``
      output channels, embedding lookup), dropout saving its mask only on linear kinds
      (:class:`DropoutLinear`), then one fused ``addmm`` into ``base_out`` where dtypes allow.

    Under autocast the products run in the autocast dtype; the result has ``base_out``'s dtype.
    When ``b`` is exactly zero the output equals ``base_out`` bitwise.
    """
    linear = view.is_linear
    dropping = dropout > 0 and training
    if (linear and mid is None and x.dtype == a.dtype == b.dtype == base_out.dtype
            and not autocast_on(x.device.type)):
        mask, keep = None, 1.0
        if dropping:
            keep = 1.0 - dropout
            mask = keep_mask(x, keep)
        if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad
                                        or base_out.requires_grad):
            return LowRankLinear.apply(x, base_out, a, b, scale, mask, keep)
        return lowrank_branch(x, base_out, a, b, scale / keep, mask)  # no graph to build (inference)
    if x.is_floating_point() and x.dtype != a.dtype:
        x = x.to(a.dtype)
    if dropping and linear:
        keep = 1.0 - dropout
        h = DropoutLinear.apply(x, a, keep_mask(x, keep), keep)
    else:
        if dropping and x.is_floating_point():
            x = F.dropout(x, dropout, training=True)
        h = view.apply_in(x, a)
    if mid is not None:
        h = mid(h)
    if linear and base_out.dtype == h.dtype == b.dtype and not autocast_on(x.device.type):
        out2d = torch.addmm(base_out.reshape(-1, b.shape[0]), h.reshape(-1, b.shape[1]), b.t(), alpha=scale)
        return out2d.view(base_out.shape)
    up = view.apply_out(h, b.to(h.dtype))
    return base_out + (up * scale if scale != 1.0 else up).to(base_out.dtype)


def lowrank_branch(x, base_out, a, b, factor: float, mask=None) -> torch.Tensor:
    """``base_out + factor · ((x ⊙ m) Aᵀ) Bᵀ`` as two thin matmuls on 2-D views (``m`` optional)."""
    x2 = x.reshape(-1, a.shape[1])
    if mask is not None:
        x2 = x2 * mask.reshape(x2.shape)
    out = torch.addmm(base_out.reshape(-1, b.shape[0]), torch.mm(x2, a.t()), b.t(), alpha=factor)
    return out.view(base_out.shape)


class LowRankLinear(torch.autograd.Function):
    """The whole LoRA branch of a linear layer as one autograd node::

        out = base_out + s · (drop(x) Aᵀ) Bᵀ,     drop(x) = x ⊙ m / keep   (m = None: no dropout)

    Memory: saves only ``x`` — which the full fine-tune saves too, for the weight gradient — and,
    with dropout, the 1-byte mask: never a dropped copy of ``x``, and not ``h = drop(x) Aᵀ``
    either (backward recomputes it with one ``r``-column product), so what LoRA keeps for
    backward is a subset of what full fine-tuning keeps, plus the masks.

    Speed: backward forms only ``r``-row products (``Bᵀ gᵀ``, ``hᵀ g``, ``ghᵀ x``), which with
    MKL on CPU run 2-4x faster than the ``g B`` / ``gᵀ h`` / ``xᵀ gh`` that generic autograd of
    ``F.linear`` and ``addmm`` picks; ``s`` and ``1/keep`` are folded into ``r``-sized tensors,
    and ``base_out``'s gradient is passed through untouched.
    """

    @staticmethod
    def forward(ctx, x, base_out, a, b, scale, mask, keep):
        ctx.scale, ctx.keep = scale, keep
        ctx.save_for_backward(x, a, b, mask)
        return lowrank_branch(x, base_out, a, b, scale / keep, mask)

    @staticmethod
    def backward(ctx, g):
        x, a, b, mask = ctx.saved_tensors
        need_x, need_base, need_a, need_b = ctx.needs_input_grad[:4]
        n_in, n_out = a.shape[1], b.shape[0]
        factor = ctx.scale / ctx.keep
        g2 = g.reshape(-1, n_out)
        grad_x = grad_a = grad_b = None
        xm = None
        if need_a or need_b:
            xm = x.reshape(-1, n_in)
            if mask is not None:
                xm = xm * mask.reshape(-1, n_in)  # x ⊙ m, rebuilt instead of stored
        if need_b:
            h = torch.mm(xm, a.t())  # recomputed: N × r
            grad_b = torch.mm(h.t(), g2).t().mul(factor)  # (out, r) as the transpose of r rows
        if need_x or need_a:
            gh_t = torch.mm(b.t(), g2.t()).mul_(factor)  # (dL/dh)ᵀ · 1/keep as r × N
            if need_a:
                grad_a = torch.mm(gh_t, xm)
            if need_x:
                grad_x = torch.mm(gh_t.t(), a)
                if mask is not None:
                    grad_x.mul_(mask.reshape(-1, n_in))
                grad_x = grad_x.view(x.shape)
        return grad_x, (g if need_base else None), grad_a, grad_b, None, None, None


class DropoutLinear(torch.autograd.Function):
    """``h = (x ⊙ m / (1-p)) Aᵀ`` saving ``x`` and the bool mask ``m``, not the dropped copy.

    Used where the fused :class:`LowRankLinear` does not apply (mixed dtypes, autocast)."""

    @staticmethod
    def forward(ctx, x, a, mask, keep):
        ctx.keep = keep
        ctx.save_for_backward(x, a, mask)
        return F.linear(x * mask, a).mul_(1.0 / keep)

    @staticmethod
    def backward(ctx, grad_h):
        x, a, mask = ctx.saved_tensors
        inv = 1.0 / ctx.keep
        grad_x = grad_a = None
        g2 = grad_h.reshape(-1, grad_h.shape[-1]) * inv
        dt = g2.dtype  # under autocast forward ran in the autocast dtype; backward runs outside it
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g2, a.to(dt)).view(x.shape).to(x.dtype).mul_(mask)
        if ctx.needs_input_grad[1]:
            xm = (x * mask).reshape(-1, x.shape[-1]).to(dt)
            grad_a = torch.mm(g2.t(), xm).to(a.dtype)
        return grad_x, grad_a, None, None
