"""DyLoRA: every truncation equals a LoRA holding the truncated factors; frozen-mode gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from _rank_helpers import ATOL, Net, adapters, fill, train_net, x_batch

import rankwise as rw
from rankwise.core.api import adapter_state
from rankwise.methods import dylora

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


# ---- DyLoRA ---------------------------------------------------------------------------------------
def test_dylora_every_rank_equals_truncated_lora():
    r, alpha = 5, 3.0
    base = Net(dims=(6, 8, 7, 6))
    model = rw.adapt(copy.deepcopy(base), "dylora", rank=r, alpha=alpha, targets=["l1", "l2", "l3"], seed=0)
    for ad in adapters(model).values():
        fill([ad.lora_B], 11)
    model.eval()
    x = x_batch(2)
    outs = []
    for b in range(1, r + 1):
        dylora.set_rank(model, b)
        lora = rw.adapt(copy.deepcopy(base), "lora", rank=b, alpha=alpha, targets=["l1", "l2", "l3"], seed=1).eval()
        lo = adapters(lora)
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
    for ad in adapters(model).values():
        fill([ad.lora_B], 3)
    cfg = rw.get_method("dylora").Config(rank=4)
    sampled = []
    model.train()
    for step in range(1, 9):
        b = rw.rank_step(model, step)["default"]["train_rank"]
        assert b == cfg.sample(step)  # seeded by (seed, step): reproducible
        sampled.append(b)
        model.zero_grad()
        model(x_batch(step)).square().mean().backward()
        for ad in adapters(model).values():
            assert ad.active_rank() == b
            nz_a = torch.nonzero(ad.lora_A.grad.abs().sum(1)).flatten().tolist()
            nz_b = torch.nonzero(ad.lora_B.grad.abs().sum(0)).flatten().tolist()
            assert nz_a == [b - 1] and nz_b == [b - 1]
    assert len(set(sampled)) > 1




def test_train_loop_drives_dylora():
    model = train_net("dylora", rank=3)
    assert {ad.train_rank for ad in adapters(model).values()} == {adapter_state(model)["default"]["config"].sample(12)}
