"""Gradient calibration ignores, and gives back, a ``.grad`` the caller left on a target weight.

Oracles: plain autograd (the mean over the calibration batches of ``∂loss/∂W`` on a fresh copy of
the model, with no gradient left on it), and the LoRA-GA adapter built from a model without the
stale gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.core.calibrate import Batches, collect
from rankwise.core.layers import LayerView

pytestmark = pytest.mark.usefixtures("single_thread")
TARGETS = ["q_proj", "v_proj"]
Q = "model.layers.0.self_attn.q_proj"


def _ids(seed):
    return torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(seed))


BATCHES = [_ids(10), _ids(11)]


def _loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def _dense_mean_grad(base, name):
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.grad = None
    for b in BATCHES:
        _loss(model, b).backward()
    return model.get_submodule(name).weight.grad / len(BATCHES)


def test_calibration_gradient_ignores_and_restores_a_stale_grad(llama):
    base = llama(0)
    oracle = _dense_mean_grad(base, Q)
    model = copy.deepcopy(base)
    w = model.get_submodule(Q).weight
    stale = 100 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    w.grad = stale.clone()
    calib = collect(model, {Q: LayerView(model.get_submodule(Q), Q)}, ("grad",),
                    Batches(BATCHES, loss_fn=_loss, progress=False), method="test")
    torch.testing.assert_close(calib[Q].grad, oracle, rtol=1e-5, atol=1e-7)
    assert w.grad is not None and torch.equal(w.grad, stale)
    assert w.requires_grad  # the caller's flag is back too


def test_lora_ga_is_unchanged_by_a_stale_grad(llama):
    base = llama(0)
    ref = copy.deepcopy(base)
    mine = copy.deepcopy(base)
    w = mine.get_submodule(Q).weight
    stale = 100 * torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    w.grad = stale.clone()
    for m in (ref, mine):
        rw.adapt(m, "lora_ga", rank=4, alpha=8, targets=TARGETS, seed=0,
                 calibration=Batches(BATCHES, progress=False), loss_fn=_loss)
    ours = {n: p for n, p in mine.named_parameters() if "lora_" in n}
    theirs = dict(ref.named_parameters())
    assert ours
    for n, p in ours.items():
        assert torch.equal(p, theirs[n]), n
    assert torch.equal(mine.get_submodule(Q).base.weight.grad, stale)
    for n, p in mine.named_parameters():
        if n != f"{Q}.base.weight":
            assert p.grad is None, n
