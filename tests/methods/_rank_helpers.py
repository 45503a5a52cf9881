"""Helpers shared by the rank-allocation tests (adalora, increlora, aflora, dylora)."""

from __future__ import annotations

import math

import torch
from torch import nn

import rankwise as rw
from rankwise.core.adapted import AdaptedLayer
from rankwise.train import TrainConfig, train

ATOL = 1e-5


class Net(nn.Module):
    def __init__(self, dims=(6, 5, 7, 4), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2, self.l3 = (nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


class Weighted(nn.Module):
    """Two parallel layers; the loss weighs ``hot``'s output 100x more than ``cold``'s."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hot, self.cold = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return 10 * self.hot(x), 0.1 * self.cold(x)


def x_batch(seed=0, n=8, d=6):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def adapters(model, name="default"):
    return {n: m.adapters[name] for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def fill(params, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def train_net(method, steps=12, **kw):
    """``rankwise.train`` on Net (total_step left None: the loop's length reaches the schedules)."""
    model = rw.adapt(Net(), method, targets=["l1", "l2", "l3"], seed=0, **kw)
    data = [(x_batch(i, n=1)[0], torch.ones(4)) for i in range(32)]

    def collate(items):
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    def loss_fn(m, batch):
        return (m(batch[0]) - batch[1]).square().mean()

    res = train(model, data, collate, loss_fn, TrainConfig(steps=steps, batch_size=4, lr=0.05, warmup=0),
                progress=False)
    assert all(math.isfinite(v) for v in res.losses)
    return model
