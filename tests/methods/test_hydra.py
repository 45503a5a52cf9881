"""Hydra: the two branches written out literally (parallel on x, sequential on W0 x)."""

from __future__ import annotations

import pytest
import torch
from _factored_helpers import ATOL, _perturb
from torch import nn

import rankwise as rw

pytestmark = pytest.mark.usefixtures("single_thread")


def test_hydra_two_branches_literally():
    model = nn.Sequential(nn.Linear(6, 5))
    rw.adapt(model, "hydra", rank=2, scale=0.7, targets=["0"], seed=0)
    layer = model[0]
    ad = layer.adapters["default"]
    assert torch.count_nonzero(ad.hydra_B_par) == torch.count_nonzero(ad.hydra_B_seq) == 0
    _perturb(ad.parameters(), seed=3)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    w0, b = layer.base.weight.detach().clone(), layer.base.bias.detach()
    with torch.no_grad():
        pre = x @ w0.t()  # the pre-trained feature W0 x
        y = pre + b + 0.7 * (x @ ad.hydra_A_par.t() @ ad.hydra_B_par.t()) \
            + 0.7 * (pre @ ad.hydra_A_seq.t() @ ad.hydra_B_seq.t())
        torch.testing.assert_close(layer(x), y, atol=ATOL, rtol=ATOL)
        dense = 0.7 * (ad.hydra_B_par @ ad.hydra_A_par + ad.hydra_B_seq @ ad.hydra_A_seq @ w0)
        torch.testing.assert_close(layer.delta_weight(), dense, atol=1e-6, rtol=0)
    assert rw.parameter_count(model).trainable == 2 * (6 + 3 * 5)
    # its update reads W0: merge keeps the exact ΔW, unmerge restores W0
    rw.merge(model)
    torch.testing.assert_close(layer.base.weight, w0 + dense, atol=1e-6, rtol=0)
    rw.unmerge(model)
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)


def test_hydra_registered_with_docs():
    doc = __import__("rankwise.methods.hydra", fromlist=["_"]).__doc__
    assert "arXiv" in doc and "Parameters" in doc
    cls = rw.get_method("hydra")
    assert cls.summary and cls.default_lr > 0
