"""SALT (``methods/salt.py``): the top-r singular values scaled and shifted, ``X Y`` on the residual
singular block, ReLU — against the authors' weight construction (BioMedIA-MBZUAI/SALT, transcribed
below), the parameter budget, and the usual merge/training checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test__svd_common import (
    adapt_layer,
    canonical_svd64,
    check_gpt2_merge,
    check_param_count,
    check_short_training,
    linear_net,
    w_adapted,
)

import rankwise as rw
from rankwise.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


def reference_salt_weight(w0, rank, scale_a, shift_b, x_mat, y_mat):
    """``SALTLinear`` of ``prompt_adapted_segment_anything/modeling/SALT.py`` transcribed (float64):
    ``get_modified_singular_values`` then ``forward``'s ``U @ relu(new_s) @ Vt``. The SVD is taken
    with rankwise's documented sign convention: the off-diagonal ``X Y`` entries make ``W`` depend
    on the singular vectors' signs."""
    u, s, vt = canonical_svd64(w0)
    s_diag = torch.diag(s)
    top_s = s[:rank]
    modified_top_s = scale_a * top_s + shift_b
    lora_term = x_mat @ y_mat
    new_s = s_diag.clone()
    new_s[:rank, :rank] = torch.diag(modified_top_s)
    new_s[rank:, rank:] += lora_term
    s_new = F.relu(new_s)
    return u @ s_new @ vt


def _set(ad, a, b, x_mat, y_mat):
    with torch.no_grad():
        for p, v in ((ad.salt_scale, a), (ad.salt_shift, b), (ad.salt_X, x_mat), (ad.salt_Y, y_mat)):
            p.copy_(v)


@pytest.mark.parametrize("m,n", [(12, 10), (9, 14)])
def test_weight_matches_the_reference_construction(m, n):
    r, k = 3, 2
    net = linear_net(m, n)
    w0 = net.layer.weight.detach().clone()
    ad = adapt_layer(net, "salt", rank=r, lora_rank=k)
    p = min(m, n)
    g = torch.Generator().manual_seed(8)
    a = 1.0 + 0.3 * torch.randn(r, generator=g, dtype=torch.float64)
    b = 0.3 * torch.randn(r, generator=g, dtype=torch.float64)
    b[0] = -100.0  # ReLU clamps this singular value to 0
    x_mat = 0.5 * torch.randn(p - r, k, generator=g, dtype=torch.float64)
    y_mat = 0.5 * torch.randn(k, p - r, generator=g, dtype=torch.float64)
    _set(ad, a, b, x_mat, y_mat)
    expected = reference_salt_weight(w0, r, a, b, x_mat, y_mat)
    torch.testing.assert_close(w_adapted(net), expected, atol=1e-5, rtol=1e-5)
    # the ReLU acts entrywise: some off-diagonal X Y entries are negative and cut, so it is not a no-op
    rest = torch.diag(canonical_svd64(w0)[1][r:]) + x_mat @ y_mat
    assert (rest < 0).any()
    # the former full-space s·B·A term is not representable: ΔW has no component across the blocks
    u, _, vt = canonical_svd64(w0)
    core = u.T @ (w_adapted(net) - w0.double()) @ vt.T
    assert core[:r, r:].abs().max() < 1e-5 and core[r:, :r].abs().max() < 1e-5


def test_lora_term_does_not_leak_into_the_top_subspace():
    """With α = 1, β = 0 only ``X Y`` acts: ``U_rᵀ ΔW V_r = 0`` (and the cross blocks are 0), while
    the residual block carries the update."""
    r, k = 3, 2
    net = linear_net(16, 12)
    w0 = net.layer.weight.detach().clone()
    ad = adapt_layer(net, "salt", rank=r, lora_rank=k)
    g = torch.Generator().manual_seed(9)
    _set(ad, torch.ones(r), torch.zeros(r), torch.randn(12 - r, k, generator=g), torch.randn(k, 12 - r, generator=g))
    delta = w_adapted(net) - w0.double()
    u, _, vt = canonical_svd64(w0)
    ur, vr, urest, vrest = u[:, :r], vt[:r].T, u[:, r:], vt[r:].T
    assert torch.linalg.matrix_norm(ur.T @ delta @ vr) < 1e-5
    assert torch.linalg.matrix_norm(ur.T @ delta @ vrest) < 1e-5
    assert torch.linalg.matrix_norm(urest.T @ delta @ vr) < 1e-5
    assert torch.linalg.matrix_norm(urest.T @ delta @ vrest) > 1.0


def test_identity_at_init_and_both_factors_train():
    net = linear_net(12, 10)
    ad = adapt_layer(net, "salt", rank=3, lora_rank=2)
    assert torch.count_nonzero(net.layer.delta_weight()) == 0
    assert torch.count_nonzero(ad.salt_Y) == ad.salt_Y.numel()  # X = 0, Y ~ N(0, 0.01²)
    assert 0.002 < ad.salt_Y.std().item() < 0.03
    net(torch.randn(4, 10)).square().sum().backward()
    assert ad.salt_X.grad.abs().max() > 0 and ad.salt_scale.grad.abs().max() > 0


@pytest.mark.parametrize("m,n", [(12, 20), (20, 12), (16, 16)])
def test_parameter_count_is_2r_plus_2k_times_p_minus_r(m, n):
    p = min(m, n)
    check_param_count("salt", m, n, 2 * 3 + 2 * 2 * (p - 3), rank=3, lora_rank=2)  # reference SALT.py L33-35
    assert 2 * 3 + 2 * 2 * (p - 3) != 2 * 3 + 2 * (m + n)  # the former full-space B A budget
    check_param_count("salt", m, n, 2 * p, rank=50, lora_rank=2)  # rank clamped to p: no residual block


def test_gpt2_merge_matches_unmerged_logits(gpt2, token_batch):
    check_gpt2_merge("salt", gpt2, token_batch, rank=2)


def test_short_training_reduces_the_loss():
    check_short_training("salt", rank=4, lora_rank=2)


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="lora_rank"):
        rw.get_method("salt").Config(lora_rank=0)
