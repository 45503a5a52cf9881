"""SVFT (``methods/svft.py``): ``ΔW = U M Vᵀ`` with a sparse trained ``M`` — the sparsity patterns in
the singular basis, the sparse activation paths against the dense weight view, the documented
``num_vectors`` deviation from the reference, save/load of the random positions, merge/training."""

from __future__ import annotations

import copy

import pytest
import torch
from test__svd_common import (
    Net,
    adapt_layer,
    check_gpt2_merge,
    check_param_count,
    check_short_training,
    linear_net,
    nudge,
    svd64,
    w_adapted,
    x_of,
)
from torch import nn

import rankwise as rw
from rankwise.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("m,n", [(12, 20), (20, 12), (16, 16)])
def test_parameter_counts_match_paper_formulas(m, n):
    k = min(m, n)
    check_param_count("svft", m, n, k, pattern="plain")  # min(m, n)
    check_param_count("svft", m, n, sum(1 for i in range(k) for j in range(k) if abs(i - j) <= 2),
                      pattern="banded", off_diag=2)  # entries of a band, counted
    check_param_count("svft", m, n, k + 7, pattern="random", num_random=7)


def test_zero_m_gives_w0_and_plain_shifts_singular_values():
    net = linear_net(12, 9)
    base = copy.deepcopy(net)
    ad = adapt_layer(net, "svft", pattern="plain", init="zero")
    x = x_of(9)
    with torch.no_grad():
        assert torch.equal(net(x), base(x))
        ad.svft_diag.copy_(torch.linspace(0.05, 0.4, 9))
    # plain M: W = U (Σ + diag m) Vᵀ, so the singular values are σ_i + m_i (all positive here)
    s0 = svd64(base.layer.weight)[1]
    expected = (s0 + torch.linspace(0.05, 0.4, 9, dtype=torch.float64)).sort(descending=True).values
    torch.testing.assert_close(svd64(w_adapted(net))[1], expected, atol=1e-5, rtol=1e-5)


def test_num_vectors_keeps_the_residual():
    """Documented deviation: with ``num_vectors = p' < p``, ``W = W0 + U_p' M V_p'ᵀ`` (the reference's
    ``rank`` argument rebuilds ``U_p' (Σ_p' + M) V_p'ᵀ`` and drops ``W0``'s other directions)."""
    net = linear_net(12, 9)
    w0 = net.layer.weight.detach().double()
    ad = adapt_layer(net, "svft", pattern="plain", init="zero", num_vectors=3)
    assert torch.equal(w_adapted(net), w0)
    with torch.no_grad():
        ad.svft_diag.copy_(torch.tensor([0.1, 0.2, 0.3]))
    u, s, vt = svd64(w0)
    torch.testing.assert_close(w_adapted(net), w0 + u[:, :3] @ torch.diag(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
                               @ vt[:3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern,kw", [("banded", {"off_diag": 1}), ("random", {"num_random": 6})])
def test_sparsity_pattern_in_the_singular_basis(pattern, kw):
    net = linear_net(10, 13)
    base_w = net.layer.weight.detach().clone()
    ad = adapt_layer(net, "svft", pattern=pattern, seed=3, **kw)
    nudge(ad.parameters(), 4, std=1.0)
    u, _, vt = svd64(base_w)
    core = u.T @ (w_adapted(net) - base_w.double()) @ vt.T  # = M up to the signs of the vectors
    support = core.abs() > 1e-4
    if pattern == "banded":
        i, j = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
        expected = (i - j).abs() <= 1
    else:
        expected = torch.eye(10, dtype=torch.bool)
        expected[ad.rows, ad.cols] = True
        assert expected.sum() == 10 + 6 and not (ad.rows == ad.cols).any()
    assert torch.equal(support, expected)


@pytest.mark.parametrize("pattern", ["banded", "random"])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_sparse_forward_and_gradients_match_the_dense_weight_view(pattern, kind):
    """The banded (shifted multiply-adds, own backward) and random (gather/scatter) activation
    paths give the outputs and the gradients (coefficients and input) of
    ``functional(x, W0 + U M Vᵀ)`` with ``M`` built densely."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    if kind == "linear":
        layer, x = nn.Linear(9, 7), torch.randn(3, 4, 9, generator=g)
    elif kind == "conv2d":
        layer, x = nn.Conv2d(3, 5, 3, padding=1), torch.randn(2, 3, 6, 6, generator=g)
    else:
        layer, x = nn.Embedding(12, 6), torch.randint(0, 12, (2, 5), generator=g)
    net = Net(layer)
    ad = adapt_layer(net, "svft", pattern=pattern, off_diag=2, num_random=9, seed=4)
    nudge(ad.parameters(), 5)
    wrt = [ad.svft_diag, ad.svft_offdiag] + ([x.requires_grad_(True)] if x.is_floating_point() else [])
    out = net(x)
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), wrt)
    view = net.layer.view
    dense = view.weight2d() + ad.u @ ad.dense_m() @ ad.vt
    ref = view.functional(x, dense)
    ref_grads = torch.autograd.grad((ref * w).sum(), wrt)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_random_positions_follow_the_seed_and_survive_save_load(tmp_path):
    a = adapt_layer(linear_net(10, 13), "svft", pattern="random", seed=1)
    b = adapt_layer(linear_net(10, 13), "svft", pattern="random", seed=2)
    assert not torch.equal(torch.stack([a.rows, a.cols]), torch.stack([b.rows, b.cols]))
    net = linear_net(10, 13)
    ad = adapt_layer(net, "svft", pattern="random", seed=5)
    rw.save(net, tmp_path / "s")
    fresh = linear_net(10, 13)
    rw.load(fresh, tmp_path / "s")
    new = fresh.layer.adapters["default"]
    assert torch.equal(new.rows, ad.rows) and torch.equal(new.cols, ad.cols)


def test_gpt2_merge_matches_unmerged_logits(gpt2, token_batch):
    check_gpt2_merge("svft", gpt2, token_batch, pattern="banded", off_diag=1, num_vectors=6)


def test_short_training_reduces_the_loss():
    check_short_training("svft", pattern="banded", off_diag=1)


@pytest.mark.parametrize("kw,field", [({"pattern": "diagonal"}, "pattern"), ({"off_diag": -1}, "off_diag")])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        rw.get_method("svft").Config(**kw)
