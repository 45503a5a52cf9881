"""circular (C3A, Chen et al. 2024): PEFT 0.21 oracle, explicit circulant blocks, finite differences
for the FFT path's input gradient (where PEFT's own backward is wrong)."""

from __future__ import annotations

import copy

import pytest
import torch
from _structured_helpers import (
    cases,
    check_clamps_round_trip_through_peft_patterns,
    check_config_round_trip,
    check_export_refuses_hf_conv1d,
    check_gradients_equal_dense_weight_view,
    check_peft_round_trip,
    check_same_as_peft,
    linear,
)
from torch import nn

import rankwise as rw
from rankwise.core.layers import LayerView
from rankwise.methods.circular import _BlockCirculant, block_of

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("single_thread")]


@pytest.mark.parametrize("case", cases("circular"))
def test_same_weights_as_peft_same_outputs_and_gradients(case, request, token_batch):
    check_same_as_peft(case, request, token_batch)


@pytest.mark.parametrize("case", cases("circular"))
def test_gradients_equal_dense_weight_view(case, request, token_batch):
    check_gradients_equal_dense_weight_view(case, request, token_batch)


@pytest.mark.parametrize("case", cases("circular"))
def test_export_import_peft_round_trip(case, request, token_batch, tmp_path):
    check_peft_round_trip(case, request, token_batch, tmp_path)


def test_clamped_block_round_trips_through_peft_pattern(tmp_path):
    check_clamps_round_trip_through_peft_patterns("circular", {"block_size": 8}, "block_size_pattern", tmp_path)


def test_export_refuses_layers_peft_lacks(gpt2, tmp_path):
    check_export_refuses_hf_conv1d("circular", {"block_size": 8}, gpt2, tmp_path)


def test_input_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64, generator=g)
    w = torch.randn(2, 2, 4, dtype=torch.float64, generator=g)
    go = torch.randn(3, 4 * 2, dtype=torch.float64, generator=g)
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(_BlockCirculant.apply(xr, w, 1.0), xr, go)
    eps = 1e-6
    for i in range(x.numel()):
        d = torch.zeros(x.numel(), dtype=torch.float64)
        d[i] = eps
        d = d.view(x.shape)
        num = ((_BlockCirculant.apply(x + d, w, 1.0) - _BlockCirculant.apply(x - d, w, 1.0)) * go).sum() / (2 * eps)
        assert abs(num - gx.view(-1)[i]) < 1e-7


def test_blocks_are_circulant_and_match_the_kernels():
    m, n = 12, 18
    model = rw.adapt(linear(m, n), "circular", block_size=6, seed=0)
    ad = model[0].adapters["default"]
    assert ad.block == 6 and rw.parameter_count(model).trainable == m * n // 6
    w, dw = ad.c3a_kernel.detach(), ad.delta_weight()
    for i in range(m // 6):
        for j in range(n // 6):
            for t in range(6):
                for s in range(6):
                    assert dw[i * 6 + t, j * 6 + s] == w[i, j, (s - t) % 6] / n


def test_fft_path_gradcheck():
    g = torch.Generator().manual_seed(0)
    for b in (4, 5):  # even and odd block (Nyquist bin or not)
        x = torch.randn(3, 2 * b, dtype=torch.float64, generator=g, requires_grad=True)
        w = torch.randn(3, 2, b, dtype=torch.float64, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x_, w_: _BlockCirculant.apply(x_, w_, 0.5), (x, w))


def test_paths_agree():
    """The FFT path and the dense path give the same outputs and gradients (float64), and 'auto' picks
    the FFT path only for wide layers."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 8)).double()
    x = torch.randn(5, 3, 12, dtype=torch.float64)
    outs, grads = [], []
    for path in ("fft", "dense"):
        model = rw.adapt(copy.deepcopy(net), "circular", block_size=4, path=path, seed=0)
        ad = model[0].adapters["default"]
        assert ad.use_fft == (path == "fft") and ad.computes_base == (path == "dense")
        out = model(x)
        (g,) = torch.autograd.grad(out.square().sum(), ad.c3a_kernel)
        outs.append(out)
        grads.append(g)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=1e-10)
    auto = rw.get_method("circular")
    assert auto(LayerView(nn.Linear(4096, 4096)), auto.Config(block_size=128)).use_fft
    assert not auto(LayerView(nn.Linear(384, 1536)), auto.Config(block_size=128)).use_fft


def test_block_clamp():
    """b = the largest divisor of gcd(m, n) not above block_size (PEFT would refuse 256 on 384 × 1536)."""
    cfg = rw.get_method("circular").Config(block_size=256)
    for (m, n), b in {(384, 1536): 192, (384, 384): 192, (7, 5): 1, (64, 48): 16}.items():
        assert block_of(LayerView(nn.Linear(n, m)), cfg) == b


def test_config_round_trips_and_rejects_bad_values():
    check_config_round_trip("circular", {"block_size": 0})
