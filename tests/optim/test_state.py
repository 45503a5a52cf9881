"""Optimizer state: analytic state sizes, state_dict round trips and LR schedulers."""

from __future__ import annotations

import io

import pytest
import torch
from _optim_helpers import _batches

import rankwise.optim as ro


# ---------------------------------------------------------------------------------------- state sizes
def test_state_bytes_analytic_for_projected_optimizers(single_thread):
    """FRUGAL keeps GaLore's state; APOLLO-Mini 2n + 1 numbers per matrix; Adafactor m + n."""
    model = torch.nn.Sequential(torch.nn.Linear(24, 16, bias=False), torch.nn.Linear(16, 40, bias=False))
    shapes = [tuple(p.shape) for p in model.parameters()]  # (16, 24), (40, 16)
    x = torch.randn(4, 24)

    def state(opt):
        model.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        return ro.state_bytes(opt)["total"]

    r = 4
    low = sum(r * max(s) for s in shapes)             # projected moments: r × (larger side)
    basis = sum(r * min(s) for s in shapes)           # basis of the smaller side
    assert state(ro.FRUGAL(ro.param_groups(model, rank=r), lr=1e-3)) == (2 * low + basis) * 4
    assert state(ro.APOLLOMini(ro.param_groups(model, rank=1), lr=1e-3)) == sum(2 * max(s) + 1 for s in shapes) * 4
    assert state(ro.Adafactor(model.parameters(), lr=1e-3)) == sum(sum(s) for s in shapes) * 4



# ---------------------------------------------------------------------------------------- resume + schedulers
@pytest.mark.parametrize("name", ["apollo", "frugal", "gradnorm_lorp", "adafactor", "smmf"])
def test_state_dict_round_trip_and_scheduler(single_thread, name, llama):
    """3 steps, save the state (``torch.load(weights_only=True)``), 3 more steps on a fresh optimizer
    equal 6 uninterrupted steps; a LambdaLR scheduler drives every optimizer's ``lr``. Reliability case O8."""

    def make(model):
        groups = ro.param_groups(model, rank=4, update_proj_gap=2)
        opt = {"apollo": lambda: ro.APOLLO(groups, lr=1e-2), "frugal": lambda: ro.FRUGAL(groups, lr=1e-2),
               "gradnorm_lorp": lambda: ro.GradNormLoRP(groups, lr=1e-2),
               "adafactor": lambda: ro.Adafactor(model.parameters(), lr=1e-2),
               "smmf": lambda: ro.SMMF(model.parameters(), lr=1e-2)}[name]()
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

    batches = _batches(6, seed=9)

    def run(model, opt, sched, ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    ref = llama(0).double().train()
    opt, sched = make(ref)
    for ids in batches:
        run(ref, opt, sched, ids)

    model = llama(0).double().train()
    opt, sched = make(model)
    for ids in batches[:3]:
        run(model, opt, sched, ids)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    opt2, sched2 = make(model)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    for ids in batches[3:]:
        run(model, opt2, sched2, ids)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
