"""SVFit (``methods/svfit.py``): the top-r singular values of ``W0`` trained (optionally Cayley
rotations of their vectors), against a dense re-derivation from an independent float64 SVD."""

from __future__ import annotations

import pytest
import torch
from test__svd_common import (
    adapt_layer,
    check_gpt2_merge,
    check_param_count,
    check_short_training,
    linear_net,
    nudge,
    svd64,
    w_adapted,
)

import rankwise as rw
from rankwise.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("m,n", [(12, 20), (20, 12), (16, 16)])
def test_parameter_counts_match_paper_formulas(m, n):
    check_param_count("svfit", m, n, 5, rank=5)
    check_param_count("svfit", m, n, 5 + 2 * (5 * 4 // 2), rank=5, rotate=True)


def test_trains_the_top_singular_values_only():
    net = linear_net(11, 15)
    w0 = net.layer.weight.detach().clone()
    ad = adapt_layer(net, "svfit", rank=3)
    u, s, vt = svd64(w0)
    new = torch.tensor([9.0, 7.5, 6.0], dtype=torch.float64)
    with torch.no_grad():
        ad.sigma.copy_(new)
    w = w_adapted(net)
    # dense re-derivation: the top-3 singular values replaced, vectors and the rest unchanged
    expected = w0.double() + u[:, :3] @ torch.diag(new - s[:3]) @ vt[:3]
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(svd64(w)[1][:3], new, atol=1e-5, rtol=1e-5)


def test_rotate_keeps_singular_values_when_sigma_is_unchanged():
    net = linear_net(11, 15)
    w0 = net.layer.weight.detach().clone()
    ad = adapt_layer(net, "svfit", rank=4, rotate=True)
    nudge([ad.rot_u, ad.rot_v], 3)
    assert net.layer.delta_weight().abs().max() > 1e-2
    torch.testing.assert_close(svd64(w_adapted(net))[1], svd64(w0)[1], atol=1e-5, rtol=1e-5)


def test_gpt2_merge_matches_unmerged_logits(gpt2, token_batch):
    check_gpt2_merge("svfit", gpt2, token_batch, rank=2)


def test_short_training_reduces_the_loss():
    check_short_training("svfit", rank=8, rotate=True)


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="rotate"):
        rw.get_method("svfit").Config(rotate="yes")
