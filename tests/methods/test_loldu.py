"""LoLDU (``methods/loldu.py``): ``W0 = P L D U`` with the diagonal ``z`` of the first ``r``
components trained at scale ``σ₀ = 1/r`` — against the authors' construction (SKDDJ/LoLDU
``minloldu/loldu.py``, transcribed below), and the usual merge/training checks."""

from __future__ import annotations

import pytest
import torch
from test__svd_common import (
    adapt_layer,
    check_gpt2_merge,
    check_param_count,
    check_short_training,
    linear_net,
    w_adapted,
)

import rankwise as rw
from rankwise.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


def reference_loldu_weight(w0, rank, vector_z, lora_alpha=1.0, scaling_factor=None):
    """``LoLDUParametrization`` transcribed (float64): ``ldu_decomposition``, ``get_residual_matrix``
    (``resmat = W − scaling · P L_r diag(D_r) U_r`` with ``scaling = lora_alpha / rank``) and
    ``loldu_forward`` (``resmat + scaling_factor · P L_r diag(z) U_r``; ``scaling_factor`` starts at
    ``scaling`` and is not in the trained set of ``loldu_utils.name_is_loldu``)."""
    weight = w0.detach().double()
    p_mat, lower, upper = torch.linalg.lu(weight)  # ldu_decomposition
    d = torch.diagonal(upper)
    upper = upper / d.unsqueeze(-1)
    lr_, dr, ur = lower[:, :rank], d[:rank], upper[:rank]
    scaling = lora_alpha / rank
    if scaling_factor is None:
        scaling_factor = scaling
    resmat = weight - scaling * p_mat @ lr_ @ torch.diag(dr) @ ur
    return resmat + scaling_factor * p_mat @ lr_ @ torch.diag(vector_z) @ ur


@pytest.mark.parametrize("m,n,rank", [(9, 14, 4), (14, 9, 4), (9, 14, None)])
def test_weight_matches_the_reference_construction(m, n, rank):
    net = linear_net(m, n)
    w0 = net.layer.weight.detach().clone()
    ad = adapt_layer(net, "loldu", **({} if rank is None else {"rank": rank}))
    r = min(m, n) if rank is None else rank  # the reference's default config: rank = the layer width
    assert ad.rank == r
    # only z is trained (σ frozen at σ₀ = 1/r), as the reference's parameter filter
    assert [n_ for n_, p in ad.named_parameters() if p.requires_grad] == ["loldu_z"]
    z = torch.linspace(-1.0, 2.0, r, dtype=torch.float64)
    with torch.no_grad():
        ad.loldu_z.copy_(z)
    expected = reference_loldu_weight(w0, r, z)
    torch.testing.assert_close(w_adapted(net), expected, atol=1e-5, rtol=1e-5)
    old = reference_loldu_weight(w0, r, z, lora_alpha=r)  # the former σ₀ = 1
    assert (old - expected).abs().max() > 1e-2


def test_train_scale_option_trains_sigma_too():
    net = linear_net(9, 14)
    w0 = net.layer.weight.detach().clone()
    ad = adapt_layer(net, "loldu", rank=4, alpha=2.0, train_scale=True)
    assert rw.parameter_count(net).trainable == 4 + 1
    assert torch.count_nonzero(net.layer.delta_weight()) == 0  # exactly W0 at init
    z = torch.linspace(-1.0, 2.0, 4, dtype=torch.float64)
    with torch.no_grad():
        ad.loldu_z.copy_(z)
        ad.loldu_scale.fill_(0.3)
    expected = reference_loldu_weight(w0, 4, z, lora_alpha=2.0, scaling_factor=0.3)
    torch.testing.assert_close(w_adapted(net), expected, atol=1e-5, rtol=1e-5)
    net(torch.randn(3, 14)).square().sum().backward()
    assert ad.loldu_scale.grad is not None and ad.loldu_scale.grad.abs() > 0


def test_full_rank_z_scales_the_whole_ldu():
    """With full rank and σ₀ = 1/k, ``z = d + k (c − 1) d`` gives ``W = c · W0`` (every component scaled)."""
    net = linear_net(7, 11)
    w0 = net.layer.weight.detach().double()
    ad = adapt_layer(net, "loldu")
    with torch.no_grad():
        ad.loldu_z.add_(7 * 0.5 * ad.loldu_z)
    torch.testing.assert_close(w_adapted(net), 1.5 * w0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("m,n", [(12, 20), (20, 12), (16, 16)])
def test_parameter_counts(m, n):
    check_param_count("loldu", m, n, min(m, n))  # the reference trains z only
    check_param_count("loldu", m, n, 4, rank=4)
    check_param_count("loldu", m, n, 4 + 1, rank=4, train_scale=True)


def test_gpt2_merge_matches_unmerged_logits(gpt2, token_batch):
    check_gpt2_merge("loldu", gpt2, token_batch, rank=2)


def test_short_training_reduces_the_loss():
    check_short_training("loldu")


@pytest.mark.parametrize("kw,field", [({"alpha": -1.0}, "alpha"), ({"train_scale": 1}, "train_scale"),
                                      ({"rank": 0}, "rank")])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        rw.get_method("loldu").Config(**kw)
