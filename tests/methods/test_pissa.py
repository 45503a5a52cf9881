"""PiSSA (methods/pissa.py): the top-r SVD split of W0 against torch.linalg, the randomized SVD's
error bound, and PEFT 0.21 as the oracle (same init, training, file round trips, GPT-2 Conv1D)."""

from __future__ import annotations

import copy

import pytest
import torch
from _init_helpers import (
    TARGETS,
    check_hf_conv1d_matches_peft,
    check_svd_split,
    check_weight_init_matches_peft,
    layers,
    peft_layer,
    residual,
)
from torch import nn

import rankwise as rw
from rankwise.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _global_seed():
    """PEFT draws from the global RNG (kaiming init before a data-driven init, ``pissa_niter``'s sketch)."""
    torch.manual_seed(0)


def test_pissa_splits_w0_exactly():
    check_svd_split("pissa", smallest=False)


def test_pissa_randomized_svd_error_bound():
    torch.manual_seed(1)
    lin = nn.Linear(40, 50)
    net = nn.Sequential(lin)
    rw.adapt(net, "pissa", rank=3, niter=2, oversample=4, targets=["0"], seed=5)
    ad = net[0].adapters["default"]
    w = lin.weight.detach().double()
    sig = torch.linalg.svdvals(w)
    a0, b0 = ad.frozen()
    err = torch.linalg.matrix_norm(w - ad.scale * (b0 @ a0).double(), ord=2).item()
    factor = (1 + 11 * (3 + 4) ** 0.5 * 40**0.5) ** (1 / 5)
    assert sig[3] * (1 - 1e-6) <= err <= sig[3] + factor * sig[3]
    assert err <= 1.2 * sig[3]  # two power iterations: close to the optimum in practice


def test_pissa_matches_peft(llama, tmp_path):
    check_weight_init_matches_peft("pissa", llama(), tmp_path)


def test_pissa_niter_matches_peft_on_a_gapped_spectrum(llama):
    """PEFT's ``pissa_niter_K`` and rankwise's ``niter=K`` draw different random sketches; on a weight
    whose top-r part is well separated both recover it to the randomized SVD's stated accuracy."""
    from peft import LoraConfig, get_peft_model

    base = llama()
    lin = base.model.layers[0].self_attn.q_proj
    g = torch.Generator().manual_seed(4)
    u = torch.linalg.qr(torch.randn(32, 32, generator=g))[0]
    v = torch.linalg.qr(torch.randn(32, 32, generator=g))[0]
    s = torch.cat([torch.tensor([3.0, 2.0]), torch.full((30,), 1e-3)])
    with torch.no_grad():
        lin.weight.copy_((u * s) @ v.T)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"],
                                                        init_lora_weights="pissa_niter_2"))
    mine = copy.deepcopy(base)
    rw.adapt(mine, "pissa", rank=2, alpha=2, niter=2, targets=["q_proj"], seed=0)
    name = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(residual(layers(mine)[name]), peft_layer(pm, name).base_layer.weight,
                               atol=1e-5, rtol=0)


def test_peft_import_refuses_what_cannot_be_rebuilt(llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = llama()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"],
                                                        init_lora_weights="pissa_niter_2"))
    pm.save_pretrained(tmp_path / "niter")
    with pytest.raises(ConfigError, match="randomized SVD.*Convert it to LoRA"):
        rw.import_peft(copy.deepcopy(base), tmp_path / "niter")


def test_pissa_matches_peft_on_hf_conv1d(gpt2):
    check_hf_conv1d_matches_peft("pissa", gpt2())


def test_pissa_plan_factors_each_layer_once(llama, monkeypatch):
    """``plan`` factors all targets in one batched pass; the per-layer init reuses its result."""
    from rankwise.methods import pissa

    calls = []
    real = pissa.weight_svds
    monkeypatch.setattr(pissa, "weight_svds",
                        lambda views, *a, **k: calls.append(len(views)) or real(views, *a, **k))
    rw.adapt(llama(), "pissa", rank=2, targets=TARGETS)
    assert calls == [4]
