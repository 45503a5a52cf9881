"""OLoRA (methods/olora.py): the QR part of W0 against torch.linalg.qr, and PEFT 0.21 as the oracle."""

from __future__ import annotations

import pytest
import torch
from _init_helpers import check_weight_init_matches_peft, residual
from torch import nn

import rankwise as rw

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _global_seed():
    torch.manual_seed(0)


def test_olora_is_the_qr_part():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 9))
    w = net[0].weight.detach().clone().double()
    rw.adapt(net, "olora", rank=3, alpha=6.0, targets=["0"])
    ad = net[0].adapters["default"]
    a0, b0 = ad.frozen()
    q, r = torch.linalg.qr(w)
    torch.testing.assert_close((b0 @ a0).double(), q[:, :3] @ r[:3], atol=1e-6, rtol=1e-6)  # sign-free product
    torch.testing.assert_close((b0.T @ b0).double(), torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(residual(net[0]).double(), w - 2.0 * q[:, :3] @ r[:3], atol=1e-6, rtol=1e-6)


def test_olora_matches_peft(llama, tmp_path):
    check_weight_init_matches_peft("olora", llama(), tmp_path)
