"""hra (Householder reflection adaptation, Yuan et al. 2024): PEFT 0.21 oracle, W0 times an explicit
product of reflections (float64, as in the authors' ``HRALinear``), and bfloat16 / autocast against it."""

from __future__ import annotations

import copy

import pytest
import torch
from _structured_helpers import (
    cases,
    check_config_round_trip,
    check_export_refuses_hf_conv1d,
    check_gradients_equal_dense_weight_view,
    check_low_precision,
    check_peft_round_trip,
    check_same_as_peft,
    linear,
    randomize,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

import rankwise as rw
from rankwise.errors import ConfigError
from rankwise.methods.hra import orthogonality_loss

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("single_thread")]


@pytest.mark.parametrize("case", cases("hra"))
def test_same_weights_as_peft_same_outputs_and_gradients(case, request, token_batch):
    check_same_as_peft(case, request, token_batch)


@pytest.mark.parametrize("case", cases("hra"))
def test_gradients_equal_dense_weight_view(case, request, token_batch):
    check_gradients_equal_dense_weight_view(case, request, token_batch)


@pytest.mark.parametrize("case", cases("hra"))
def test_export_import_peft_round_trip(case, request, token_batch, tmp_path):
    check_peft_round_trip(case, request, token_batch, tmp_path)


def test_export_refuses_layers_peft_lacks(gpt2, tmp_path):
    check_export_refuses_hf_conv1d("hra", {"rank": 2}, gpt2, tmp_path)


def _reflections(u: torch.Tensor) -> torch.Tensor:
    """Π_i (I − 2 u_i u_iᵀ / ‖u_i‖²), one explicit reflection at a time (the authors' ``HRALinear.forward``)."""
    h = torch.eye(u.shape[0], dtype=u.dtype)
    for i in range(u.shape[1]):
        v = u[:, i:i + 1]
        h = h @ (torch.eye(u.shape[0], dtype=u.dtype) - 2 * v @ v.t() / (v.t() @ v))
    return h


def _gram_schmidt_reflection(u: torch.Tensor) -> torch.Tensor:
    """``I − 2 Q Qᵀ`` with Q from classical Gram–Schmidt of U's columns (the authors' ``apply_GS`` branch)."""
    q = []
    for i in range(u.shape[1]):
        v = u[:, i] - sum((qq @ u[:, i]) * qq for qq in q)
        q.append(v / v.norm())
    q = torch.stack(q, 1)
    return torch.eye(u.shape[0], dtype=u.dtype) - 2 * q @ q.t()


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_is_w0_times_the_product_of_reflections_and_keeps_neuron_norms(kind):
    torch.manual_seed(0)
    layer = nn.Linear(9, 5) if kind == "linear" else nn.Conv2d(2, 4, 2)
    net = nn.Sequential(layer).double()
    model = rw.adapt(copy.deepcopy(net), "hra", rank=4, targets=["0"], seed=0)
    ad = model[0].adapters["default"]
    randomize(ad.parameters(), seed=2, std=1.0)
    w0 = net[0].weight.reshape(net[0].weight.shape[0], -1)
    w = w0 + ad.delta_weight().reshape(w0.shape)
    torch.testing.assert_close(w, w0 @ _reflections(ad.hra_u.detach()), atol=1e-12, rtol=1e-10)
    # H orthogonal: each output neuron's weight vector keeps its norm, and all angles between them
    torch.testing.assert_close(w.norm(dim=1), w0.norm(dim=1), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(w @ w.t(), w0 @ w0.t(), atol=1e-12, rtol=1e-10)
    assert (w - w0).abs().max() > 0.1


def test_gram_schmidt_variant():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 5)).double()
    model = rw.adapt(copy.deepcopy(net), "hra", rank=3, apply_gs=True, init="random", targets=["0"], seed=0)
    ad = model[0].adapters["default"]
    ref = net[0].weight @ _gram_schmidt_reflection(ad.hra_u.detach()) - net[0].weight
    torch.testing.assert_close(ad.delta_weight(), ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mode", ["bf16", "autocast"])
@pytest.mark.parametrize("kind", ["linear", "hf_conv1d", "conv2d"])
@pytest.mark.parametrize("gs", [False, True], ids=["wy", "gram_schmidt"])
def test_bfloat16_and_autocast_follow_the_reflections(gs, kind, mode):
    """Was broken: a bfloat16 layer, or autocast, sent the r × r triangular solve (and the Gram–Schmidt QR)
    to CPU kernels that have no half precision (NotImplementedError "triangular_solve_cpu" / "geqrf_cpu").
    Now ``W0 · H`` holds within bfloat16 rounding of the explicit float64 product, gradients included."""
    torch.manual_seed(0)
    layer, x = {
        "linear": (nn.Linear(10, 6), torch.randn(3, 4, 10)),
        "hf_conv1d": (Conv1D(6, 10), torch.randn(3, 4, 10)),
        "conv2d": (nn.Conv2d(3, 5, 2), torch.randn(2, 3, 5, 5)),
    }[kind]
    if kind == "hf_conv1d":
        nn.init.normal_(layer.weight, std=0.3)
    opts = {"rank": 3, "apply_gs": True, "init": "random"} if gs else {"rank": 4}
    h = _gram_schmidt_reflection if gs else _reflections
    check_low_precision("hra", opts, layer, x, lambda p, w0: w0 @ h(p["hra_u"]), mode)


def test_symmetric_init_is_identity_up_to_rounding_and_regularizer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 8))
    model = rw.adapt(copy.deepcopy(net), "hra", rank=4, reg=0.5, targets=["0", "1"], seed=0)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), atol=1e-6, rtol=1e-6)
    ad = model[0].adapters["default"]
    u = ad.hra_u.detach()
    assert torch.equal(u[:, 0], u[:, 1]) and not torch.equal(u[:, 0], u[:, 2])
    un = u / u.norm(dim=0)
    expected = 0.5 * ((un.t() @ un - torch.eye(4)) ** 2).sum()
    torch.testing.assert_close(ad.regularization(), expected)
    total = orthogonality_loss(model)
    torch.testing.assert_close(total, expected + model[1].adapters["default"].regularization())
    total.backward()
    assert ad.hra_u.grad is not None and ad.hra_u.grad.abs().max() > 0
    with torch.no_grad():  # orthonormal columns: no penalty
        ad.hra_u.copy_(torch.linalg.qr(torch.randn(16, 4)).Q)
    assert ad.regularization().abs() < 1e-5
    # rw.rank_regularization (what rankwise.train adds to the loss) is the same sum; None when reg = 0
    torch.testing.assert_close(rw.rank_regularization(model), orthogonality_loss(model))
    plain = rw.adapt(copy.deepcopy(net), "hra", rank=4, targets=["0", "1"], seed=0)
    assert rw.rank_regularization(plain) is None


def test_config_errors():
    cfg = rw.get_method("hra").Config
    with pytest.raises(ConfigError, match="even"):
        cfg(rank=3)
    with pytest.raises(ConfigError, match="reflections"):
        rw.adapt(linear(6, 4), "hra", rank=6, seed=0)


def test_config_round_trips_and_rejects_bad_values():
    check_config_round_trip("hra", {"init": "eye"})
