"""ReLoRA / PeriodicLoRA: the merge leaves the function unchanged and moves s·BA into W; the reset
prunes exactly the fraction asked (the smallest magnitudes); the jagged schedule against its closed
form; warm start; reset_state's rules."""

from __future__ import annotations

import math

import pytest
import torch
from _pretrain_helpers import ids, lm_loss, run, tiny_llama

import rankwise.pretrain as rp
from rankwise.errors import ConfigError
from rankwise.pretrain._optim import reset_state
from rankwise.pretrain.relora import jagged_cosine


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def _trained(name="relora", steps=3, **options):
    """A parametrized tiny LLaMA after ``steps`` AdamW steps (dense, non-zero Adam moments)."""
    model = tiny_llama()
    rp.parametrize(model, name, **{"rank": 4, "reset_every": 1000, **options})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for k in range(steps):
        lm_loss(model, ids(seed=k)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _logits(model):
    with torch.no_grad():
        return model(input_ids=ids(seed=99)).logits


def test_init_is_the_base_model_and_the_paper_init():
    model = tiny_llama()
    ref = _logits(model)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("q_proj")}
    rp.parametrize(model, "relora", rank=4, alpha=32)
    assert torch.equal(_logits(model), ref)  # B = 0
    for n, m in rp.wrapped_layers(model):
        assert m.scale == 32 / 4 and not m.weight.requires_grad and m.lora_A.requires_grad
        assert torch.count_nonzero(m.lora_B) == 0
        bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform(a=√5): sqrt(6 / ((1 + 5) fan_in))
        assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.8 * bound
        if n in weights:
            assert torch.equal(m.weight, weights[n])


@pytest.mark.parametrize("name", ["relora", "periodic_lora"])
def test_merge_keeps_the_function_and_moves_sBA_into_W(name):
    model, opt = _trained(name)
    layers = rp.wrapped_layers(model)
    old = {n: (m.weight.detach().clone(), m.lora_B.detach().clone(), m.lora_A.detach().clone()) for n, m in layers}
    assert all(torch.count_nonzero(b) > 0 for _, b, _ in old.values())
    before = _logits(model)
    info = rp.pretrain_step(model, 1000, opt)
    assert info["merged_layers"] == 14
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=1e-5)
    for n, m in layers:
        w, b, a = old[n]
        torch.testing.assert_close(m.weight, w + m.scale * (b.double() @ a.double()).float(), atol=1e-6, rtol=1e-6)
        assert torch.count_nonzero(m.lora_B) == 0 and not torch.equal(m.lora_A, a)
        assert m.lora_A.abs().max() <= 1 / math.sqrt(m.in_features)
    assert rp.pretrain_step(model, 999, opt) == {}  # not a multiple of reset_every


def test_reset_prunes_exactly_99_percent_smallest_magnitudes():
    model, opt = _trained("relora")
    layers = rp.wrapped_layers(model)
    params = [p for _, m in layers for p in (m.lora_A, m.lora_B)]
    old = {(id(p), k): opt.state[p][k].clone() for p in params for k in ("exp_avg", "exp_avg_sq")}
    assert all(torch.count_nonzero(v) == v.numel() for v in old.values())
    steps = {id(p): opt.state[p]["step"].clone() for p in params}
    info = rp.pretrain_step(model, 1000, opt)
    expected = 0
    for p in params:
        for k in ("exp_avg", "exp_avg_sq"):
            t, o = opt.state[p][k], old[(id(p), k)]
            n_zero = round(0.99 * t.numel())
            expected += n_zero
            assert int((t == 0).sum()) == n_zero
            kept = t != 0
            assert torch.equal(t[kept], o[kept])  # survivors untouched
            assert o[kept].abs().min() >= o[~kept].abs().max()  # and they are the largest magnitudes
        assert torch.equal(opt.state[p]["step"], steps[id(p)])  # step counters are not state to prune
    assert info["optimizer_entries_zeroed"] == expected


def test_random_pruning_full_reset_and_periodic_lora():
    model, opt = _trained("relora", prune=0.5, prune_mode="random")
    rp.pretrain_step(model, 1000, opt)
    for _, m in rp.wrapped_layers(model):
        t = opt.state[m.lora_A]["exp_avg"]
        assert int((t == 0).sum()) == round(0.5 * t.numel())

    model, opt = _trained("periodic_lora")
    info = rp.pretrain_step(model, 1000, opt)
    states = [opt.state[p][k] for _, m in rp.wrapped_layers(model) for p in (m.lora_A, m.lora_B)
              for k in ("exp_avg", "exp_avg_sq")]
    assert all(torch.count_nonzero(t) == 0 for t in states)
    assert info["optimizer_entries_zeroed"] == sum(t.numel() for t in states)

    model, opt = _trained("periodic_lora", reset_optimizer=False)
    saved = [opt.state[m.lora_A]["exp_avg"].clone() for _, m in rp.wrapped_layers(model)]
    rp.pretrain_step(model, 1000, opt)
    assert all(torch.equal(s, opt.state[m.lora_A]["exp_avg"]) for s, (_, m) in zip(saved, rp.wrapped_layers(model)))


def test_reset_state_rules():
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = torch.optim.AdamW([p])
    p.grad = torch.randn(4, 6)
    opt.step()
    opt.state[p]["projected"] = torch.ones(2, 6)  # a GaLore-style moment in (r, n) coordinates
    assert reset_state(opt, [p], prune=1.0, keys=("exp_avg",)) == 24
    assert torch.count_nonzero(opt.state[p]["exp_avg"]) == 0 and torch.count_nonzero(opt.state[p]["exp_avg_sq"]) == 24
    assert reset_state([opt], [p], prune=0.25) == 2 * 6  # round(0.25 · 24) per tensor, 2 tensors of p's shape
    assert torch.equal(opt.state[p]["projected"], torch.ones(2, 6)) and float(opt.state[p]["step"]) == 1
    q = torch.nn.Parameter(torch.randn(3))
    assert reset_state(opt, [q]) == 0  # no state: nothing to zero
    for bad in (0.0, 1.5, True):
        with pytest.raises(ConfigError, match="prune"):
            reset_state(opt, [p], prune=bad)
    with pytest.raises(ConfigError, match="mode"):
        reset_state(opt, [p], prune=0.5, mode="smallest")


def _closed_form(s, total, warmup, every, rewarm, min_ratio):
    """The authors' get_cosine_schedule_with_multiple_warmups lambda (Guitaricet/relora,
    training_utils.py; adjust_step = 0), transcribed, with step s + 1 in the warmups (no lr-0 step)."""
    if s < warmup:
        return (s + 1) / warmup
    restart_step, restart_number = s % every, s // every
    if restart_step < rewarm and s >= every:
        end = (restart_number * every + rewarm - warmup) / (total - warmup)
        mult = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * end))
        return (restart_step + 1) / rewarm * mult
    progress = (s - warmup) / (total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def test_jagged_cosine_against_the_closed_form_and_lambda_lr():
    total, warmup, every, rewarm = 30, 3, 10, 2
    f = jagged_cosine(total, warmup, every, rewarm, min_ratio=0.1)
    got = [f(s) for s in range(total)]
    assert got == pytest.approx([_closed_form(s, total, warmup, every, rewarm, 0.1) for s in range(total)], abs=1e-12)
    c = lambda t: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 3) / 27))  # noqa: E731
    assert got[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert got[9] == pytest.approx(c(9))
    assert got[10] == pytest.approx(0.5 * c(12)) and got[11] == pytest.approx(c(12)) and got[12] == pytest.approx(c(12))
    assert got[20] == pytest.approx(0.5 * c(22)) and f(total) == 0.1 and f(total + 5) == 0.1

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.0 * v for v in got])

    g = jagged_cosine(total, warmup, every, rewarm, min_ratio=0.1, warm_start=20)  # no resets before step 20
    assert [g(s) for s in range(20)] == pytest.approx([1 / 3, 2 / 3, 1.0] + [c(s) for s in range(3, 20)])
    assert g(20) == pytest.approx(0.5 * c(22)) and g(21) == pytest.approx(c(22))

    for args, match in [((10, 11, 10, 2), "warmup=11 is longer"), ((10, 2, 5, 5), "restart_warmup=5"),
                        ((0, 2, 5, 1), "total_steps=0")]:
        with pytest.raises(ConfigError, match=match):
            jagged_cosine(*args)
    with pytest.raises(ConfigError, match="min_ratio"):
        jagged_cosine(10, 2, 5, 1, min_ratio=1.5)


def test_warm_start_trains_W_then_freezes_it():
    with pytest.raises(ConfigError, match="warm_start_steps=3 is not a multiple of reset_every=2"):
        rp.parametrize(tiny_llama(), "relora", rank=4, reset_every=2, warm_start_steps=3)
    model = tiny_llama()
    rp.parametrize(model, "relora", rank=4, reset_every=2, warm_start_steps=2)
    layers = rp.wrapped_layers(model)
    w0 = [m.weight.detach().clone() for _, m in layers]
    assert all(m.weight.requires_grad for _, m in layers)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in (1, 2):
        lm_loss(model, ids(seed=step)).backward()
        opt.step()
        if step == 2:
            before = _logits(model)
        info = rp.pretrain_step(model, step, opt)
        opt.zero_grad()
    assert info["warm_start_ended"] and info["weight_state_freed"] == sum(2 * w.numel() + 1 for w in w0)  # moments + step
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=1e-5)
    for w, (_, m) in zip(w0, layers):
        assert not m.weight.requires_grad and m.weight.grad is None and m.weight not in opt.state
        assert not torch.equal(w, m.weight)
    lm_loss(model, ids()).backward()  # after the warm start W gets no gradient
    assert all(m.weight.grad is None and m.lora_B.grad is not None for _, m in layers)


def test_relora_in_train_loop_merges_on_schedule():
    model = tiny_llama()
    rp.parametrize(model, "relora", rank=4, reset_every=2)
    w = {n: m.weight.detach().clone() for n, m in rp.wrapped_layers(model)}
    result = run(model, 5)
    assert all(math.isfinite(v) for v in result.losses)
    # after step 4's merge and one more step B is non-zero again but W holds two merges
    assert all(not torch.equal(w[n], m.weight) for n, m in rp.wrapped_layers(model))
