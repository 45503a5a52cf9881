"""LoRMA₊ (``methods/lorma.py``): ``W = (I + s B A) W0`` — a left multiplication of ``W0`` (its null
space is kept), input dropout, merge and training."""

from __future__ import annotations

import pytest
import torch
from test__svd_common import (
    Net,
    adapt_layer,
    check_gpt2_merge,
    check_param_count,
    check_short_training,
    nudge,
    svd64,
    w_adapted,
)
from torch import nn

import rankwise as rw
from rankwise.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("m,n", [(12, 20), (20, 12), (16, 16)])
def test_parameter_count_is_2r_out(m, n):
    check_param_count("lorma", m, n, 2 * 3 * m, rank=3)


def test_is_a_left_multiplication_of_w0():
    torch.manual_seed(0)
    layer = nn.Linear(8, 10)
    with torch.no_grad():  # a rank-4 W0: the multiplicative update cannot leave its row space
        layer.weight.copy_(torch.randn(10, 4) @ torch.randn(4, 8))
    net = Net(layer)
    w0 = layer.weight.detach().double().clone()
    ad = adapt_layer(net, "lorma", rank=3, alpha=1.5)
    nudge(ad.parameters(), 9)
    b, a = ad.lorma_B.detach().double(), ad.lorma_A.detach().double()
    w = w_adapted(net)
    torch.testing.assert_close(w, (torch.eye(10, dtype=torch.float64) + 0.5 * b @ a) @ w0, atol=1e-5, rtol=1e-5)
    null = svd64(w0)[2][4:]  # W0's null space stays W's null space
    assert (w @ null.T).abs().max() < 1e-5
    assert torch.linalg.matrix_rank(w, atol=1e-4) == 4


def test_dropout_drops_the_update_input_only():
    """Training with dropout p: ``y = W0 x + b + s B A W0 drop(x)``; eval: no dropout."""
    torch.manual_seed(0)
    net = Net(nn.Linear(8, 10))
    ad = adapt_layer(net, "lorma", rank=3, dropout=0.5)
    nudge(ad.parameters(), 9)
    x = torch.randn(64, 8)
    w0, bias = net.layer.base.weight.detach(), net.layer.base.bias.detach()
    upd = ad.scale * ad.lorma_B.detach() @ ad.lorma_A.detach() @ w0
    net.train()
    torch.manual_seed(5)
    out = net(x).detach()
    torch.manual_seed(5)
    dropped = torch.nn.functional.dropout(x, 0.5)
    torch.testing.assert_close(out, x @ w0.T + bias + dropped @ upd.T, atol=1e-5, rtol=1e-5)
    net.eval()
    torch.testing.assert_close(net(x).detach(), x @ (w0 + upd).T + bias, atol=1e-5, rtol=1e-5)


def test_gpt2_merge_matches_unmerged_logits(gpt2, token_batch):
    check_gpt2_merge("lorma", gpt2, token_batch, rank=2)


def test_short_training_reduces_the_loss():
    check_short_training("lorma", rank=4)


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="alpha"):
        rw.get_method("lorma").Config(alpha=0.0)
