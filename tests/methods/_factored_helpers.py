"""Helpers shared by the tests of lotr, flora_tucker, compacter, hydra, sora and lamda."""

from __future__ import annotations

import torch

from rankwise.core.adapted import AdaptedLayer

ATOL = 1e-5


def _layers(model) -> dict[str, AdaptedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _perturb(params, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _unique_adapter_params(model):
    seen, out = set(), []
    for layer in _layers(model).values():
        for p in layer.adapters.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out
