"""LoRA-SB (methods/lora_sb.py): the init is the best rank-r approximation of the first full-FT
step (dense autograd + torch.linalg.svd), with the reference code's warm-up learning rate, and a step on
R is the projection of full fine-tuning's step."""

from __future__ import annotations

import copy

import _init_helpers as helpers
import pytest
import torch
from _init_helpers import BATCHES, TARGETS

import rankwise as rw
from rankwise.errors import ConfigError

_layers, _logits, _calib, _dense_grads, _calib_step, _loss = (
    helpers.layers, helpers.logits, helpers.calib, helpers.dense_grads, helpers.calib_step, helpers.loss)
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _global_seed():
    torch.manual_seed(0)


def _ids(seed=0, shape=(2, 12)):
    return helpers.ids(seed, shape)


def _sgd(model, x, steps=2, lr=0.05):
    helpers.sgd(model, x, steps, lr)


# ---- LoRA-SB ----------------------------------------------------------------------------------------------
def test_lora_sb_init_is_the_best_rank_r_first_update(llama):
    """init='update': s·B R₀ A equals the Eckart–Young truncation of the first full-FT step −lr·G
    (update='grad') or −lr·sign(G) (update='sign'), G from plain autograd."""
    base = llama()
    r, lr = 3, 0.5
    for update in ("grad", "sign"):
        mine = copy.deepcopy(base)
        rw.adapt(mine, "lora_sb", rank=r, alpha=6, update=update, lr=lr, targets=TARGETS, **_calib())
        layers = _layers(mine)
        grads = _dense_grads(base, layers)
        for name, layer in layers.items():
            g = grads[name]
            full = -lr * (g if update == "grad" else torch.sign(g))
            u, s, vh = torch.linalg.svd(full, full_matrices=False)
            best = (u[:, :r] * s[:r]) @ vh[:r]
            torch.testing.assert_close(layer.delta_weight(), best, atol=1e-5 * s[0].item(), rtol=0)
            ad = layer.adapters["default"]
            torch.testing.assert_close(ad.lora_B.T @ ad.lora_B, torch.eye(r), atol=1e-5, rtol=0)
            assert ad.lora_R.requires_grad and not ad.lora_B.requires_grad
    assert rw.parameter_count(mine).trainable == 4 * r * r


def test_lora_sb_first_step_is_the_best_rank_r_full_ft_step(llama):
    """init='zero', s = 1: one SGD step of lr on R changes W by exactly −lr·[G]_r (the best rank-r
    approximation of full fine-tuning's step), and a later step by the projection B Bᵀ (−lr G_t) AᵀA of
    full fine-tuning's step at the current weights (the optimum in the U, V basis)."""
    base = llama()
    r, lr = 3, 0.05
    mine = copy.deepcopy(base)
    rw.adapt(mine, "lora_sb", rank=r, update="grad", init="zero", targets=TARGETS, **_calib())
    layers = _layers(mine)
    assert torch.equal(_logits(mine, BATCHES[0]), _logits(base, BATCHES[0]))
    grads = _dense_grads(base, layers)
    _calib_step(mine, lr)
    for name, layer in layers.items():
        u, s, vh = torch.linalg.svd(grads[name], full_matrices=False)
        best = -lr * (u[:, :r] * s[:r]) @ vh[:r]
        torch.testing.assert_close(layer.delta_weight(), best, atol=1e-6 * lr * s[0].item() + 1e-9, rtol=1e-4)
    # second step: oracle gradient of the dense model holding W0 + ΔW
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in layers.items():
            dense.get_submodule(name).weight.add_(layer.delta_weight())
    g_t = _dense_grads(dense, layers)
    before = {n: layer.delta_weight().clone() for n, layer in layers.items()}
    _calib_step(mine, lr)
    for name, layer in layers.items():
        ad = layer.adapters["default"]
        pb, pa = ad.lora_B @ ad.lora_B.T, ad.lora_A.T @ ad.lora_A
        want = pb @ (-lr * g_t[name]) @ pa
        got = layer.delta_weight() - before[name]
        torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)


def test_lora_sb_config_errors(llama):
    with pytest.raises(ConfigError, match="update='adam'"):
        rw.adapt(llama(), "lora_sb", rank=2, update="adam", targets=TARGETS, **_calib())
    with pytest.raises(ConfigError, match="lr=0"):
        rw.adapt(llama(), "lora_sb", rank=2, lr=0, targets=TARGETS, **_calib())


def test_lora_sb_reference_warmup_learning_rate(llama):
    """Oracle: the reference code (RaghavSinghal10/lora-sb, train_glue.py / utils/gradient_utils.py /
    utils/initialization_utils.py) transcribed — eff_lr = lr / (warmup_ratio · T); ΔW₁ = −eff_lr ·
    sign(Σ G); U, S, V = svd(ΔW₁); B = U_r, A = V_rᵀ, R₀ = diag(S_r) with α = r — so the model adds
    U_r S_r V_rᵀ. With lr and warmup_steps = warmup_ratio·T rankwise starts at the same point; with the
    default warmup_steps = 1 the start would be warmup_steps times larger."""
    base = llama()
    r, lr, warmup_ratio, total = 3, 1e-4, 0.02, 1000
    mine = copy.deepcopy(base)
    rw.adapt(mine, "lora_sb", rank=r, lr=lr, warmup_steps=int(warmup_ratio * total), targets=TARGETS, **_calib())
    grads = _dense_grads(base, _layers(mine))
    for name, layer in _layers(mine).items():
        eff_lr = lr / (warmup_ratio * total)
        processed = -eff_lr * torch.sign(grads[name] * len(BATCHES))
        u, s, vh = torch.linalg.svd(processed, full_matrices=False)
        ref = (u[:, :r] * s[:r]) @ vh[:r]
        torch.testing.assert_close(layer.delta_weight(), ref, atol=1e-5 * s[0].item(), rtol=0)
        assert not torch.allclose(layer.delta_weight(), 20 * ref)  # what warmup_steps=1 gives
