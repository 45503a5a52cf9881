"""vera (Kopiczko et al. 2024): PEFT 0.21 as the oracle (same weights → same outputs and gradients,
the same projections bit for bit from one seed, PEFT file round trips), ``ΔW = Λ_b B Λ_d A``
re-derived densely, and the fused linear node against autograd of the formula."""

from __future__ import annotations

import copy

import pytest
import torch
from _dora_helpers import (
    MODELS,
    check_export_then_import,
    check_import_then_export,
    check_same_weights_same_outputs_and_gradients,
    layers,
    peft,
    peft_model,
    randomize,
)
from safetensors.torch import load_file

import rankwise as rw
from rankwise.core.api import adapter_state
from rankwise.methods.vera import _VeraLinear

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.mark.parametrize("model_name", list(MODELS))
def test_peft_same_weights_same_outputs_and_gradients(model_name, request, token_batch):
    check_same_weights_same_outputs_and_gradients("vera", model_name, request, token_batch)


def test_export_then_import_peft(gpt2, tmp_path, token_batch):
    check_export_then_import("vera", gpt2, tmp_path, token_batch)


def test_import_peft_then_export(bert, tmp_path, token_batch):
    check_import_then_export("vera", bert, tmp_path, token_batch)


def test_vera_bases_are_peft_bases(bert):
    """Same projection seed and same targets → PEFT's frozen projections bit for bit (their init)."""
    base = bert(seed=0)
    targets = ["query", "key", "intermediate.dense", "output.dense"]  # 32x32, 64x32, 32x64: bases sliced
    pmodel = peft_model(base, peft.VeraConfig(r=6, target_modules=targets, projection_prng_key=0))
    model = rw.adapt(copy.deepcopy(base), "vera", rank=6, targets=targets, projection_seed=0)
    shared = adapter_state(model)["default"]["shared"]
    theirs = (pmodel.base_model.vera_A["default"], pmodel.base_model.vera_B["default"])
    for o, t in zip((shared.vera_A, shared.vera_B), theirs):
        assert o.shape == t.shape and torch.equal(o, t)
    # one object for all layers: every adapter holds the very same bases
    assert len({id(ad.bases) for ad in (l_.adapters["default"] for l_ in layers(model).values())}) == 1


def test_vera_peft_file_holds_projections_once(gpt2, tmp_path):
    model = rw.adapt(gpt2(seed=0), "vera", rank=4, targets=["c_attn", "c_fc"], seed=0)
    rw.export_peft(model, tmp_path / "p")
    keys = set(load_file(str(tmp_path / "p" / "adapter_model.safetensors")))
    assert {"base_model.vera_A", "base_model.vera_B"} <= keys
    assert not any(k.endswith(("vera_A", "vera_B")) and k.startswith("base_model.model.") for k in keys)


def test_vera_parameters_sharing_and_init(bert):
    model = rw.adapt(bert(seed=0), "vera", rank=16, d_initial=0.25, targets=["query", "intermediate.dense"], seed=0)
    adapted = layers(model)
    assert rw.parameter_count(model).trainable == sum(16 + layer.view.out_features for layer in adapted.values())
    shared = adapter_state(model)["default"]["shared"]
    assert tuple(shared.vera_A.shape) == (16, 32) and tuple(shared.vera_B.shape) == (64, 16)  # max in, max out
    for layer in adapted.values():
        ad = layer.adapters["default"]
        a, b = ad.factors()
        assert a.data_ptr() == shared.vera_A.data_ptr() and b.data_ptr() == shared.vera_B.data_ptr()  # views
        assert torch.equal(ad.vera_lambda_d, torch.full((16,), 0.25)) and not ad.vera_lambda_b.any()
    # ΔW = Λ_b B Λ_d A
    ad = adapted["bert.encoder.layer.0.intermediate.dense"].adapters["default"]
    randomize([ad.vera_lambda_b, ad.vera_lambda_d], seed=1)
    a, b = shared.vera_A[:, :32], shared.vera_B[:64]
    torch.testing.assert_close(ad.delta_weight(), torch.diag(ad.vera_lambda_b) @ b @ torch.diag(ad.vera_lambda_d) @ a)


@pytest.mark.parametrize("keep_z", [False, True])
def test_vera_linear_node_gradients(keep_z):
    """The fused linear node (either way of getting b's gradient) against autograd of the formula."""
    g = torch.Generator().manual_seed(0)
    x, bo = torch.randn(2, 3, 5, dtype=torch.float64, generator=g), torch.randn(2, 3, 4, dtype=torch.float64, generator=g)
    a, b = torch.randn(3, 5, dtype=torch.float64, generator=g), torch.randn(4, 3, dtype=torch.float64, generator=g)
    d, lb = torch.randn(3, dtype=torch.float64, generator=g), torch.randn(4, dtype=torch.float64, generator=g)
    args = [t.requires_grad_() for t in (x, bo, d, lb)]

    def fused(x_, bo_, d_, lb_):
        return _VeraLinear.apply(x_, bo_, a, b, d_, lb_, keep_z)

    assert torch.autograd.gradcheck(fused, args)
    ref = bo + lb * (((x @ a.t()) * d) @ b.t())
    torch.testing.assert_close(fused(*args), ref)
