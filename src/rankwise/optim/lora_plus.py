"""Learning-rate rules for LoRA factors: LoRA+ param groups and ALLoRA's norm-scaled row learning rates.

**LoRA+** (Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024,
arXiv:2402.12354). With ``ΔW = s·B A`` and width ``n → ∞``, one learning rate for both factors
is inefficient: ``B`` should move ``λ = η_B/η_A ≫ 1`` times faster (the paper uses 2⁴ for most
tasks). :func:`lora_plus` returns ``torch.optim`` param groups over a rankwise-adapted model:

    A factors (and every other trainable matrix)     lr
    B factors and every trainable vector (biases…)   lr · ratio
    A/B of adapted embeddings                         lr_embedding (when given)

This is the grouping of the authors' code and of ``peft.optimizers.create_loraplus_optimizer``,
weight decay included: by default (``decay_vectors=None``) the vectors whose name contains
``"bias"`` and the parameters of ``nn.LayerNorm`` modules get no decay, every other parameter gets
``weight_decay`` (PEFT builds this list with transformers' ``get_parameter_names(model,
ALL_LAYERNORM_LAYERS)``, so RMSNorm weights *are* decayed there too). ``decay_vectors=True``
decays every vector, ``False`` none. ``tests/optim/test_lora_plus.py`` checks that three AdamW
steps with decay equal PEFT's on a model with trainable biases and norms. Use the groups with any
optimizer: ``torch.optim.AdamW(lora_plus(model, 2e-4, 16))``.

**ALLoRA** (Huang & Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws",
arXiv:2410.09692). Dropout-free, scaling-free LoRA with an adaptive learning rate: each row ``i``
of a LoRA factor moves with its own rate, inversely proportional to the row's ℓ2 norm,

    c_i = 1 / sqrt(‖θ_i‖² + 1/η²),      θ_i ← θ_i − lr · c_i · u_i

where ``u_i`` is AdamW's update of the row (``m̂/(√v̂ + ε) + λθ``: the per-row rate scales the
decoupled decay too) and ``c_i`` is taken from ``θ`` before the step. A row at 0 (the
zero-initialized ``B``) has ``c = η`` and moves ``η`` times faster than under AdamW; the boost fades
as the row grows (``c → 1/‖θ_i‖``). The coefficient multiplies the *update*, not the gradient: under
Adam a per-row gradient scale that varies slowly cancels in ``m/√v`` (scaling the gradient by
``c`` moved a zero ``B`` exactly as far as plain AdamW). Under plain SGD the two readings coincide;
``apply_to="gradient"`` keeps the literal one (the abstract's "scaling the per sample and per
parameter gradients"). :func:`allora` returns the param groups (LoRA factors marked with
``allora_eta``) and :class:`ALLoRA` is ``torch.optim.AdamW`` with the per-row rate on the marked
groups (``granularity="row"``; ``"tensor"`` uses the norm of the whole factor). Train the adapters
with ``dropout=0`` and ``alpha=rank`` (scale 1), as the paper prescribes. The paper's text could
not be consulted here beyond its abstract, hence the option.
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
              lr_embedding: float | None = None, decay_vectors: bool | None = None) -> list[dict]:
    """LoRA+ param groups: ``B`` factors (and trainable vectors) at ``lr * ratio``, the rest at ``lr``.

    ``lr_embedding``: learning rate of the factors of adapted embeddings (PEFT's default is 1e-6);
    ``None`` treats them like other factors. ``decay_vectors``: ``None`` (default) follows PEFT and
    the authors — the vectors in the B group whose name contains ``"bias"`` or that belong to an
    ``nn.LayerNorm`` get no weight decay, the others do; ``True`` decays every vector; ``False``
    none. Empty groups are left out. Each group carries a ``"name"`` key ("lora_A", "lora_B",
    "lora_B_no_decay", "embedding").
    """
    if lr <= 0:
        raise ConfigError(f"lora_plus: lr={lr}; give the learning rate of the A factors (> 0), e.g. 2e-4.")
    if ratio <= 0:
        raise ConfigError(f"lora_plus: ratio={ratio}; it is η_B/η_A and must be > 0 (the paper uses 16, "
                          "values >= 1 are the useful ones).")
    if lr_embedding is not None and lr_embedding <= 0:
        raise ConfigError(f"lora_plus: lr_embedding={lr_embedding}; give a positive rate or None.")
    if decay_vectors not in (None, True, False):
        raise ConfigError(f"lora_plus: decay_vectors={decay_vectors!r}; use None (PEFT's rule: no decay for "
                          "biases and LayerNorm parameters), True (decay every vector) or False (none).")
    in_layernorm = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm)
                    for p in m.parameters(recurse=False)}
    groups = {"lora_A": [], "embedding": [], "lora_B": [], "lora_B_no_decay": []}
    n_factors = 0
    for name, p, kind, is_embed in _lora_params(model):
        n_factors += kind is not None
        if is_embed and kind is not None and lr_embedding is not None:
            groups["embedding"].append(p)
        elif kind == "B" or p.ndim == 1:
            if kind == "B" or decay_vectors is True:
                decay = True
            elif decay_vectors is False:
                decay = False
            else:
                decay = "bias" not in name and id(p) not in in_layernorm
            groups["lora_B" if decay else "lora_B_no_decay"].append(p)
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
        raise ConfigError(f"allora: eta={eta}; it must be > 0 (a row at 0 moves eta times faster than under "
                          "AdamW).")
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
    """``torch.optim.AdamW`` with ALLoRA's per-row learning rate ``lr · c_i``,
    ``c_i = 1/sqrt(‖θ_i‖² + 1/η²)`` (from ``θ`` before the step), on groups with ``allora_eta``.

    ``params``: usually ``allora(model, lr, eta)``; plain params get ``eta`` (default 1.0) from the
    constructor. ``granularity``: "row" (each output row's norm) or "tensor" (one norm per factor).
    ``apply_to``: "update" (default; the AdamW update, decay included, is scaled by ``c``) or
    "gradient" (the gradient is scaled before AdamW; Adam's normalisation then largely cancels it).
    The ``.grad`` of the parameters is left as the caller's (scaled in place with "gradient").
    """

    APPLY_TO = ("update", "gradient")

    def __init__(self, params, lr: float = 1e-3, eta: float = 1.0, granularity: str = "row",
                 apply_to: str = "update", **adamw_kwargs):
        if granularity not in ("row", "tensor"):
            raise ConfigError(f"ALLoRA: granularity={granularity!r}; use 'row' (each output row's norm) or "
                              "'tensor'.")
        if apply_to not in self.APPLY_TO:
            raise ConfigError(f"ALLoRA: apply_to={apply_to!r}; use 'update' (per-row learning rate, default) "
                              "or 'gradient' (scale the gradient before AdamW).")
        if eta <= 0:
            raise ConfigError(f"ALLoRA: eta={eta}; it must be > 0.")
        self.granularity = granularity
        self.apply_to = apply_to
        super().__init__(params, lr=lr, **adamw_kwargs)
        for g in self.param_groups:
            g.setdefault("allora_eta", eta)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        before = []  # (param, coefficient, θ before the step) for the "update" rule
        for group in self.param_groups:
            eta = group.get("allora_eta")
            if eta is None:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                coef = allora_scale(p, eta, self.granularity)
                if self.apply_to == "gradient":
                    p.grad.mul_(coef.to(p.grad.dtype))
                else:
                    before.append((p, coef, p.detach().clone()))
        super().step()
        for p, coef, old in before:
            # θ_old + c · (θ_AdamW − θ_old): AdamW's whole update (Adam step and decoupled decay) at rate lr·c
            delta = (p.detach() - old).to(coef.dtype).mul_(coef)
            p.copy_(old.add_(delta.to(old.dtype)))
        return loss
