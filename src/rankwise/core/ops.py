"""Small tensor operations shared by adapter methods: dropout masks, the autocast check, and the
fused low-rank branch ``base_out + s · (drop(x) Aᵀ) Bᵀ`` (one autograd node) that LoRA and every
LoRA-shaped method (the inits, VeRA-style bases, HRA, NoLA, …) use on linear layers."""

from __future__ import annotations

import functools
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
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g2, a).view(x.shape).mul_(mask)
        if ctx.needs_input_grad[1]:
            xm = (x * mask).reshape(-1, x.shape[-1])
            grad_a = torch.mm(g2.t(), xm)
        return grad_x, grad_a, None, None
