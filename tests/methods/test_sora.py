"""SoRA: soft-thresholding, pruning, the rank_step hook, and the authors' SparseAdamW step
(github.com/TsinghuaC3I/SoRA, transcribed) as oracle."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from _factored_helpers import ATOL, _layers, _logits, _perturb, _unique_adapter_params
from torch import nn

import rankwise as rw
from rankwise.core.api import adapter_state
from rankwise.errors import ConfigError
from rankwise.methods import sora

pytestmark = pytest.mark.usefixtures("single_thread")


def test_sora_proximal_step_is_soft_thresholding():
    net = nn.Sequential(nn.Linear(8, 6))
    rw.adapt(net, "sora", rank=5, targets=["0"], seed=0)
    ad = net[0].adapters["default"]
    g0 = torch.tensor([0.5, -0.05, 0.2, -0.9, 0.1])
    with torch.no_grad():
        ad.sora_gate.copy_(g0)
    nonzero = sora.proximal_step(net, lr=0.5, lam=0.3)  # threshold 0.15
    expect = torch.tensor([0.35, 0.0, 0.05, -0.75, 0.0])
    torch.testing.assert_close(ad.sora_gate.detach(), expect, atol=1e-7, rtol=0)
    assert nonzero == 3
    assert sora.gate_parameters(net) == [ad.sora_gate]
    with pytest.raises(ConfigError):
        sora.proximal_step(net, lr=-1.0, lam=0.1)


def _sora_bert(bert):
    base = bert()
    model = copy.deepcopy(base)
    rw.adapt(model, "sora", rank=4, alpha=8.0, targets=["query", "value"], seed=0)
    _perturb([p for p in _unique_adapter_params(model) if p.dim() == 2], seed=1)
    return base, model


def test_sora_prune_shrinks_and_keeps_the_update(bert, token_batch, tmp_path):
    base, model = _sora_bert(bert)
    layers = _layers(model)
    q0 = "bert.encoder.layer.0.attention.self.query"
    gates = {q0: [0.0, 1.5, 0.0, -0.7]}  # rank 2 left; value of layer 1 loses everything
    gates["bert.encoder.layer.1.attention.self.value"] = [0.0, 0.0, 0.0, 0.0]
    with torch.no_grad():
        for n, g in gates.items():
            layers[n].adapters["default"].sora_gate.copy_(torch.tensor(g))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    model(**token_batch).logits.square().mean().backward()
    opt.step()  # so the optimizer holds state (Adam moments) for the parameters prune() cuts
    opt.zero_grad()
    with torch.no_grad():
        for n, g in gates.items():  # the step moved the gates; put the zeros back
            layers[n].adapters["default"].sora_gate.copy_(torch.tensor(g))
        deltas = {n: layer.delta_weight().clone() for n, layer in layers.items()}
    before = _logits(model.eval(), token_batch)
    n_before = rw.parameter_count(model).trainable

    ranks = sora.prune(model, optimizer=opt)["default"]
    assert ranks[q0] == 2 and ranks["bert.encoder.layer.1.attention.self.value"] == 0
    ad = layers[q0].adapters["default"]
    assert tuple(ad.sora_A.shape) == (2, 32) and tuple(ad.sora_B.shape) == (32, 2) and ad.sora_gate.numel() == 2
    assert ad.scale == 2.0, "s = α / r₀ keeps the initial rank"
    for n, layer in layers.items():
        torch.testing.assert_close(layer.delta_weight(), deltas[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model, token_batch), before, atol=ATOL, rtol=ATOL)
    assert rw.parameter_count(model).trainable == n_before - 2 * (32 + 32 + 1) - 4 * (32 + 32 + 1)
    cfg = adapter_state(model)["default"]["config"]
    assert cfg.rank_pattern == {q0: 2, "bert.encoder.layer.1.attention.self.value": 0}
    for n, layer in layers.items():
        expect = cfg.rank_of(n) * (32 + 32 + 1)
        assert rw.get_method("sora").num_params(layer.view, layer.adapters["default"].config) == expect
    # the optimizer's state was cut with the parameters: training goes on
    model.train()
    model(**token_batch).logits.square().mean().backward()
    opt.step()
    assert opt.state[ad.sora_A]["exp_avg"].shape == ad.sora_A.shape

    # the saved file records the pruned ranks; rw.load rebuilds them
    rw.save(model, tmp_path / "ad")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["adapters"]["default"]["config"]["rank_pattern"][q0] == 2
    fresh = copy.deepcopy(base)
    rw.load(fresh, tmp_path / "ad", trainable=True)
    assert _layers(fresh)[q0].adapters["default"].rank == 2
    assert torch.equal(_logits(fresh, token_batch), _logits(model.eval(), token_batch))
    assert rw.parameter_count(fresh).trainable == rw.parameter_count(model).trainable


def test_sora_training_sparsifies_gates():
    """Proximal gradient descent on the gates (SGD step, then soft-thresholding, as in the paper)
    with AdamW on A, B: on a rank-1 target, λ drives unneeded gates to exactly zero while the
    loss still falls; prune then removes those ranks."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10))
    w_true = torch.randn(10, 1, generator=g) @ torch.randn(1, 12, generator=g)  # a rank-1 target update
    x = torch.randn(256, 12, generator=g)
    y = net(x).detach() + x @ w_true.t()
    rw.adapt(net, "sora", rank=6, targets=["0"], seed=0)
    ad = net[0].adapters["default"]
    opt = torch.optim.AdamW([ad.sora_A, ad.sora_B], lr=0.02, weight_decay=0.0)
    gate_opt = torch.optim.SGD(sora.gate_parameters(net), lr=0.1)
    losses = []
    for _ in range(300):
        loss = F.mse_loss(net(x), y)
        opt.zero_grad()
        gate_opt.zero_grad()
        loss.backward()
        opt.step()
        gate_opt.step()
        sora.proximal_step(net, lr=0.1, lam=0.1)
        losses.append(loss.item())
    assert losses[-1] < 1e-3 * losses[0]
    alive = int(torch.count_nonzero(ad.sora_gate))
    assert 1 <= alive < 6
    with torch.no_grad():
        before = net(x)
    assert sora.prune(net)["default"]["0"] == alive == ad.rank
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, atol=ATOL, rtol=ATOL)


def test_sora_rank_step_thresholds_by_the_gate_group_lr_and_prunes_at_the_end():
    net = nn.Sequential(nn.Linear(8, 6))
    rw.adapt(net, "sora", rank=5, lam=0.3, targets=["0"], seed=0)
    ad = net[0].adapters["default"]
    _perturb([ad.sora_B], seed=3)
    with torch.no_grad():
        ad.sora_gate.copy_(torch.tensor([0.5, -0.05, 0.2, -0.9, 0.1]))
    # the gates sit in their own group with lr 0.5 (threshold 0.15); A, B in another
    opt = torch.optim.SGD([{"params": [ad.sora_A, ad.sora_B], "lr": 9.0}, {"params": [ad.sora_gate], "lr": 0.5}])
    info = rw.rank_step(net, 1, opt, total_steps=2)
    torch.testing.assert_close(ad.sora_gate.detach(), torch.tensor([0.35, 0.0, 0.05, -0.75, 0.0]), atol=1e-7, rtol=0)
    assert info == {"default": {"nonzero gates": 3}}
    a_full, b_full = ad.sora_A.detach().clone(), ad.sora_B.detach().clone()
    info = rw.rank_step(net, 2, opt, total_steps=2)  # last step: threshold again, then prune
    expect = torch.tensor([0.2, -0.6])  # 0.05 hits zero at the second threshold
    assert info["default"]["ranks"] == {"0": 2} and ad.rank == 2
    torch.testing.assert_close(ad.sora_gate.detach(), expect, atol=1e-7, rtol=0)
    # ΔW of the pruned adapter = the unpruned factors with the twice-thresholded gate (zeros included)
    gate2 = torch.tensor([0.2, 0.0, 0.0, -0.6, 0.0])
    torch.testing.assert_close(net[0].delta_weight(), ad.scale * (b_full * gate2) @ a_full, atol=1e-6, rtol=0)
    # no optimizer holding the gates: no proximal step
    net2 = nn.Sequential(nn.Linear(8, 6))
    rw.adapt(net2, "sora", rank=3, targets=["0"], seed=0)
    gate0 = net2[0].adapters["default"].sora_gate.detach().clone()
    assert rw.rank_step(net2, 1, None) == {}
    assert torch.equal(net2[0].adapters["default"].sora_gate, gate0)


def test_train_runs_sora_proximal_steps():
    from rankwise.train import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(12, generator=g), torch.randn(10, generator=g)) for _ in range(32)]

    def collate(items):
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    def loss_fn(m, batch):
        return (m(batch[0]) - batch[1]).square().mean()

    cfg = TrainConfig(steps=6, batch_size=4, lr=0.05, warmup=0, weight_decay=0.0)
    # SoRA with a λ so large that the first threshold (λ·lr = 50·0.05) zeroes every gate: all ranks pruned
    net = rw.adapt(nn.Sequential(nn.Linear(12, 10)), "sora", rank=4, lam=50.0, targets=["0"], seed=0)
    train(net, data, collate, loss_fn, cfg, progress=False)
    assert net[0].adapters["default"].rank == 0
    assert adapter_state(net)["default"]["config"].rank_pattern == {"0": 0}
    # λ = 0: plain training, no pruning
    net = rw.adapt(nn.Sequential(nn.Linear(12, 10)), "sora", rank=4, lam=0.0, targets=["0"], seed=0)
    train(net, data, collate, loss_fn, cfg, progress=False)
    assert net[0].adapters["default"].rank == 4


def test_sora_registered_with_docs():
    doc = __import__("rankwise.methods.sora", fromlist=["_"]).__doc__
    assert "arXiv" in doc and "Parameters" in doc
    cls = rw.get_method("sora")
    assert cls.summary and cls.default_lr > 0


def _reference_sparse_adamw_step(p, grad, state, lr, xi, betas=(0.9, 0.999), eps=1e-8):
    """``SparseAdamW.step`` of the authors' ``src/sparse_optimizer.py`` (github.com/TsinghuaC3I/SoRA),
    transcribed for one gate tensor with ``weight_decay = 0``, ``correct_bias = True``: transformers'
    AdamW update, then the threshold ``ξ = sparse_lambda`` as their three in-place masks."""
    p = p.clone()
    state["step"] = state.get("step", 0) + 1
    m = state.setdefault("exp_avg", torch.zeros_like(p))
    v = state.setdefault("exp_avg_sq", torch.zeros_like(p))
    m.mul_(betas[0]).add_(grad, alpha=1.0 - betas[0])
    v.mul_(betas[1]).addcmul_(grad, grad, value=1.0 - betas[1])
    denom = v.sqrt().add_(eps)
    step_size = lr * (1.0 - betas[1] ** state["step"]) ** 0.5 / (1.0 - betas[0] ** state["step"])
    p.add_(torch.div(m, denom) * (-step_size))
    p[p > xi] -= xi
    p[p < -xi] += xi
    p[abs(p) < xi] = 0.0
    return p


def test_sora_on_step_is_the_authors_sparse_adamw_step():
    """AdamW on the gates, then ``rw.rank_step`` (threshold λ·lr), against the authors' SparseAdamW with
    ``ξ = λ·lr`` (their wired-in optimizer thresholds by a constant ξ; with a constant lr they coincide).
    They agree on every gate except one in ``ξ < |g| < 2ξ`` after the Adam step: the reference's third
    mask sees the already-shrunk value and zeroes it, rankwise applies the paper's soft-threshold."""
    lr, xi = 1e-4, 1e-3
    net = nn.Sequential(nn.Linear(8, 6))
    rw.adapt(net, "sora", rank=6, lam=xi / lr, targets=["0"], seed=0)
    ad = net[0].adapters["default"]
    _perturb([ad.sora_A, ad.sora_B], seed=3)
    g0 = torch.tensor([0.5, -0.3, 4e-4, -2e-4, 0.8, 1.5e-3])
    with torch.no_grad():
        ad.sora_gate.copy_(g0)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    net(x).square().mean().backward()
    grad = ad.sora_gate.grad.detach().clone()
    assert grad.abs().min() > 1e-4  # every gate moves by ≈ lr at Adam's first step
    ref = _reference_sparse_adamw_step(g0, grad, {}, lr, xi)

    opt = torch.optim.AdamW([ad.sora_gate], lr=lr, weight_decay=0.0, eps=1e-8)
    opt.step()
    moved = ad.sora_gate.detach().clone()
    rw.rank_step(net, 1, opt)
    ours = ad.sora_gate.detach()
    band = (moved.abs() > xi) & (moved.abs() < 2 * xi)
    assert band.tolist() == [False] * 5 + [True]
    torch.testing.assert_close(ours[~band], ref[~band], atol=1e-9, rtol=1e-6)
    assert ref[5] == 0 and ours[5] != 0  # the documented difference: T_ξ(g) = g − ξ ≈ 5e-4 here
    torch.testing.assert_close(ours[5], moved[5] - xi, atol=1e-9, rtol=0)
    assert ours[2] == ours[3] == 0 and torch.count_nonzero(ref) == 3


def test_sora_gate_init_is_the_authors_randn():
    """The authors' ``src/lora.py``: ``gate = torch.randn(1, r)`` (rankwise used ones before): N(0, 1)."""
    net = nn.Sequential(nn.Linear(300, 300))
    rw.adapt(net, "sora", rank=256, targets=["0"], seed=0)
    ad = net[0].adapters["default"]
    g = ad.sora_gate.detach()
    assert not torch.equal(g, torch.ones(256)) and (g < 0).any()
    assert abs(g.mean()) < 0.2 and abs(g.std() - 1) < 0.15
    assert torch.count_nonzero(ad.sora_B) == 0 and torch.count_nonzero(net[0].delta_weight()) == 0
