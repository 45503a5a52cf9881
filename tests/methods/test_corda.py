"""CorDA (methods/corda.py): the decomposition of W0·C against a dense transcription of the
reference covariance (inputs divided by their max, per forward call), and PEFT 0.21 as the oracle
(both modes, training, file round trips, GPT-2 Conv1D)."""

from __future__ import annotations

import copy

import _init_helpers as helpers
import pytest
import torch
from _init_helpers import TARGETS, check_hf_conv1d_matches_peft

import rankwise as rw
from rankwise.core.calibrate import Batches
from rankwise.errors import ConfigError

_ids, _layers, _logits, _peft_layer, _residual, _sgd = (
    helpers.ids, helpers.layers, helpers.logits, helpers.peft_layer, helpers.residual, helpers.sgd)
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _global_seed():
    """PEFT draws from the global RNG (kaiming init before a data-driven init)."""
    torch.manual_seed(0)


# ---- CorDA ------------------------------------------------------------------------------------------------
def _corda_cov(model, names, batches):
    """CorDA's covariance, densely: per forward call, the input rows divided by |their max|, Gram
    summed, averaged over calls (the reference code's and PEFT's definition)."""
    grams = {n: [] for n in names}

    def hook(m, a, o, n):
        x = a[0].detach().reshape(-1, a[0].shape[-1]).double()
        x = x / x.max().abs()
        grams[n].append(x.T @ x)

    hs = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hs:
        h.remove()
    return {n: torch.stack(g).mean(0) for n, g in grams.items()}


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_defining_property(mode, llama):
    base = llama()
    batches = [{"input_ids": _ids(i, (2, 9))} for i in range(2)]
    model = copy.deepcopy(base)
    rw.adapt(model, "corda", rank=2, alpha=4, mode=mode, targets=TARGETS, calibration=Batches(batches, progress=False))
    names = list(_layers(model))
    covs = _corda_cov(base, names, batches)
    for name in names:
        layer = _layers(model)[name]
        ad = layer.adapters["default"]
        c = covs[name]
        fixed, inv, _ = rw.linalg.damped_inverse(c)
        w = layer.base.weight.detach().double()
        u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
        torch.testing.assert_close((u * s) @ vh @ inv, w, atol=1e-6, rtol=1e-6)  # W = U S (C'⁻¹V)ᵀ exactly
        sl = slice(0, 2) if mode == "ipm" else slice(len(s) - 2, len(s))
        a0, b0 = ad.frozen()
        root = (s[sl] / ad.scale).sqrt()
        b_ref, a_ref = u[:, sl] * root, root[:, None] * vh[sl] @ inv
        sign = torch.sign((b0.double() * b_ref).sum(0))  # SVD signs are arbitrary: align them
        torch.testing.assert_close(b0.double(), b_ref * sign, atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(a0.double(), a_ref * sign[:, None], atol=2e-4, rtol=1e-3)
    assert torch.equal(_logits(model, _ids()), _logits(base, _ids()))


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_matches_peft(mode, llama, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    base = llama()
    calib_ids = _ids(1, (1, 24))  # PEFT's CorDA hook assumes batch size 1
    pmodel = copy.deepcopy(base)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights="corda",
                     corda_config=CordaConfig(corda_method=mode))
    preprocess_corda(pmodel, cfg, run_model=lambda: pmodel(input_ids=calib_ids))
    pm = get_peft_model(pmodel, cfg)
    mine = copy.deepcopy(base)
    rw.adapt(mine, "corda", rank=2, alpha=4, mode=mode, targets=TARGETS,
             calibration=Batches([{"input_ids": calib_ids}], progress=False))
    for name, layer in _layers(mine).items():
        pl = _peft_layer(pm, name)
        ad = layer.adapters["default"]
        torch.testing.assert_close(_residual(layer), pl.base_layer.weight, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ad.lora_B @ ad.lora_A, pl.lora_B["default"].weight @ pl.lora_A["default"].weight,
                                   atol=1e-4, rtol=1e-4)
    ids = _ids()
    _sgd(mine, ids)
    _sgd(pm, ids)
    torch.testing.assert_close(_logits(mine, ids), _logits(pm, ids), atol=2e-4, rtol=1e-4)
    rw.export_peft(mine, tmp_path / "to_peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "to_peft")
    torch.testing.assert_close(_logits(loaded, ids), _logits(mine, ids), atol=1e-5, rtol=1e-5)
    pm.save_pretrained(tmp_path / "from_peft")
    with pytest.raises(ConfigError, match="CorDA.*Convert it to LoRA"):
        rw.import_peft(copy.deepcopy(base), tmp_path / "from_peft")


def test_corda_matches_peft_on_hf_conv1d(gpt2):
    check_hf_conv1d_matches_peft("corda", gpt2())
