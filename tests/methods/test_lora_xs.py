"""LoRA-XS (``methods/lora_xs.py``): ``ΔW = s · U_r R Σ_r V_rᵀ`` against the authors' construction
(MohammadrezaBanaei/LoRA-XS, transcribed below), save/load, a GPT-2 merge and a short training run."""

from __future__ import annotations

import pytest
import torch
from test__svd_common import (
    adapt_layer,
    canonical_svd64,
    check_gpt2_merge,
    check_param_count,
    check_short_training,
    linear_net,
    nudge,
    svd64,
    x_of,
)

import rankwise as rw
from rankwise.errors import ConfigError
from rankwise.io.atomic import read_tensors

pytestmark = pytest.mark.usefixtures("single_thread")


def reference_lora_xs_factors(w0: torch.Tensor, r: int):
    """``(lora_A, lora_B)`` as LoRA-XS builds them, transcribed (float64, torch's SVD standing in for
    sklearn's ``TruncatedSVD``, which computes the same top-``r`` triplets):

    * ``initialization_utils.py``: ``get_replacement_module(weight=target.weight.T)`` — SVD of ``W0ᵀ``;
    * ``svd_utils.py``: ``enc = svd.transform(W0ᵀ) = W0ᵀ components_ᵀ``, ``dec = svd.components_``;
    * ``lora_B.weight = dec.T``, ``lora_A.weight = enc.T``;

    with the documented sign convention of rankwise's SVD (the largest entry of each column of
    ``lora_B`` positive), since an SVD's signs are arbitrary and ``B R A`` depends on them.
    """
    wt = w0.detach().double().T  # (in × out)
    _, _, components = torch.linalg.svd(wt, full_matrices=False)
    components = components[:r]  # svd.components_: top-r right singular vectors of W0ᵀ, rows (r × out)
    sign = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    components = components * sign
    enc = wt @ components.T  # svd.transform(W0ᵀ)   (in × r)
    return enc.T, components.T  # lora_A.weight (r × in), lora_B.weight (out × r)


def reference_delta(lora_a, lora_b, r_mat, scale):
    """``latent_utils.forward_latent``: ``lora_B(latent(lora_A(x))) · scaling`` → ``ΔW = s B R A``."""
    return scale * lora_b @ r_mat @ lora_a


@pytest.mark.parametrize("m,n,alpha", [(14, 10, 6.0), (9, 13, None)])
def test_delta_weight_and_gradient_match_the_reference(m, n, alpha):
    r = 3
    net = linear_net(m, n)
    kw = {} if alpha is None else {"alpha": alpha}
    ad = adapt_layer(net, "lora_xs", rank=r, **kw)
    nudge([ad.lora_R], 1)
    scale = (r if alpha is None else alpha) / r
    a_ref, b_ref = reference_lora_xs_factors(net.layer.base.weight, r)
    rr = ad.lora_R.detach().double().requires_grad_(True)
    ref = reference_delta(a_ref, b_ref, rr, scale)
    dw = net.layer.delta_weight()
    torch.testing.assert_close(dw.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    # the singular values sit on the input side of R: lora_A's rows have norms σ_r, lora_B is orthonormal
    s = svd64(net.layer.base.weight)[1][:r]
    torch.testing.assert_close(a_ref.norm(dim=1), s)
    old = scale * (b_ref * s) @ rr.detach() @ (a_ref / s[:, None])  # the former U_r Σ_r R V_rᵀ
    assert (old - ref.detach()).abs().max() > 1e-2

    # ∂L/∂R for one upstream gradient G = ∂L/∂ΔW: the reference's autograd and its closed form s·U_rᵀ G V_r Σ_r
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (grad_ref,) = torch.autograd.grad((ref * g).sum(), rr)
    torch.testing.assert_close(grad_ref, scale * b_ref.T @ g @ a_ref.T)
    (grad,) = torch.autograd.grad((dw * g.float()).sum(), ad.lora_R)
    torch.testing.assert_close(grad.double(), grad_ref, atol=1e-4, rtol=1e-4)
    u, _, vt = canonical_svd64(net.layer.base.weight)
    grad_old = scale * torch.diag(s) @ u[:, :r].T @ g @ vt[:r].T  # what Σ on the left of R gave
    assert (grad_old - grad_ref).abs().max() > 1e-2 * grad_ref.abs().max()

    # the activation view trains R the same way: G = gᵀ x for an output gradient g
    x = x_of(n, rows=6)
    g_out = torch.randn(6, m, generator=torch.Generator().manual_seed(4))
    (grad_fwd,) = torch.autograd.grad((net(x) * g_out).sum(), ad.lora_R)
    ref = reference_delta(a_ref, b_ref, rr, scale)
    (grad_fwd_ref,) = torch.autograd.grad((ref * (g_out.T @ x).double()).sum(), rr)
    torch.testing.assert_close(grad_fwd.double(), grad_fwd_ref, atol=1e-4, rtol=1e-4)


def test_update_lies_in_the_top_singular_subspaces():
    net = linear_net(14, 10)
    ad = adapt_layer(net, "lora_xs", rank=3, alpha=6.0)
    nudge([ad.lora_R], 1)
    w0 = net.layer.base.weight
    delta = net.layer.delta_weight().double()
    u, s, vt = svd64(w0)
    pu, pv = u[:, :3] @ u[:, :3].T, vt[:3].T @ vt[:3]
    torch.testing.assert_close(pu @ delta @ pv, delta, atol=1e-5, rtol=0)
    assert torch.linalg.matrix_rank(delta, atol=1e-4) == 3
    # ‖ΔW‖_F = s ‖R Σ_r‖_F (orthonormal U_r, V_r), s = α / r = 2
    expected = 2.0 * torch.linalg.matrix_norm(ad.lora_R.detach().double() * s[:3])
    torch.testing.assert_close(torch.linalg.matrix_norm(delta), expected, atol=1e-5, rtol=1e-5)


def test_saves_only_r(tmp_path):
    net = linear_net(14, 10)
    ad = adapt_layer(net, "lora_xs", rank=3)
    nudge([ad.lora_R], 2)
    rw.save(net, tmp_path / "a")
    tensors = read_tensors(tmp_path / "a" / "adapter_model.safetensors", "")
    assert sum(t.numel() for t in tensors.values()) == 9
    fresh = linear_net(14, 10)
    rw.load(fresh, tmp_path / "a")
    x = x_of(10)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


@pytest.mark.parametrize("m,n", [(12, 20), (20, 12), (16, 16)])
def test_parameter_count_is_r_squared(m, n):
    check_param_count("lora_xs", m, n, 4 * 4, rank=4)


def test_gpt2_merge_matches_unmerged_logits(gpt2, token_batch):
    check_gpt2_merge("lora_xs", gpt2, token_batch, rank=2)


def test_short_training_reduces_the_loss():
    check_short_training("lora_xs", rank=4)


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="rank"):
        rw.get_method("lora_xs").Config(rank=0)
