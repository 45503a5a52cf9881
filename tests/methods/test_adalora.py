"""AdaLoRA (PEFT 0.21 as the oracle) and rw.rank_step.

Oracles: PEFT's AdaLoRA (same weights → same logits, loss with the orthogonality term, gradients;
same gradients → same masks and rank pattern), the closed-form cubic budget, and ``torch.optim.Adam``
run on explicitly cut copies of the parameters and moments (optimizer state after a cut).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _rank_helpers import ATOL, Net, adapters, fill, train_net, x_batch

import rankwise as rw
from rankwise.methods import adalora

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


# ---- AdaLoRA vs PEFT ------------------------------------------------------------------------------
def _peft_adalora(base, targets, **kw):
    from peft import AdaLoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(base), AdaLoraConfig(target_modules=targets, **kw))


def _peft_layers(pm):
    return {n: m for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_E") and "default" in m.lora_E}


def _copy_peft_to_rw(pm, model):
    ours = adapters(model)
    with torch.no_grad():
        for n, m in _peft_layers(pm).items():
            for k in ("lora_A", "lora_E", "lora_B"):
                getattr(ours[n], k).copy_(getattr(m, k)["default"])


def test_adalora_matches_peft_logits_loss_and_grads(bert, token_batch):
    base = bert(0)
    kw = dict(init_r=4, target_r=2, lora_alpha=6, total_step=10, orth_reg_weight=0.3)
    pm = _peft_adalora(base, ["query", "value"], **kw)
    fill([m.lora_E["default"] for m in _peft_layers(pm).values()], 1)
    fill([m.lora_A["default"] for m in _peft_layers(pm).values()], 2)
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
    ours = adapters(model)
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
    fill([m.lora_E["default"] for m in _peft_layers(pm).values()], 3)
    model = rw.adapt(copy.deepcopy(base), "adalora", rank=4, target_rank=2, alpha=4, total_step=T, tinit=tinit,
                     tfinal=tfinal, delta_t=dt, beta1=0.8, beta2=0.9, orth_reg_weight=0.0, targets=["l1", "l2", "l3"])
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    peft_layers, ours = _peft_layers(pm), adapters(model)
    b0, bt = 3 * 4, 3 * 2
    seen_mask_steps = []
    for step in range(1, T + 1):
        pm.train()
        loss = (pm(x_batch(step)) - 1).square().mean()
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


def test_adalora_in_train_loop_ends_at_target_budget():
    model = train_net("adalora", rank=4, target_rank=2, tinit=2, tfinal=2)
    assert sum(adalora.ranks(model).values()) == 2 * 3
    for ad in adapters(model).values():  # masked triplets are exactly zero in E
        assert torch.all(ad.lora_E[~ad.rank_mask] == 0)


def test_adalora_prune_cuts_optimizer_state_and_roundtrips(tmp_path):
    model = rw.adapt(Net(), "adalora", rank=4, target_rank=2, total_step=4, targets=["l1", "l2", "l3"], seed=0)
    ads = adapters(model)
    fill([ad.lora_E for ad in ads.values()], 5)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.01)
    x = x_batch(1)
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
    for n, ad in adapters(fresh).items():
        assert ad.rank == int(masks[n].sum())
    model.eval()
    torch.testing.assert_close(fresh(x), model(x), atol=ATOL, rtol=0)


def test_adalora_peft_export_import(tmp_path, bert, token_batch):
    from peft import PeftModel

    base = bert(1)
    model = rw.adapt(copy.deepcopy(base), "adalora", rank=4, target_rank=2, alpha=6, total_step=10,
                     targets=["query", "value"], seed=0)
    ads = adapters(model)
    fill([ad.lora_E for ad in ads.values()], 7)
    fill([ad.lora_B for ad in ads.values()], 8)
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
    assert {n: ad.rank for n, ad in adapters(back).items()} == {n: 2 for n in ads}
    torch.testing.assert_close(back(**token_batch).logits, want, atol=ATOL, rtol=0)


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
