"""LaMDA: spectral init (SVD of W0), the freezing schedule, save/load of the frozen state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core.api import adapter_state
from rankwise.errors import ConfigError
from rankwise.methods import lamda

pytestmark = pytest.mark.usefixtures("single_thread")


def test_lamda_init_is_the_spectrum_of_w0():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 10))
    rw.adapt(net, "lamda", rank=4, targets=["0"], seed=0)
    ad = net[0].adapters["default"]
    u, s, vh = torch.linalg.svd(net[0].base.weight.detach(), full_matrices=False)
    # the same top-4 singular vectors up to sign (randomized SVD, exact here: sketch width
    # min(r + 8, 10, 40) = 10 spans the whole range)
    torch.testing.assert_close((u[:, :4].t() @ ad.lamda_B).abs(), torch.eye(4), atol=1e-4, rtol=0)
    torch.testing.assert_close((vh[:4] @ ad.lamda_A.t()).abs(), torch.eye(4), atol=1e-4, rtol=0)
    assert torch.count_nonzero(ad.lamda_S) == 0
    assert "lamda_A" in dict(ad.named_buffers()) and not any("lamda_A" in n for n, _ in ad.named_parameters())
    assert rw.parameter_count(net).trainable == 4 * 4 + 10 * 4
    # randomized SVD on a layer where the sketch is narrower than the matrix: still the top subspace
    big = nn.Sequential(nn.Linear(200, 120))
    with torch.no_grad():  # a clear spectral gap after the top 3
        q1 = torch.linalg.qr(torch.randn(120, 120)).Q
        q2 = torch.linalg.qr(torch.randn(200, 120)).Q
        sv = torch.cat([torch.tensor([10.0, 8.0, 6.0]), torch.full((117,), 0.5)])
        big[0].weight.copy_(q1 @ torch.diag(sv) @ q2.t())
    rw.adapt(big, "lamda", rank=3, targets=["0"], seed=1)
    b = big[0].adapters["default"].lamda_B
    torch.testing.assert_close((q1[:, :3].t() @ b).abs(), torch.eye(3), atol=1e-3, rtol=0)


def test_lamda_freezing_schedule(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(9, 7))
    net = copy.deepcopy(base)
    rw.adapt(net, "lamda", rank=4, freeze_steps=8, targets=["0"], seed=0)
    ad = net[0].adapters["default"]
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    x = torch.randn(16, 9, generator=torch.Generator().manual_seed(1))
    snapshots = {}
    for step in range(1, 11):
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        frozen = lamda.freeze_step(net, step)["0"]
        assert frozen == min(4, step * 4 // 8)  # column j frozen at step ⌈8 (j+1) / 4⌉
        for j in range(frozen):  # largest singular value first: columns 0, 1, …
            snapshots.setdefault(j, ad._b()[:, j].detach().clone())
        for j, col in snapshots.items():  # a frozen column never moves again (momentum, weight decay)
            assert torch.equal(ad._b()[:, j], col), (step, j)
        if frozen < 4:
            assert ad.lamda_B.requires_grad
    assert not ad.lamda_B.requires_grad, "fully frozen: B stops requiring gradients"
    assert rw.parameter_count(net).trainable == 4 * 4
    # saved and loaded with its frozen state
    rw.save(net, tmp_path / "ad")
    fresh = copy.deepcopy(base)
    rw.load(fresh, tmp_path / "ad", trainable=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))
    assert rw.parameter_count(fresh).trainable == 16 and not fresh[0].adapters["default"].lamda_B.requires_grad


def test_lamda_freeze_options():
    net = nn.Sequential(nn.Linear(9, 7))
    rw.adapt(net, "lamda", rank=3, freeze_steps=0, targets=["0"], seed=0)
    assert rw.parameter_count(net).trainable == 9 == rw.get_method("lamda").num_params(
        net[0].view, adapter_state(net)["default"]["config"])
    net = nn.Sequential(nn.Linear(9, 7))
    rw.adapt(net, "lamda", rank=3, freeze_steps=3, freeze_order="smallest", targets=["0"], seed=0)
    lamda.freeze_step(net, 1)
    assert net[0].adapters["default"].lamda_frozen.tolist() == [False, False, True]
    with pytest.raises(ConfigError, match="freeze_order"):
        rw.adapt(nn.Sequential(nn.Linear(4, 4)), "lamda", rank=2, freeze_order="random", targets=["0"])
    with pytest.raises(ConfigError, match="step"):
        lamda.freeze_step(net, -1)


def test_train_runs_lamda_freezing():
    from rankwise.train import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(12, generator=g), torch.randn(10, generator=g)) for _ in range(32)]

    def collate(items):
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    def loss_fn(m, batch):
        return (m(batch[0]) - batch[1]).square().mean()

    cfg = TrainConfig(steps=6, batch_size=4, lr=0.05, warmup=0, weight_decay=0.0)
    # LaMDA: B frozen column by column over freeze_steps=4 optimizer steps
    net = rw.adapt(nn.Sequential(nn.Linear(12, 10)), "lamda", rank=4, freeze_steps=4, targets=["0"], seed=0)
    train(net, data, collate, loss_fn, cfg, progress=False)
    ad = net[0].adapters["default"]
    assert ad.frozen_columns() == 4 and not ad.lamda_B.requires_grad
    assert rw.parameter_count(net).trainable == 16


def test_lamda_registered_with_docs():
    doc = __import__("rankwise.methods.lamda", fromlist=["_"]).__doc__
    assert "arXiv" in doc and "Parameters" in doc
    cls = rw.get_method("lamda")
    assert cls.summary and cls.default_lr > 0
