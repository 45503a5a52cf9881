"""AfLoRA against its reference (zeyuliu1037/AFLoRA ``glue/utils.py`` Pruner, ``lora_layer.py`` init).

Oracles: the reference's PLATON score transcribed (window-averaged ``|sign(P)·∇P|``, EMAs at window
ends), ``nn.init.kaiming_uniform_`` drawn from the same generator, and the cubic freezing fraction.
"""

from __future__ import annotations

import math

import pytest
import torch
from _rank_helpers import Net, Weighted, adapters, fill, train_net, x_batch
from torch import nn

import rankwise as rw
from rankwise.methods import aflora

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


# ---- AfLoRA ---------------------------------------------------------------------------------------
def test_aflora_freezes_by_schedule_and_score():
    T, tinit, tfinal = 10, 1, 2
    model = rw.adapt(Weighted(), "aflora", rank=2, total_step=T, tinit=tinit, tfinal=tfinal, delta_t=1,
                     targets=["hot", "cold"], seed=0)
    ads = adapters(model)
    fill([ad.vec_u for ad in ads.values()], 4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.01)
    order = []
    for step in range(1, T + 1):
        x = x_batch(step)
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
    h, c = model(x_batch(50))
    ((h - 1).square().mean() + (c - 1).square().mean()).backward()
    opt.step()
    for n, ad in ads.items():
        assert torch.equal(ad.lora_A, frozen_vals[n][0]) and torch.equal(ad.lora_B, frozen_vals[n][1])
        assert not torch.equal(ad.vec_u, frozen_vals[n][2])




def test_train_loop_drives_aflora():
    model = train_net("aflora", rank=2, tinit=1, tfinal=2)
    assert len(aflora.frozen(model)) == 2 * 3


# ---- the reference's score, init and default schedule -------------------------------------------
def test_aflora_score_is_the_reference_window_averaged_gradient_score():
    """``Pruner.update_ipt_with_local_window`` (PLATON) transcribed: per entry ``|sign(p)·∇p|``, averaged
    over windows of ``deltaT`` steps; at each window start the closed window goes into the EMAs; the
    matrix scores ``mean(exp_avg_ipt · exp_avg_unc)``."""
    dt, b1, b2 = 3, 0.8, 0.9
    model = rw.adapt(Weighted(), "aflora", rank=2, total_step=1000, delta_t=dt, beta1=b1, beta2=b2,
                     targets=["hot", "cold"], seed=0)
    ads = adapters(model)
    fill([ad.vec_u for ad in ads.values()], 4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ref = {}  # (module, key) -> [window, exp_avg_ipt, exp_avg_unc]
    old = {}  # the old |P ⊙ ∇P| score, for contrast
    for step in range(1, 12):
        opt.zero_grad()
        h, c = model(x_batch(step))
        ((h - 1).square().mean() + (c - 1).square().mean()).backward()
        opt.step()
        gs = step - 1  # the reference's global_step
        for n, ad in ads.items():
            for k, p in ad.projections():
                w, e_ipt, e_unc = ref.setdefault((n, k), [torch.zeros_like(p)] * 3)
                o = old.setdefault((n, k), [torch.zeros_like(p)] * 2)
                local = gs % dt
                if local == 0:
                    e_ipt = b1 * e_ipt + (1 - b1) * w
                    e_unc = b2 * e_unc + (1 - b2) * (w - e_ipt).abs()
                    w = (torch.sign(p) * p.grad).abs()
                else:
                    w = (w * local + (torch.sign(p) * p.grad).abs()) / (local + 1)
                ref[(n, k)] = [w, e_ipt, e_unc]
                i_old = (p * p.grad).abs()
                o[0] = b1 * o[0] + (1 - b1) * i_old
                o[1] = b2 * o[1] + (1 - b2) * (i_old - o[0]).abs()
        assert rw.rank_step(model, step, opt) == {}  # T = 1000: still warming up
        for (n, k), (_, e_ipt, e_unc) in ref.items():
            want = float((e_ipt * e_unc).mean())
            assert ads[n].freezing_score(k) == pytest.approx(want, rel=1e-5, abs=1e-30), (step, n, k)
    for (n, k), (_, e_ipt, e_unc) in ref.items():
        assert float((e_ipt * e_unc).mean()) > 0
        assert float((old[(n, k)][0] * old[(n, k)][1]).mean()) != pytest.approx(ads[n].freezing_score(k), rel=0.1)


def test_aflora_init_is_the_reference_kaiming_uniform_and_d_one_tenth():
    """``lora_layer.py`` with ``--init_type 1 --d_init_type 94``: ``kaiming_uniform_`` (a = 0) on A
    (fan-in ``in``) and B (fan-in ``r``), drawn in that order, ``lora_d = 0.1``, ``lora_db = 0``."""
    n_in, n_out, r, seed = 96, 40, 6, 3
    model = rw.adapt(nn.Sequential(nn.Linear(n_in, n_out)), "aflora", rank=r, targets=["0"], seed=seed)
    ad = adapters(model)["0"]
    g = torch.Generator().manual_seed(seed)
    a = nn.init.kaiming_uniform_(torch.empty(r, n_in), generator=g)
    b = nn.init.kaiming_uniform_(torch.empty(n_out, r), generator=g)
    torch.testing.assert_close(ad.lora_A, a, atol=1e-7, rtol=0)
    torch.testing.assert_close(ad.lora_B, b, atol=1e-7, rtol=0)
    assert torch.all(ad.vec_d == 0.1) and torch.all(ad.vec_u == 0)
    # bounds √(6/fan_in): not the old ±1/√in, ±1/√r
    assert ad.lora_A.abs().max() > 1.5 / math.sqrt(n_in)
    assert ad.lora_B.abs().max() > 1.5 / math.sqrt(r)
    assert ad.lora_A.abs().max() <= math.sqrt(6 / n_in) and ad.lora_B.abs().max() <= math.sqrt(6 / r)


def test_aflora_default_schedule_never_freezes_at_step_one():
    """Defaults (reference GLUE runs): delta_t = 10, t_init = max(delta_t, T//20), t_final = 7T//10, so
    nothing is frozen before the first full averaging window — at step 1 u = 0 makes every score 0."""
    T = 200
    model = rw.adapt(Net(dims=(64, 64, 64, 4)), "aflora", total_step=T, targets=["l1", "l2", "l3"], seed=0)
    cfg = rw.get_method("aflora").Config()
    assert (cfg.delta_t, cfg.beta1, cfg.beta2) == (10, 0.85, 0.95)
    assert cfg.schedule(T) == (10, 140)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    first = None
    for step in range(1, 12):
        opt.zero_grad()
        model(x_batch(step, d=64)).square().mean().backward()
        if step == 1:
            assert all(float(p.grad.abs().max()) == 0 for ad in adapters(model).values() for _, p in ad.projections())
        opt.step()
        info = rw.rank_step(model, step, opt).get("default")
        if info and first is None:
            first = step
            # decided on the first closed window: every score still in play is > 0
            assert all(ad.freezing_score(k) > 0 for ad in adapters(model).values()
                       for k, p in ad.projections() if p.requires_grad)
    assert first == 11  # the first window end after t_init: 1 - (1 - 1/50)³ of 6 matrices → 1 frozen
    assert len(aflora.frozen(model)) == 6 - math.floor(6 * (1 - 1 / 50) ** 3)
