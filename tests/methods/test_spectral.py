"""Spectral Adapter (``methods/spectral.py``): additive and rotational tuning of the top-r singular
vectors, against dense re-derivations from an independent float64 SVD."""

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
    check_param_count("spectral", m, n, 3 * (m + n), rank=3, mode="additive")
    check_param_count("spectral", m, n, 2 * (3 * 2 // 2), rank=3, mode="rotational")


def test_rotational_keeps_the_singular_values():
    net = linear_net(13, 9)
    w0 = net.layer.weight.detach().clone()
    ad = adapt_layer(net, "spectral", rank=4, mode="rotational")
    nudge(ad.parameters(), 5)
    w = w_adapted(net)
    assert (w - w0.double()).abs().max() > 1e-2
    torch.testing.assert_close(svd64(w)[1], svd64(w0)[1], atol=1e-5, rtol=1e-5)
    # the bottom singular subspaces are untouched: W V_rest = W0 V_rest
    vt = svd64(w0)[2]
    torch.testing.assert_close(w @ vt[4:].T, w0.double() @ vt[4:].T, atol=1e-5, rtol=0)


def test_additive_changes_only_the_top_part():
    net = linear_net(13, 9)
    w0 = net.layer.weight.detach().clone()
    ad = adapt_layer(net, "spectral", rank=3, mode="additive")
    nudge(ad.parameters(), 6)
    u, s, vt = svd64(w0)
    w_rest = u[:, 3:] @ torch.diag(s[3:]) @ vt[3:]
    top = w_adapted(net) - w_rest  # = (U_r + A_U) Σ_r (V_r + A_V)ᵀ: rank 3
    assert torch.linalg.matrix_rank(top, atol=1e-4) == 3
    # dense re-derivation from the adapter's trained factors (sign-independent: U_r Σ_r V_rᵀ is unique)
    au, avt = ad.spectral_U.detach().double(), ad.spectral_V.detach().double()
    ur, vtr = ad.u.double(), ad.vt.double()
    expected = (ur + au) @ torch.diag(s[:3]) @ (vtr + avt)
    torch.testing.assert_close(top, expected, atol=1e-5, rtol=1e-5)


def test_gpt2_merge_matches_unmerged_logits(gpt2, token_batch):
    check_gpt2_merge("spectral", gpt2, token_batch, rank=2)


def test_short_training_reduces_the_loss():
    check_short_training("spectral", rank=4)


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="mode"):
        rw.get_method("spectral").Config(mode="rotate")
