"""IncreLoRA against its reference (FeiyuZhang98/IncreLoRA ``loralib/loralib/increlora.py``).

Oracles: the reference's module score ``Σ|ΔW ⊙ ∂L/∂ΔW|/√numel`` on a densely formed ΔW (autograd for
its gradient), its EMA, its scale ``α/(ranknum + 1e-5)`` and growth ``rank_dic``, and
``torch.optim.Adam`` run on explicitly zero-padded copies of the parameters and moments.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _rank_helpers import ATOL, Weighted, adapters, fill, train_net, x_batch
from torch import nn

import rankwise as rw
from rankwise.methods import increlora

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


# ---- IncreLoRA ------------------------------------------------------------------------------------
def test_increlora_grows_important_layer_under_budget_with_consistent_adam(tmp_path):
    model = rw.adapt(Weighted(), "increlora", rank=1, target_rank=3, delta_t=2, grow_per_step=1,
                     orth_reg_weight=0.0, targets=["hot", "cold"], seed=0)
    ads = adapters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.01)

    def loss_fn(x):
        h, c = model(x)
        return (h - 1).square().mean() + (c - 1).square().mean()

    grown_at = []
    for step in range(1, 21):
        x = x_batch(step)
        opt.zero_grad()
        loss_fn(x).backward()
        opt.step()
        deltas = {n: ad.delta_weight().detach().clone() for n, ad in ads.items()}
        ranks_before = increlora.ranks(model)
        snap = {id(p): (p.data.clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone(),
                        float(opt.state[p]["step"])) for p in params}
        info = rw.rank_step(model, step, opt).get("default")
        if info is None:
            continue
        grown_at.append((step, dict(info["grown"])))
        # λ_new = 0, but s = α/(r + 1e-5) follows the rank (reference ``ranknum``): the old update shrinks
        for n in info["grown"]:
            r0, r1 = ranks_before[n], ads[n].rank
            torch.testing.assert_close(ads[n].delta_weight(), deltas[n] * (r0 + 1e-5) / (r1 + 1e-5),
                                       atol=1e-7, rtol=1e-6)
        inits = {id(p): p.data.clone() for p in params}  # the new triplets' init values
        # oracle: Adam on the old parameters + new slices, with zero moments for the new entries
        opt.zero_grad()
        loss_fn(x).backward()
        grads = {id(p): p.grad.clone() for p in params}
        opt.step()
        for n in info["grown"]:
            ad = ads[n]
            assert ad.rank == ranks_before[n] + 1
            for p, dim in ((ad.lora_A, 0), (ad.lora_E, 0), (ad.lora_B, 1)):
                p0, m, v, st = snap[id(p)]
                new = inits[id(p)].narrow(dim, p.shape[dim] - 1, 1)
                assert torch.equal(inits[id(p)].narrow(dim, 0, p0.shape[dim]), p0)
                q = torch.cat([p0, new], dim=dim).requires_grad_(True)
                ref = torch.optim.Adam([q], lr=0.01)
                ref.state[q] = {"step": torch.tensor(st), "exp_avg": torch.cat([m, torch.zeros_like(new)], dim),
                                "exp_avg_sq": torch.cat([v, torch.zeros_like(new)], dim)}
                q.grad = grads[id(p)]
                ref.step()
                torch.testing.assert_close(p.data, q.data, atol=1e-6, rtol=1e-5)
    final = increlora.ranks(model)
    assert sum(final.values()) == 3 * 2  # ends at the budget, and stops there
    assert final["hot"] > final["cold"]
    assert [s for s, _ in grown_at] == [2, 4, 6, 8]
    assert grown_at[0][1] == {"hot": 2}
    rw.save(model, tmp_path / "inc")
    fresh = rw.load(Weighted(), tmp_path / "inc")
    assert increlora.ranks(fresh) == final
    x = x_batch(99)
    torch.testing.assert_close(torch.cat(fresh(x)), torch.cat(model(x)), atol=ATOL, rtol=0)




def test_train_loop_drives_increlora():
    model = train_net("increlora", rank=1, target_rank=2, delta_t=2)
    assert sum(increlora.ranks(model).values()) == 2 * 3


# ---- the reference's importance, scale and growth ------------------------------------------------
def _reference_score(kind, base, a, e, b, alpha, x):
    """``SVDLinear.backward_hook``: ΔW = B (A ⊙ E) · α/(ranknum + 1e-5) formed densely, the loss
    backpropagated into it, ``Σ |ΔW| · |∂L/∂ΔW| / √numel``."""
    w = (b @ (a * e) * alpha / (a.shape[0] + 1e-5)).detach().requires_grad_(True)
    if kind == "linear":
        y = F.linear(x, base.weight + w, base.bias)
    else:
        y = F.conv2d(x, base.weight + w.reshape(base.weight.shape), base.bias, base.stride, base.padding)
    y.square().mean().backward()
    return float(torch.sum((w.abs() * w.grad).abs()) / math.sqrt(w.numel()))


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_increlora_module_score_is_the_reference_delta_w_score(kind):
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(7, 5), torch.randn(4, 3, 7)
    else:
        base, x = nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 6, 6)
    net = nn.Sequential(base)
    alpha, b1, b2 = 3.0, 0.7, 0.8
    model = rw.adapt(net, "increlora", rank=2, alpha=alpha, beta1=b1, beta2=b2, targets=["0"], seed=0, delta_t=100)
    ad = adapters(model)["0"]
    fill([ad.lora_A, ad.lora_E, ad.lora_B], 1)
    model.train()
    ipt = unc = 0.0
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in (ad.lora_A, ad.lora_E, ad.lora_B):
                p.add_(0.05 * step)  # a different ΔW each step
        xs = x * step
        want = _reference_score(kind, base, ad.lora_A, ad.lora_E, ad.lora_B, alpha, xs)
        for p in ad.parameters():
            p.grad = None
        model(xs).square().mean().backward()
        got = float(ad._score)
        assert got == pytest.approx(want, rel=1e-5)
        # the old score (mean of |θ ⊙ ∇θ| over A, λ, B) is another number altogether
        old = sum(float((p * p.grad).abs().sum()) for p in (ad.lora_A, ad.lora_E, ad.lora_B)) / sum(
            p.numel() for p in (ad.lora_A, ad.lora_E, ad.lora_B))
        assert abs(old - want) > 0.05 * want
        rw.rank_step(model, step)
        # RankAllocator.update_ipt: the EMA of the module scalar
        ipt = b1 * ipt + (1 - b1) * want
        unc = b2 * unc + (1 - b2) * abs(want - ipt)
        assert ad.ipt == pytest.approx(ipt, rel=1e-5) and ad.unc == pytest.approx(unc, rel=1e-5)
        assert ad.importance() == pytest.approx(ipt * unc, rel=1e-5)


def test_increlora_scale_follows_the_current_rank_and_growth_adds_half_the_target():
    """Reference: ``scaling / (ranknum + 1e-5)`` with ``scaling = lora_alpha``, ``ranknum += add_r`` and
    ``add_r = rank_dic[target_rank]`` with ``rank_dic = {2: 1, 4: 2, 6: 3, 8: 4}``."""
    rank_dic = {2: 1, 4: 2, 6: 3, 8: 4}
    for target in (2, 4, 6, 8):
        model = rw.adapt(Weighted(), "increlora", rank=1, target_rank=target, alpha=5.0, delta_t=1,
                         orth_reg_weight=0.0, targets=["hot", "cold"], seed=0)
        ads = adapters(model)
        fill([p for ad in ads.values() for p in (ad.lora_E, ad.lora_B)], 2)
        model.train()
        h, c = model(x_batch(1))
        ((h - 1).square().mean() + (c - 1).square().mean()).backward()
        info = rw.rank_step(model, 1)["default"]
        assert info["grown"] == {"hot": 1 + rank_dic[target]}
        ad = ads["hot"]
        assert ad.rank == 1 + rank_dic[target]
        want = (ad.lora_B @ (ad.lora_A * ad.lora_E)) * 5.0 / (ad.rank + 1e-5)
        torch.testing.assert_close(ad.delta_weight(), want, atol=1e-7, rtol=1e-6)
        assert ad.scale == pytest.approx(5.0 / (ad.rank + 1e-5))
        assert ad.scale != pytest.approx(5.0 / 1)  # the old fixed α/r₀


def test_growth_inside_a_training_loop_that_keeps_the_last_loss():
    """A loop keeps the previous step's ``loss`` (and so its graph) alive across ``rank_step``, as
    ``rankwise.train`` and most hand-written loops do; after a growth the next backward must give
    gradients of the new shape (autograd used to reuse the old gradient accumulator and fail)."""
    from conftest import make_bert

    model = make_bert()
    rw.adapt(model, "increlora", rank=4, targets=["query", "value"], seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(1, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    grown = []
    for step in range(1, 26):
        loss = model(input_ids=ids).logits.square().mean() + rw.rank_regularization(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        info = rw.rank_step(model, step, opt, total_steps=25)
        if info:
            grown.append(step)
    assert grown, "no growth happened: the test would not exercise the resize"
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" in name:
            assert p.grad is None or p.grad.shape == p.shape, name
    assert any(r > 4 for r in increlora.ranks(model).values())
