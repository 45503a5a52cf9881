"""SORSA (``methods/sorsa.py``): the trainable principal SVD part plus a frozen residual, and the
orthonormal regularizer against the authors' ``(gamma / learning_rate) · calc_ortho(model)``
(Gunale0926/SORSA ``sorsalib/src/sorsa``, transcribed below)."""

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
from torch import nn

import rankwise as rw
from rankwise.errors import ConfigError
from rankwise.methods.sorsa import regularizer

pytestmark = pytest.mark.usefixtures("single_thread")


def reference_calc_ortho(named_parameters):
    """``layer.calc_ortho`` transcribed: one Frobenius norm per ``sorsa_A`` (``A Aᵀ − I``, A = V_pᵀ)
    and per ``sorsa_B`` (``Bᵀ B − I``, B = U_p), averaged over the matrices (``ortho_loss / den``)."""
    ortho_loss, den = 0.0, 0
    for name, param in named_parameters:
        if "sorsa_A" in name:
            a = param
            ia = torch.eye(a.shape[0], dtype=a.dtype)
            ortho_loss += torch.norm(a @ a.T - ia, p="fro")
            den += 1
        elif "sorsa_B" in name:
            b = param
            ib = torch.eye(b.shape[1], dtype=b.dtype)
            ortho_loss += torch.norm(b.T @ b - ib, p="fro")
            den += 1
    return ortho_loss / den if den else None


def reference_named_parameters(model):
    """The model's SORSA factors under the reference's names: its ``sorsa_init`` sets
    ``sorsa_A = u[:, :r].T`` and ``sorsa_B = vt[:r].T`` for ``svd(W.T)``, i.e. ``A = V_pᵀ`` (r × in),
    ``B = U_p`` (out × r)."""
    out = []
    for name, m in model.named_modules():
        for ad in getattr(m, "adapters", {}).values():
            out += [(f"{name}.sorsa_A", ad.sorsa_Vt), (f"{name}.sorsa_B", ad.sorsa_U)]
    return out


@pytest.mark.parametrize("lr", [None, 2e-3, 3e-5])
def test_loss_term_is_gamma_over_lr_times_calc_ortho(lr):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 12), nn.Linear(12, 9), nn.Linear(9, 9))
    kw = {} if lr is None else {"lr": lr}
    rw.adapt(net, "sorsa", rank=3, gamma=0.25, targets=["0", "1", "2"], seed=0, **kw)
    ads = [net[i].adapters["default"] for i in range(3)]
    eta = 1e-3 if lr is None else lr  # None: the method's default_lr
    assert float(rw.rank_regularization(net).detach()) < 1e-6 * 0.25 / eta  # orthonormal at init
    nudge([p for ad in ads for p in (ad.sorsa_U, ad.sorsa_Vt)], 4)
    assert rw.get_method("sorsa").default_lr == 1e-3
    expected = (0.25 / eta) * reference_calc_ortho(reference_named_parameters(net))  # trainer.py L2658-2661
    got = rw.rank_regularization(net)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(regularizer(net), reference_calc_ortho(reference_named_parameters(net)))
    # the former γ · (mean over layers of the per-layer sum) is 2η times smaller
    old = 0.25 * torch.stack([ad.orthonormal_loss() for ad in ads]).mean()
    torch.testing.assert_close(old / got, torch.tensor(2 * eta))


def test_loss_term_off_and_validation():
    off = nn.Sequential(nn.Linear(10, 12))
    rw.adapt(off, "sorsa", rank=3, gamma=0.0, targets=["0"], seed=0)
    assert rw.rank_regularization(off) is None
    with pytest.raises(ConfigError, match="gamma"):
        rw.adapt(nn.Sequential(nn.Linear(10, 12)), "sorsa", rank=3, gamma=-1.0, targets=["0"])
    with pytest.raises(ConfigError, match="lr"):
        rw.get_method("sorsa").Config(lr=0.0)


def test_init_is_the_reference_principal_part():
    """``sorsa_init``: ``(B * S) @ A`` with ``A, S, B`` from ``svd(W.T)`` is the top-r part of W0 (sign-free)."""
    net = linear_net(12, 10)
    w0 = net.layer.weight.detach().double()
    ad = adapt_layer(net, "sorsa", rank=3)
    u, s, vt = torch.linalg.svd(w0.T, full_matrices=False)
    a_ref, s_ref, b_ref = u[:, :3].T, s[:3], vt[:3].T
    torch.testing.assert_close((ad.sorsa_U.detach().double() * ad.sorsa_S.detach().double()) @ ad.sorsa_Vt.detach().double(),
                               (b_ref * s_ref) @ a_ref, atol=1e-5, rtol=1e-5)


def test_is_the_residual_plus_the_trained_principal_part():
    net = linear_net(12, 10)
    w0 = net.layer.weight.detach().clone()
    ad = adapt_layer(net, "sorsa", rank=3)
    assert ad.orthonormal_loss() < 1e-5
    nudge(ad.parameters(), 7, std=0.1)
    u, s, vt = svd64(w0)
    w_res = u[:, 3:] @ torch.diag(s[3:]) @ vt[3:]
    up, sp, vtp = (t.detach().double() for t in (ad.sorsa_U, ad.sorsa_S, ad.sorsa_Vt))
    torch.testing.assert_close(w_adapted(net), w_res + up @ torch.diag(sp) @ vtp, atol=1e-5, rtol=1e-5)
    # the per-layer regularizer is the closed form, and > 0 once the factors left orthonormality
    eye = torch.eye(3, dtype=torch.float64)
    expected = torch.linalg.matrix_norm(up.T @ up - eye) + torch.linalg.matrix_norm(vtp @ vtp.T - eye)
    torch.testing.assert_close(ad.orthonormal_loss().double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(regularizer(net), ad.orthonormal_loss() / 2)  # mean over the 2 matrices


def test_regularizer_keeps_the_factors_orthonormal():
    def run(gamma):
        net = linear_net(12, 10)
        ad = adapt_layer(net, "sorsa", rank=4)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 10, generator=g)
        target = torch.randn(64, 12, generator=g)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=2e-2)
        for _ in range(40):
            loss = (net(x) - target).square().mean() + gamma * regularizer(net)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return ad.orthonormal_loss().item()

    free, regularized = run(0.0), run(2.0)
    assert free > 0.05 and regularized < 0.5 * free


def test_rank_is_clamped_to_the_layer():
    net = linear_net(4, 6)
    ad = adapt_layer(net, "sorsa", rank=50)
    assert ad.rank == 4 and rw.parameter_count(net).trainable == 4 * (4 + 6 + 1)


@pytest.mark.parametrize("m,n", [(12, 20), (20, 12), (16, 16)])
def test_parameter_count(m, n):
    check_param_count("sorsa", m, n, 3 * (m + n + 1), rank=3)


def test_gpt2_merge_matches_unmerged_logits(gpt2, token_batch):
    check_gpt2_merge("sorsa", gpt2, token_batch, rank=2)


def test_short_training_reduces_the_loss():
    check_short_training("sorsa", rank=4)


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="rank"):
        rw.get_method("sorsa").Config(rank=1.5)
