"""Compression that produces or shrinks adapters: ``extract`` and ``compeft``.

``extract`` — a LoRA adapter of rank ``r`` from the difference of a fine-tuned and a base model, like
``mergekit-extract-lora`` (arcee-ai/mergekit, ``mergekit/scripts/extract_lora.py``)::

    ΔW = W_ft − W_base = U Σ Vᵀ,     lora_B = U_r Σ_r^½,  lora_A = Σ_r^½ V_rᵀ,  α = r (scale 1)

so ``B A = [ΔW]_r``, the best rank-``r`` approximation (exact when the fine-tune is of rank ≤ ``r``).
The adapter is put on the *base* model (``rw.save`` / ``rw.export_peft`` write it; PEFT loads it).
Modules outside the targets whose parameters differ (a classification head trained fully) become
``modules_to_save`` holding the fine-tuned values, as mergekit does for embeddings and heads;
differing biases of targeted layers cannot be held by LoRA and are reported.

``compeft`` — ComPEFT (Yadav et al. 2023, "ComPEFT: Compression for Communicating Parameter Efficient
Updates via Sparsification and Quantization", arXiv:2311.13171, Eq. 1–2): each trained tensor ``τ`` of an
adapter becomes ``α · σ(τ) · sign(τ) ⊙ top_k(|τ|)`` — the ``density`` fraction of largest entries keep
their sign, everything else is 0, and one scalar ``α σ(τ)`` (``σ`` the standard deviation of ``τ``)
scales all. rankwise takes ``τ`` as the adapter's tensors themselves (LoRA's ``A`` and ``B``; for a
method with an initial value other than 0 the paper subtracts it — not done here). Stored size:
``min(2 bits per entry, nnz · (1 + ⌈log₂ numel⌉) bits) + 4 bytes`` per tensor (ternary codes or
sign + index); the paper's Golomb coding is a little smaller.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError, ShapeMismatchError, TargetError


@torch.no_grad()
def delta_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, kept energy)`` with ``B A = [ΔW]_r`` (balanced ``Σ^½`` split)."""
    from .svd import svd

    d = svd(delta)
    b, a = d.factors(rank)
    return b, a, d.kept_energy(rank)


def differing_modules(base: nn.Module, finetuned: nn.Module, skip: list[str], atol: float = 0.0) -> list[str]:
    """Leaf modules of ``base`` outside ``skip`` whose own parameters differ from ``finetuned``'s."""
    ft = dict(finetuned.named_modules())
    out = []
    for name, m in base.named_modules():
        if not name or name in skip or any(name.startswith(s + ".") for s in skip):
            continue
        own = dict(m.named_parameters(recurse=False))
        if not own or name not in ft:
            continue
        other = dict(ft[name].named_parameters(recurse=False))
        for pname, p in own.items():
            q = other.get(pname)
            if q is None or q.shape != p.shape:
                raise ShapeMismatchError(f"extract: parameter '{name}.{pname}' has shape {tuple(p.shape)} in the base "
                                         f"model and {None if q is None else tuple(q.shape)} in the fine-tuned one; "
                                         "give models of the same architecture.")
            if not torch.allclose(p, q, rtol=0.0, atol=atol):
                out.append(name)
                break
    return out


@torch.no_grad()
def compeft_tensor(t: torch.Tensor, density: float, alpha: float) -> tuple[torch.Tensor, int]:
    """ComPEFT of one tensor: ``(ternary tensor, bytes stored)``."""
    flat = t.detach().float().flatten()
    n = flat.numel()
    k = max(1, int(round(density * n)))
    keep = torch.zeros(n, dtype=torch.bool, device=t.device)
    keep[flat.abs().topk(k).indices] = True
    scale = alpha * float(flat.std()) if n > 1 else alpha * float(flat.abs().max())
    out = torch.where(keep, torch.sign(flat) * scale, torch.zeros_like(flat)).view_as(t).to(t.dtype)
    bits = min(2 * n, k * (1 + max(1, math.ceil(math.log2(n)))))
    return out, (bits + 7) // 8 + 4


def check_compeft(density, alpha) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ConfigError(f"compeft: density={density!r} must be in (0, 1]: the fraction of entries kept (paper: 0.05–0.2).")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ConfigError(f"compeft: alpha={alpha!r} must be a positive number (the scale of σ(τ); paper tunes it, 1 is a start).")


def adapter_tensors(model: nn.Module, name: str) -> list[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` of adapter ``name``'s trained tensors (layers only)."""
    from ..core.api import adapted_layers, adapter_state

    state = adapter_state(model)
    if name not in state:
        raise TargetError(f"compeft: the model has no adapter '{name}'; it has {sorted(state) or 'none'} "
                          "(rw.adapt / rw.load one first, or pass adapter=<name>).")
    out = []
    for lname, layer in adapted_layers(model):
        if name in layer.adapters:
            out += [(f"{lname}.{p}", t) for p, t in layer.adapters[name].named_parameters()]
    return out
