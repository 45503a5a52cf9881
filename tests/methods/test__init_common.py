"""The residual layout shared by the weight- and data-driven inits (methods/_init_common.py): the
base weight is never modified, switching the adapter off gives the original model back exactly,
and merge / unmerge / unadapt restore it."""

from __future__ import annotations

import copy

import pytest
import torch
from _init_helpers import TARGETS, ids, logits, sgd

import rankwise as rw

pytestmark = pytest.mark.usefixtures("single_thread")


def test_residual_methods_give_the_original_model_back(llama):
    torch.manual_seed(0)
    base = llama()
    model = copy.deepcopy(base)
    rw.adapt(model, "pissa", rank=2, targets=TARGETS)
    x = ids()
    sgd(model, x)
    assert not torch.allclose(logits(model, x), logits(base, x))
    rw.set_active(model, None)
    assert torch.equal(logits(model, x), logits(base, x))
    rw.set_active(model, "default")
    trained = logits(model, x)
    rw.merge(model)
    torch.testing.assert_close(logits(model, x), trained, atol=1e-5, rtol=1e-5)
    rw.unmerge(model)
    rw.unadapt(model)
    for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)
