"""Rank allocation: adalora (PEFT 0.21 as the oracle), dylora, increlora, aflora, and rw.rank_step.

Oracles: PEFT's AdaLoRA (same weights → same logits, loss with the orthogonality term, gradients;
same gradients → same masks and rank pattern), the closed-form cubic budget, a LoRA holding
truncated factors (DyLoRA), and ``torch.optim.Adam`` run on explicitly cut / zero-padded copies of
the parameters and moments (optimizer state after a rank change).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core.adapted import AdaptedLayer
from rankwise.core.api import adapter_state
from rankwise.methods import adalora, aflora, dylora, increlora
from rankwise.train import TrainConfig, train

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]
ATOL = 1e-5


class Net(nn.Module):
    def __init__(self, dims=(6, 5, 7, 4), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2, self.l3 = (nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def _x(seed=0, n=8, d=6):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _adapters(model, name="default"):
    return {n: m.adapters[name] for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _fill(params, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ---- AdaLoRA vs PEFT ------------------------------------------------------------------------------
def _peft_adalora(base, targets, **kw):
    from peft import AdaLoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(base), AdaLoraConfig(target_modules=targets, **kw))


def _peft_layers(pm):
    return {n: m for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_E") and "default" in m.lora_E}


def _copy_peft_to_rw(pm, model):
    ours = _adapters(model)
    with torch.no_grad():
        for n, m in _peft_layers(pm).items():
            for k in ("lora_A", "lora_E", "lora_B"):
                getattr(ours[n], k).copy_(getattr(m, k)["default"])


def test_adalora_matches_peft_logits_loss_and_grads(bert, token_batch):
    base = bert(0)
    kw = dict(init_r=4, target_r=2, lora_alpha=6, total_step=10, orth_reg_weight=0.3)
    pm = _peft_adalora(base, ["query", "value"], **kw)
    _fill([m.lora_E["default"] for m in _peft_layers(pm).values()], 1)
    _fill([m.lora_A["default"] for m in _peft_layers(pm).values()], 2)
    model = rw.adapt(copy.deepcopy(base), "adalora", rank=4, target_rank=2, alpha=6, total_step=10,
                     orth_reg_weight=0.3, targets=["query", "value"])
    _copy_peft_to_rw(pm, model)
    labels = torch.tensor([0, 2])
    pm.train()
    model.train()
    out_p = pm.base_model(**token_batch, labels=labels)  # AdaLoraModel.forward adds the orthogonality term
    out_r = model(**token_batch, labels=labels)
    torch.testing.assert_close(out_r.logits, out_p.logits, atol=ATOL, rtol=0)
    reg = rw.rank_regularization(model)
    assert reg is not None and reg.item() > 0
    loss_r = out_r.loss + reg  # PEFT adds w · mean ‖PPᵀ - I‖_F to outputs.loss itself
    torch.testing.assert_close(loss_r, out_p.loss, atol=ATOL, rtol=0)
    loss_r.backward()
    out_p.loss.backward()
    ours = _adapters(model)
    for n, m in _peft_layers(pm).items():
        for k in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(ours[n], k).grad, getattr(m, k)["default"].grad, atol=ATOL, rtol=1e-4)


def _closed_form_budget(step, b0, bt, tinit, tfinal, total):
    if step <= tinit:
        return b0
    if step > total - tfinal:
        return bt
    return int((b0 - bt) * (1 - (step - tinit) / (total - tfinal - tinit)) ** 3 + bt)


def test_adalora_allocator_matches_peft_and_ends_at_target():
    """Same weights and the very same gradients each step → PEFT and rankwise mask the same triplets;
    budgets follow the closed-form cubic schedule, and the end rank is the target budget."""
    base = Net()
    T, tinit, tfinal, dt = 12, 2, 3, 2
    cfg = dict(init_r=4, target_r=2, lora_alpha=4, total_step=T, tinit=tinit, tfinal=tfinal, deltaT=dt,
               beta1=0.8, beta2=0.9, orth_reg_weight=0.0)
    pm = _peft_adalora(base, ["l1", "l2", "l3"], **cfg)
    _fill([m.lora_E["default"] for m in _peft_layers(pm).values()], 3)
    model = rw.adapt(copy.deepcopy(base), "adalora", rank=4, target_rank=2, alpha=4, total_step=T, tinit=tinit,
                     tfinal=tfinal, delta_t=dt, beta1=0.8, beta2=0.9, orth_reg_weight=0.0, targets=["l1", "l2", "l3"])
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    peft_layers, ours = _peft_layers(pm), _adapters(model)
    b0, bt = 3 * 4, 3 * 2
    seen_mask_steps = []
    for step in range(1, T + 1):
        pm.train()
        loss = (pm(_x(step)) - 1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        _copy_peft_to_rw(pm, model)
        with torch.no_grad():
            for n, m in peft_layers.items():
                for k in ("lora_A", "lora_E", "lora_B"):
                    getattr(ours[n], k).grad = getattr(m, k)["default"].grad.clone()
        pm.base_model.update_and_allocate(step)
        info = rw.rank_step(model, step).get("default")
        for n, m in peft_layers.items():  # the same E after masking, bit for bit
            assert torch.equal(ours[n].lora_E, m.lora_E["default"]), (step, n)
        if info is not None:
            seen_mask_steps.append(step)
            want = _closed_form_budget(step, b0, bt, tinit, tfinal, T)
            assert info["budget"] == want
            assert sum(info["ranks"].values()) == want  # no ties at the threshold here
            pattern = pm.peft_config["default"].rank_pattern
            for n in peft_layers:
                assert ours[n].rank_mask.tolist() == pattern[f"{n}.lora_E.default"]
    assert seen_mask_steps == [s for s in range(tinit + 1, T - tfinal) if s % dt == 0] + [T - tfinal]
    assert sum(adalora.ranks(model).values()) == bt


def _train(method, steps=12, **kw):
    """``rankwise.train`` on Net (total_step left None: the loop's length reaches the schedules)."""
    model = rw.adapt(Net(), method, targets=["l1", "l2", "l3"], seed=0, **kw)
    data = [(_x(i, n=1)[0], torch.ones(4)) for i in range(32)]

    def collate(items):
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    def loss_fn(m, batch):
        return (m(batch[0]) - batch[1]).square().mean()

    res = train(model, data, collate, loss_fn, TrainConfig(steps=steps, batch_size=4, lr=0.05, warmup=0),
                progress=False)
    assert all(math.isfinite(v) for v in res.losses)
    return model


def test_adalora_in_train_loop_ends_at_target_budget():
    model = _train("adalora", rank=4, target_rank=2, tinit=2, tfinal=2)
    assert sum(adalora.ranks(model).values()) == 2 * 3
    for ad in _adapters(model).values():  # masked triplets are exactly zero in E
        assert torch.all(ad.lora_E[~ad.rank_mask] == 0)


def test_train_loop_drives_increlora_aflora_dylora():
    model = _train("increlora", rank=1, target_rank=2, delta_t=2)
    assert sum(increlora.ranks(model).values()) == 2 * 3
    model = _train("aflora", rank=2, tinit=1, tfinal=2)
    assert len(aflora.frozen(model)) == 2 * 3
    model = _train("dylora", rank=3)
    assert {ad.train_rank for ad in _adapters(model).values()} == {adapter_state(model)["default"]["config"].sample(12)}


def test_adalora_prune_cuts_optimizer_state_and_roundtrips(tmp_path):
    model = rw.adapt(Net(), "adalora", rank=4, target_rank=2, total_step=4, targets=["l1", "l2", "l3"], seed=0)
    ads = _adapters(model)
    _fill([ad.lora_E for ad in ads.values()], 5)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.01)
    x = _x(1)
    for step in range(1, 5):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        rw.rank_step(model, step, opt)
    masks = {n: ad.rank_mask.clone() for n, ad in ads.items()}
    assert sum(int(m.sum()) for m in masks.values()) == 6
    # oracle: Adam on explicitly cut copies of the parameters and moments
    opt.zero_grad()
    model(x).square().mean().backward()
    cut = {}
    for n, ad in ads.items():
        keep = torch.nonzero(masks[n]).flatten()
        for k, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            p = getattr(ad, k)
            st = opt.state[p]
            cut[(n, k)] = tuple(t.index_select(dim, keep).clone() for t in (p.data, p.grad, st["exp_avg"], st["exp_avg_sq"]))
    before = model(x).detach()
    got = adalora.prune(model, optimizer=opt)["default"]
    assert got == {n: int(m.sum()) for n, m in masks.items()}
    torch.testing.assert_close(model(x), before, atol=ATOL, rtol=0)  # masked triplets were zero: same output
    opt.zero_grad()
    model(x).square().mean().backward()
    for n, ad in ads.items():  # after the cut the gradients are the cut gradients
        for k in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(ad, k).grad, cut[(n, k)][1], atol=1e-6, rtol=1e-5)
    step_before = {id(p): float(opt.state[p]["step"]) for p in params}
    opt.step()
    for n, ad in ads.items():
        for k in ("lora_A", "lora_E", "lora_B"):
            p0, g, m, v = cut[(n, k)]
            q = p0.clone().requires_grad_(True)
            ref = torch.optim.Adam([q], lr=0.01)
            ref.state[q] = {"step": torch.tensor(step_before[id(getattr(ad, k))]), "exp_avg": m, "exp_avg_sq": v}
            q.grad = g
            ref.step()
            torch.testing.assert_close(getattr(ad, k).data, q.data, atol=1e-6, rtol=1e-5)
    # the cut ranks are saved per module and rebuilt by rw.load
    rw.save(model, tmp_path / "a")
    fresh = rw.load(Net(), tmp_path / "a")
    for n, ad in _adapters(fresh).items():
        assert ad.rank == int(masks[n].sum())
    model.eval()
    torch.testing.assert_close(fresh(x), model(x), atol=ATOL, rtol=0)


def test_adalora_peft_export_import(tmp_path, bert, token_batch):
    from peft import PeftModel

    base = bert(1)
    model = rw.adapt(copy.deepcopy(base), "adalora", rank=4, target_rank=2, alpha=6, total_step=10,
                     targets=["query", "value"], seed=0)
    ads = _adapters(model)
    _fill([ad.lora_E for ad in ads.values()], 7)
    _fill([ad.lora_B for ad in ads.values()], 8)
    # a rank pattern: mask two triplets of each layer (E zeroed, as the allocator does)
    for i, ad in enumerate(ads.values()):
        ad.rank_mask.copy_(torch.tensor([True, i % 2 == 0, False, i % 2 == 1]))
        ad._apply_mask()
    model.eval()
    want = model(**token_batch).logits
    rw.export_peft(model, tmp_path / "p")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    for m in _peft_layers(pm).values():
        assert m.lora_A["default"].shape[0] == 2  # PEFT rebuilt the cut ranks from rank_pattern
    torch.testing.assert_close(pm(**token_batch).logits, want, atol=ATOL, rtol=0)
    # and back: PEFT's own save → rw.import_peft
    pm.save_pretrained(tmp_path / "p2")
    back = rw.import_peft(copy.deepcopy(base), tmp_path / "p2").eval()
    assert {n: ad.rank for n, ad in _adapters(back).items()} == {n: 2 for n in ads}
    torch.testing.assert_close(back(**token_batch).logits, want, atol=ATOL, rtol=0)


# ---- DyLoRA ---------------------------------------------------------------------------------------
def test_dylora_every_rank_equals_truncated_lora():
    r, alpha = 5, 3.0
    base = Net(dims=(6, 8, 7, 6))
    model = rw.adapt(copy.deepcopy(base), "dylora", rank=r, alpha=alpha, targets=["l1", "l2", "l3"], seed=0)
    for ad in _adapters(model).values():
        _fill([ad.lora_B], 11)
    model.eval()
    x = _x(2)
    outs = []
    for b in range(1, r + 1):
        dylora.set_rank(model, b)
        lora = rw.adapt(copy.deepcopy(base), "lora", rank=b, alpha=alpha, targets=["l1", "l2", "l3"], seed=1).eval()
        lo = _adapters(lora)
        with torch.no_grad():
            for n, (a, bb) in dylora.truncated(model, b).items():
                lo[n].lora_A.copy_(a)
                lo[n].lora_B.copy_(bb)
        out = model(x)
        torch.testing.assert_close(out, lora(x), atol=ATOL, rtol=0)
        outs.append(out)
    assert not torch.allclose(outs[0], outs[-1])  # the ranks really differ


def test_dylora_training_samples_and_updates_only_bth_component():
    model = rw.adapt(Net(), "dylora", rank=4, targets=["l1", "l2"], seed=0, update="last")
    for ad in _adapters(model).values():
        _fill([ad.lora_B], 3)
    cfg = rw.get_method("dylora").Config(rank=4)
    sampled = []
    model.train()
    for step in range(1, 9):
        b = rw.rank_step(model, step)["default"]["train_rank"]
        assert b == cfg.sample(step)  # seeded by (seed, step): reproducible
        sampled.append(b)
        model.zero_grad()
        model(_x(step)).square().mean().backward()
        for ad in _adapters(model).values():
            assert ad.active_rank() == b
            nz_a = torch.nonzero(ad.lora_A.grad.abs().sum(1)).flatten().tolist()
            nz_b = torch.nonzero(ad.lora_B.grad.abs().sum(0)).flatten().tolist()
            assert nz_a == [b - 1] and nz_b == [b - 1]
    assert len(set(sampled)) > 1


# ---- IncreLoRA ------------------------------------------------------------------------------------
class Weighted(nn.Module):
    """Two parallel layers; the loss weighs ``hot``'s output 100x more than ``cold``'s."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hot, self.cold = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return 10 * self.hot(x), 0.1 * self.cold(x)


def test_increlora_grows_important_layer_under_budget_with_consistent_adam(tmp_path):
    model = rw.adapt(Weighted(), "increlora", rank=1, target_rank=3, delta_t=2, grow_per_step=1,
                     orth_reg_weight=0.0, targets=["hot", "cold"], seed=0)
    ads = _adapters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.01)

    def loss_fn(x):
        h, c = model(x)
        return (h - 1).square().mean() + (c - 1).square().mean()

    grown_at = []
    for step in range(1, 21):
        x = _x(step)
        opt.zero_grad()
        loss_fn(x).backward()
        opt.step()
        before = torch.cat(model(x)).detach()
        ranks_before = increlora.ranks(model)
        snap = {id(p): (p.data.clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone(),
                        float(opt.state[p]["step"])) for p in params}
        info = rw.rank_step(model, step, opt).get("default")
        if info is None:
            continue
        grown_at.append((step, dict(info["grown"])))
        torch.testing.assert_close(torch.cat(model(x)), before, atol=0, rtol=0)  # λ_new = 0: same output
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
    x = _x(99)
    torch.testing.assert_close(torch.cat(fresh(x)), torch.cat(model(x)), atol=ATOL, rtol=0)


# ---- AfLoRA ---------------------------------------------------------------------------------------
def test_aflora_freezes_by_schedule_and_score():
    T, tinit, tfinal = 10, 1, 2
    model = rw.adapt(Weighted(), "aflora", rank=2, total_step=T, tinit=tinit, tfinal=tfinal,
                     targets=["hot", "cold"], seed=0)
    ads = _adapters(model)
    _fill([ad.vec_u for ad in ads.values()], 4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.01)
    order = []
    for step in range(1, T + 1):
        x = _x(step)
        opt.zero_grad()
        h, c = model(x)
        ((h - 1).square().mean() + 1e-6 * (c - 1).square().mean()).backward()
        opt.step()
        info = rw.rank_step(model, step, opt).get("default")
        frac = 1.0 if step >= T - tfinal else 0.0 if step <= tinit else \
            1 - (1 - (step - tinit) / (T - tfinal - tinit)) ** 3
        want = 4 - math.floor(4 * (1 - frac) + 1e-9)
        now = aflora.frozen(model)
        assert len(now) == want, step
        if info:
            order += info["frozen"]
        for n, ad in ads.items():
            for k, p in ad.projections():
                assert p.requires_grad == (f"{n}.lora_{k}" not in now)
                if not p.requires_grad:
                    assert p not in opt.state and p.grad is None
    assert set(order) == {"hot.lora_A", "hot.lora_B", "cold.lora_A", "cold.lora_B"}
    assert set(order[:2]) == {"cold.lora_A", "cold.lora_B"}  # the barely-used layer freezes first
    # vectors train to the end; frozen projections stay put
    frozen_vals = {n: (ad.lora_A.detach().clone(), ad.lora_B.detach().clone(), ad.vec_u.detach().clone())
                   for n, ad in ads.items()}
    opt.zero_grad()
    h, c = model(_x(50))
    ((h - 1).square().mean() + (c - 1).square().mean()).backward()
    opt.step()
    for n, ad in ads.items():
        assert torch.equal(ad.lora_A, frozen_vals[n][0]) and torch.equal(ad.lora_B, frozen_vals[n][1])
        assert not torch.equal(ad.vec_u, frozen_vals[n][2])


def test_rank_step_validates_and_needs_total_step():
    model = rw.adapt(Net(), "adalora", rank=2, targets=["l1"])
    with pytest.raises(rw.errors.ConfigError, match="total_step"):
        rw.rank_step(model, 1)
    with pytest.raises(TypeError):
        rw.rank_step(model, 1.5)
    with pytest.raises(rw.errors.ConfigError, match="target_rank"):
        rw.adapt(Net(), "adalora", rank=2, target_rank=3, targets=["l1"])
    plain = rw.adapt(Net(), "lora", rank=2, targets=["l1"])
    assert rw.rank_step(plain, 1) == {} and rw.rank_regularization(plain) is None
