"""Shared by the optimizer tests: a seeded 1-layer LLaMA training trajectory."""

from __future__ import annotations

import torch

STEPS = 50


def _batches(n: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 100, (2, 12), generator=g) for _ in range(n)]


def _trajectory(llama, make_opt, dtype=torch.float64, steps: int = STEPS):
    """Loss of a 1-layer LLaMA (hidden 32) trained ``steps`` steps on seeded random tokens."""
    model = llama(0).to(dtype).train()
    opt = make_opt(model)
    losses = []
    for ids in _batches(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64), model, opt


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs()).max())
