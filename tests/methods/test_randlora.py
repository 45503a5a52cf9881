"""randlora (Albert et al. 2025, in PEFT 0.21's parametrization): PEFT as the oracle (same weights →
same outputs and gradients, the same bases bit for bit from one seed, PEFT file round trips), the
full-rank property, and the dense and thin activation paths against the dense weight view."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _dora_helpers import (
    MODELS,
    adapter,
    check_export_then_import,
    check_import_then_export,
    check_same_weights_same_outputs_and_gradients,
    layers,
    net,
    peft,
    peft_model,
    randomize,
)
from torch import nn

import rankwise as rw
from rankwise.core.api import adapter_state

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.mark.parametrize("model_name", list(MODELS))
def test_peft_same_weights_same_outputs_and_gradients(model_name, request, token_batch):
    check_same_weights_same_outputs_and_gradients("randlora", model_name, request, token_batch)


def test_export_then_import_peft(gpt2, tmp_path, token_batch):
    check_export_then_import("randlora", gpt2, tmp_path, token_batch)


def test_import_peft_then_export(bert, tmp_path, token_batch):
    check_import_then_export("randlora", bert, tmp_path, token_batch)


def test_randlora_bases_are_peft_bases(bert):
    """Same projection seed and same targets → PEFT's frozen bases bit for bit (their init)."""
    base = bert(seed=0)
    targets = ["query", "key", "intermediate.dense", "output.dense"]  # 32x32, 64x32, 32x64: bases sliced
    pmodel = peft_model(base, peft.RandLoraConfig(r=6, target_modules=targets, projection_prng_key=5))
    model = rw.adapt(copy.deepcopy(base), "randlora", rank=6, targets=targets, projection_seed=5)
    shared = adapter_state(model)["default"]["shared"]
    lay = next(m for m in pmodel.modules() if getattr(m, "randlora_A", None) is not None)
    for o, t in zip((shared.randlora_A, shared.randlora_B), (lay.randlora_A["default"], lay.randlora_B["default"])):
        assert o.shape == t.shape and torch.equal(o, t)
    assert len({id(ad.bases) for ad in (l_.adapters["default"] for l_ in layers(model).values())}) == 1


@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9)])
def test_randlora_update_is_full_rank(shape):
    n_out, n_in = shape
    model = rw.adapt(net(nn.Linear(n_in, n_out).double()), "randlora", rank=3, targets=["0"], seed=0)
    ad = adapter(model, "0")
    d = min(shape)
    n = -(-d // 3)
    assert rw.parameter_count(model).trainable == 3 * n + n * d
    assert not ad.delta_weight().any()  # λ = 0 at init
    randomize([ad.randlora_lambda, ad.randlora_gamma], seed=1)
    assert torch.linalg.matrix_rank(ad.delta_weight()) == d > 3  # full rank although each basis has rank 3
    lo_rank = rw.adapt(net(nn.Linear(n_in, n_out).double()), "lora", rank=3, targets=["0"], seed=0)
    randomize([p for p in lo_rank.parameters() if p.requires_grad], seed=1)
    assert torch.linalg.matrix_rank(adapter(lo_rank, "0").delta_weight()) == 3  # LoRA's update stays at rank r


def test_randlora_dense_and_thin_paths_agree():
    """Few tokens: two thin products; many tokens: one product with W0 + ΔW. Same layer, same output."""
    torch.manual_seed(0)
    layer = nn.Linear(10, 6).double()
    model = rw.adapt(net(layer), "randlora", rank=2, targets=["0"], seed=0)
    ad = adapter(model, "0")
    randomize([ad.randlora_lambda, ad.randlora_gamma], seed=2)
    x = torch.randn(20, 10, dtype=torch.float64)  # 20 tokens > min(6, 10): dense
    ref = F.linear(x, layer.weight + ad.delta_weight(), layer.bias)
    torch.testing.assert_close(model(x), ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(model(x[:4]), ref[:4], atol=1e-12, rtol=1e-12)  # 4 tokens: thin
    params = [ad.randlora_lambda, ad.randlora_gamma]
    for xs in (x, x[:4]):
        go = torch.autograd.grad(model(xs).square().sum(), params)
        gr = torch.autograd.grad(F.linear(xs, layer.weight + ad.delta_weight(), layer.bias).square().sum(), params)
        for o, r in zip(go, gr):
            torch.testing.assert_close(o, r, atol=1e-10, rtol=1e-10)
