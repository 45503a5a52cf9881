"""kron (LoKr, Yeh et al. 2024; KronA): PEFT 0.21 oracle, LyCORIS' factorization rule, explicit Kronecker
entries, and bfloat16 / autocast against the Kronecker formula in float64."""

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
    conv_net,
    peft,
    quiet,
    randomize,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

import rankwise as rw
from rankwise.core.adapted import AdaptedLayer
from rankwise.core.layers import LayerView
from rankwise.errors import ConfigError
from rankwise.methods.kron import _KronLinear, factorization

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("single_thread")]


@pytest.mark.parametrize("case", cases("kron"))
def test_same_weights_as_peft_same_outputs_and_gradients(case, request, token_batch):
    check_same_as_peft(case, request, token_batch)


@pytest.mark.parametrize("case", cases("kron"))
def test_gradients_equal_dense_weight_view(case, request, token_batch):
    check_gradients_equal_dense_weight_view(case, request, token_batch)


@pytest.mark.parametrize("case", cases("kron"))
def test_export_import_peft_round_trip(case, request, token_batch, tmp_path):
    check_peft_round_trip(case, request, token_batch, tmp_path)


def test_export_refuses_layers_peft_lacks(gpt2, tmp_path):
    check_export_refuses_hf_conv1d("kron", {"rank": 2}, gpt2, tmp_path)


def test_factorization_matches_lycoris_rule():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in list(range(1, 130)) + [384, 768, 1536, 4096, 11008]:
        for f in (-1, 2, 4, 8, 16):
            assert factorization(dim, f) == peft_factorization(dim, f), (dim, f)


def test_entries_and_param_count():
    """ΔW[o1·b + o2, (i1·d + i2)·k + t] = s · w1[o1, i1] · w2[o2, i2·k + t], entry by entry."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(6, 8, (2, 3))).double()
    model = rw.adapt(conv, "kron", rank=2, alpha=5.0, targets=["0"], seed=0)
    ad = model[0].adapters["default"]
    randomize(ad.parameters(), seed=1)
    a, b, c, d, k = ad.shape
    assert (a * b, c * d, k) == (8, 6, 6)
    w1, w2 = (t.detach() for t in ad.factors())
    dw = ad.delta_weight().reshape(8, -1)
    for o in range(8):
        for i in range(6 * k):
            ch, t = divmod(i, k)
            expect = 2.5 * w1[o // b, ch // d] * w2[o % b, (ch % d) * k + t]
            assert abs(dw[o, i] - expect) < 1e-12
    lin = LayerView(nn.Linear(384, 1536))
    cfg = rw.get_method("kron").Config(rank=8)
    # 1536 = 32·48, 384 = 16·24: w1 32×16 full, w2 48×24 low-rank (8 < 24): 512 + 8·(48 + 24)
    assert rw.get_method("kron").num_params(lin, cfg) == 32 * 16 + 8 * (48 + 24)


def test_conv1d_full_w2_refused(tmp_path):
    """PEFT 0.21 builds a Conv1d's full w2 as kron(2-D, 3-D) — not w1 ⊗ w2 — so neither direction converts."""
    base, _ = conv_net()
    model = rw.adapt(copy.deepcopy(base), "kron", rank=2, targets=["c1"], seed=0)
    assert hasattr(model.c1.adapters["default"], "lokr_w2")
    with pytest.raises(ConfigError, match="c1"):
        rw.export_peft(model, tmp_path / "out")
    pmodel = quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoKrConfig(r=2, target_modules=["c1"]))
    quiet(pmodel.save_pretrained, tmp_path / "peft")
    fresh = copy.deepcopy(base)
    with pytest.raises(ConfigError, match="c1"):
        rw.import_peft(fresh, tmp_path / "peft")
    assert not isinstance(fresh.c1, AdaptedLayer), "a failed import leaves the model unchanged"


def test_linear_function_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)  # c·d = 2·3
    base = torch.randn(4, 10, dtype=torch.float64, generator=g, requires_grad=True)  # a·b = 2·5
    w1 = torch.randn(2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w2 = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _KronLinear.apply(*t, 0.7), (x, base, w1, w2))


def _lokr_weight(scale):
    """LoKr's weight, transcribed: W0 + s · w1 ⊗ w2 with w1 = w1_a w1_b and w2 = w2_a w2_b where low-rank
    (PEFT ``LoKrLayer.get_delta_weight``: ``make_kron(w1, w2, scale)``); the Kronecker product written out
    as ``(w1 ⊗ w2)[o1·b + o2, i1·q + i2] = w1[o1, i1] · w2[o2, i2]``."""
    def weight_of(p, w0):
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        (a, c), (b, q) = w1.shape, w2.shape
        return w0 + scale * (w1[:, None, :, None] * w2[None, :, None, :]).reshape(a * b, c * q)
    return weight_of


@pytest.mark.parametrize("mode", ["bf16", "autocast"])
@pytest.mark.parametrize("kind", ["linear", "hf_conv1d", "conv2d", "embedding"])
def test_bfloat16_and_autocast_follow_the_kronecker_formula(mode, kind):
    """Was broken: under autocast the fused linear function mixed float32 and bfloat16 operands
    ("expected m1 and m2 to have the same dtype"); now every kind trains in bfloat16 and under autocast,
    within bfloat16 rounding of the float64 formula."""
    torch.manual_seed(0)
    layer, x = {
        "linear": (nn.Linear(12, 20), torch.randn(3, 4, 12)),
        "hf_conv1d": (Conv1D(20, 12), torch.randn(3, 4, 12)),
        "conv2d": (nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 5, 5)),
        "embedding": (nn.Embedding(12, 10), torch.randint(0, 12, (3, 5))),
    }[kind]
    if kind == "hf_conv1d":
        nn.init.normal_(layer.weight, std=0.3)
    check_low_precision("kron", {"rank": 2, "alpha": 3.0}, layer, x, _lokr_weight(1.5), mode)


def test_config_round_trips_and_rejects_bad_values():
    check_config_round_trip("kron", {"decompose_factor": 0})
