"""SingLoRA (``methods/singlora.py``): ``ΔW = (α/r) u(t) A[:out] A[:in]ᵀ`` — symmetry, the ramp-up,
non-square truncation, merge and training."""

from __future__ import annotations

import pytest
import torch
from test__svd_common import (
    adapt_layer,
    check_gpt2_merge,
    check_param_count,
    check_short_training,
    linear_net,
    x_of,
)

import rankwise as rw
from rankwise.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("m,n", [(12, 20), (20, 12), (16, 16)])
def test_parameter_count_is_r_times_the_long_side(m, n):
    check_param_count("singlora", m, n, 3 * max(m, n), rank=3)


def test_square_update_is_symmetric_and_ramps_up():
    net = linear_net(10, 10)
    ad = adapt_layer(net, "singlora", rank=3, alpha=6.0, ramp_up_steps=4)
    assert torch.count_nonzero(net.layer.delta_weight()) == 0  # u(0) = 0
    a = ad.singlora_A.detach().double()
    full = 2.0 * a @ a.T  # α / r = 2
    x = x_of(10)
    net.train()
    for t in range(1, 7):
        net(x).sum().backward()
        u = min(t / 4, 1.0)
        delta = net.layer.delta_weight().double()
        torch.testing.assert_close(delta, u * full, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(delta, delta.T, atol=1e-7, rtol=0)
    net.eval()
    with torch.no_grad():
        net(x)
    assert ad.ramp_step.item() == 6  # eval forwards do not advance the ramp


@pytest.mark.parametrize("m,n", [(6, 11), (11, 6)])
def test_non_square_truncates_the_single_matrix(m, n):
    net = linear_net(m, n)
    ad = adapt_layer(net, "singlora", rank=2, ramp_up_steps=0)
    a = ad.singlora_A.detach().double()
    assert a.shape == (max(m, n), 2)
    delta = net.layer.delta_weight().double()
    torch.testing.assert_close(delta, a[:m] @ a[:n].T, atol=1e-7, rtol=1e-6)
    k = min(m, n)
    torch.testing.assert_close(delta[:k, :k], delta[:k, :k].T, atol=1e-7, rtol=0)


def test_gpt2_merge_matches_unmerged_logits(gpt2, token_batch):
    check_gpt2_merge("singlora", gpt2, token_batch, rank=2)


def test_short_training_reduces_the_loss():
    check_short_training("singlora", rank=4, ramp_up_steps=5)


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="ramp_up_steps"):
        rw.get_method("singlora").Config(ramp_up_steps=-3)
