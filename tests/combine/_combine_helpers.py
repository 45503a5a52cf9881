"""Shared fixtures for the combine tests: a tiny model with LoRA adapters of mixed ranks and scales,
and the same adapters on a PEFT ``get_peft_model`` copy (the oracle for PEFT's ``add_weighted_adapter``)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import rankwise as rw

TARGETS = ["q", "v", "up"]


class Net(nn.Module):
    """Non-square layers so that a transposed layout shows; an embedding and a head for the odd kinds."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.q = nn.Linear(8, 6)
        self.v = nn.Linear(6, 9)
        self.up = nn.Linear(9, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, ids):
        return self.head(self.up(self.v(self.q(self.emb(ids)))))


def base(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def add_lora(model, name, rank, alpha, seed, targets=TARGETS, **kw):
    """A LoRA adapter with random (non-zero) A and B."""
    rw.adapt(model, "lora", name=name, rank=rank, alpha=alpha, targets=targets, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    for _, layer in rw.core.api.adapted_layers(model):
        if name in layer.adapters:
            ad = layer.adapters[name]
            with torch.no_grad():
                ad.lora_A.copy_(torch.randn(ad.lora_A.shape, generator=g))
                ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g))
    return model


NAMES = ("math", "code")  # PEFT warns on adapter names that are substrings of its "lora_" prefix


def two_adapters(ranks=(3, 5), alphas=(6.0, 2.5), targets=TARGETS):
    """Adapters "math" (rank 3, s = 2) and "code" (rank 5, s = 0.5) on q, v, up."""
    model = base()
    add_lora(model, NAMES[0], ranks[0], alphas[0], 1, targets)
    add_lora(model, NAMES[1], ranks[1], alphas[1], 2, targets)
    return model


def perturb(model, name, seed=5, std=0.3):
    """Move every parameter of adapter ``name`` off its init (so a method with ΔW = 0 at init has an update)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in rw.core.api.adapted_layers(model):
            if name in layer.adapters:
                for p in layer.adapters[name].parameters():
                    p.add_(std * torch.randn(p.shape, generator=g).to(p))


def fingerprint(model):
    """Everything combine must leave alone on failure: tensors, adapters, active and merged lists."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layers = {n: (list(lay.active), list(lay.merged)) for n, lay in rw.core.api.adapted_layers(model)}
    return state, sorted(rw.core.api.adapter_state(model)), layers


def same_fingerprint(a, b) -> bool:
    return (a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
            and a[1:] == b[1:])


def delta(model, adapter: str) -> dict[str, torch.Tensor]:
    """ΔW of ``adapter`` per adapted module, in the base weight's layout."""
    return {n: layer.delta_weight([adapter]).detach().clone() for n, layer in rw.core.api.adapted_layers(model)
            if adapter in layer.adapters}


def peft_copy(model, adapters, base_model=None):
    """A PEFT LoRA model on a copy of ``model``'s base with the same adapter tensors (same r, alpha)."""
    from peft import LoraConfig, get_peft_model

    state = rw.core.api.adapter_state(model)
    plain = base_model if base_model is not None else base()
    plain = copy.deepcopy(plain)
    layers = dict(rw.core.api.adapted_layers(model))
    pm = None
    for a in adapters:
        cfg = state[a]["config"]
        pcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=list(state[a]["modules"]),
                          lora_dropout=0.0, init_lora_weights=False)
        if pm is None:
            pm = get_peft_model(plain, pcfg, adapter_name=a)
        else:
            pm.add_adapter(a, pcfg)
    with torch.no_grad():
        for mname, layer in layers.items():
            target = pm.base_model.model.get_submodule(mname)
            for a in adapters:
                if a in layer.adapters:
                    target.lora_A[a].weight.copy_(layer.adapters[a].lora_A)
                    target.lora_B[a].weight.copy_(layer.adapters[a].lora_B)
    return pm


def peft_delta(pm, adapter: str) -> dict[str, torch.Tensor]:
    out = {}
    for mname, m in pm.base_model.model.named_modules():
        if hasattr(m, "lora_A") and adapter in m.lora_A:
            out[mname] = m.get_delta_weight(adapter).detach().clone()
    return out
