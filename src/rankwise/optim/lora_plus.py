"""Learning-rate rules for LoRA factors: LoRA+ param groups and ALLoRA's norm-scaled gradients.

**LoRA+** (Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024,
arXiv:2402.12354). With ``ΔW = s·B A`` and width ``n → ∞``, one learning rate for both factors
is inefficient: ``B`` should move ``λ = η_B/η_A ≫ 1`` times faster (the paper uses 2⁴ for most
tasks). :func:`lora_plus` returns ``torch.optim`` param groups over a rankwise-adapted model:

    A factors (and every other trainable matrix)     lr
    B factors and every trainable vector (biases…)   lr · ratio
    A/B of adapted embeddings                         lr_embedding (when given)

This is the grouping of the authors' code and of ``peft.optimizers.create_loraplus_optimizer``
(vectors join B there too, and only parameters of matrices get weight decay when
``decay_vectors=False``); ``tests/test_optim_more.py`` checks that a step equals PEFT's on the same
model. Use the groups with any optimizer: ``torch.optim.AdamW(lora_plus(model, 2e-4, 16))``.

**ALLoRA** (Huang & Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws",
arXiv:2410.09692). Dropout-free, scaling-free LoRA in which the gradient of each parameter row is
scaled by a coefficient inversely proportional to that row's ℓ2 norm:

    g_i ← g_i / sqrt(‖θ_i‖² + 1/η²)

so a row at 0 (the zero-initialized ``B``) moves ``η`` times faster and the boost fades as it
grows. :func:`allora` returns the param groups (LoRA factors marked with ``allora_eta``) and
:class:`ALLoRA` is ``torch.optim.AdamW`` that applies the scaling to the marked groups before its
step (``granularity="row"``; ``"tensor"`` uses the norm of the whole factor). Train the adapters
with ``dropout=0`` and ``alpha=rank`` (scale 1), as the paper prescribes. After ``step`` the
``.grad`` of marked parameters holds the scaled gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["ALLoRA", "allora", "lora_plus"]


def _lora_params(model: nn.Module):
    """Yield ``(name, param, kind, is_embedding)`` for every trainable parameter; ``kind`` is
    "A", "B" or None (not a LoRA factor)."""
    from ..core.adapted import AdaptedLayer

    embed_ids = set()
    for m in model.modules():
        if isinstance(m, AdaptedLayer) and m.view.kind == "embedding":
            embed_ids |= {id(p) for p in m.adapters.parameters()}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        kind = "A" if leaf in ("lora_A", "lora_embedding_A") else "B" if leaf in ("lora_B", "lora_embedding_B") else None
        yield name, p, kind, id(p) in embed_ids


def lora_plus(model: nn.Module, lr: float, ratio: float = 16.0, *, weight_decay: float = 0.0,
              lr_embedding: float | None = None, decay_vectors: bool = True) -> list[dict]:
    """LoRA+ param groups: ``B`` factors (and trainable vectors) at ``lr * ratio``, the rest at ``lr``.

    ``lr_embedding``: learning rate of the factors of adapted embeddings (PEFT's default is 1e-6);
    ``None`` treats them like other factors. ``decay_vectors=False`` gives the vectors in the B
    group no weight decay (PEFT excludes biases and norm weights from decay). Empty groups are
    left out. Each group carries a ``"name"`` key ("lora_A", "lora_B", "lora_B_no_decay",
    "embedding").
    """
    if lr <= 0:
        raise ConfigError(f"lora_plus: lr={lr}; give the learning rate of the A factors (> 0), e.g. 2e-4.")
    if ratio <= 0:
        raise ConfigError(f"lora_plus: ratio={ratio}; it is η_B/η_A and must be > 0 (the paper uses 16, "
                          "values >= 1 are the useful ones).")
    if lr_embedding is not None and lr_embedding <= 0:
        raise ConfigError(f"lora_plus: lr_embedding={lr_embedding}; give a positive rate or None.")
    groups = {"lora_A": [], "embedding": [], "lora_B": [], "lora_B_no_decay": []}
    n_factors = 0
    for _name, p, kind, is_embed in _lora_params(model):
        n_factors += kind is not None
        if is_embed and kind is not None and lr_embedding is not None:
            groups["embedding"].append(p)
        elif kind == "B" or p.ndim == 1:
            groups["lora_B" if (decay_vectors or kind == "B") else "lora_B_no_decay"].append(p)
        else:
            groups["lora_A"].append(p)
    if n_factors == 0:
        raise ConfigError(f"lora_plus: {type(model).__name__} has no trainable LoRA factors (lora_A / lora_B); "
                          "adapt it first, e.g. rw.adapt(model, 'lora', rank=8).")
    rates = {"lora_A": lr, "embedding": lr_embedding, "lora_B": lr * ratio, "lora_B_no_decay": lr * ratio}
    return [{"params": ps, "lr": rates[k], "weight_decay": 0.0 if k == "lora_B_no_decay" else weight_decay,
             "name": k} for k, ps in groups.items() if ps]


def allora(model: nn.Module, lr: float, eta: float = 1.0, *, weight_decay: float = 0.0) -> list[dict]:
    """ALLoRA param groups: the LoRA factors (marked ``allora_eta=eta``) and the other trainables."""
    if lr <= 0:
        raise ConfigError(f"allora: lr={lr}; it must be > 0.")
    if eta <= 0:
        raise ConfigError(f"allora: eta={eta}; it must be > 0 (a row at 0 gets its gradient scaled by eta).")
    factors, rest = [], []
    for _name, p, kind, _ in _lora_params(model):
        (factors if kind is not None else rest).append(p)
    if not factors:
        raise ConfigError(f"allora: {type(model).__name__} has no trainable LoRA factors; adapt it first, "
                          "e.g. rw.adapt(model, 'lora', rank=8, alpha=8, dropout=0.0).")
    groups = [{"params": factors, "lr": lr, "weight_decay": weight_decay, "allora_eta": eta, "name": "lora"}]
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay, "allora_eta": None, "name": "other"})
    return groups


def allora_scale(p: torch.Tensor, eta: float, granularity: str = "row") -> torch.Tensor:
    """``1 / sqrt(‖θ‖² + 1/η²)`` per row of ``p`` (shape ``(rows, 1, ...)``) or for the whole tensor."""
    w = p.detach().float() if p.dtype in (torch.float16, torch.bfloat16) else p.detach()
    if granularity == "tensor" or w.dim() < 2:
        sq = w.square().sum()
    else:
        sq = w.square().sum(dim=tuple(range(1, w.dim())), keepdim=True)
    return (sq + 1.0 / eta**2).rsqrt()


class ALLoRA(torch.optim.AdamW):
    """``torch.optim.AdamW`` that scales the gradient of groups with ``allora_eta`` by ALLoRA's
    ``1/sqrt(‖θ_row‖² + 1/η²)`` before each step. ``params``: usually ``allora(model, lr, eta)``;
    plain params get ``eta`` (default 1.0) from the constructor."""

    def __init__(self, params, lr: float = 1e-3, eta: float = 1.0, granularity: str = "row", **adamw_kwargs):
        if granularity not in ("row", "tensor"):
            raise ConfigError(f"ALLoRA: granularity={granularity!r}; use 'row' (each output row's norm) or 'tensor'.")
        if eta <= 0:
            raise ConfigError(f"ALLoRA: eta={eta}; it must be > 0.")
        self.granularity = granularity
        super().__init__(params, lr=lr, **adamw_kwargs)
        for g in self.param_groups:
            g.setdefault("allora_eta", eta)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eta = group.get("allora_eta")
            if eta is None:
                continue
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(allora_scale(p, eta, self.granularity).to(p.grad.dtype))
        super().step()
        return loss
