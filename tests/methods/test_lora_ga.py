"""LoRA-GA (methods/lora_ga.py): the default init against the authors' code (Outsider565/LoRA-GA,
transcribed here) and its first step, the rank-2r approximation of the full-FT step; variant="peft"
against PEFT 0.21 (same factors up to SVD sign, same residual base, same training, file round trips)."""

from __future__ import annotations

import copy

import _init_helpers as helpers
import pytest
import torch
from _init_helpers import BATCHES, TARGETS

import rankwise as rw
from rankwise.errors import CalibrationError, ConfigError

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


# ---- LoRA-GA ----------------------------------------------------------------------------------------------
def _peft_lora_ga(base, **ga):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraGAConfig, preprocess_loraga

    pmodel = copy.deepcopy(base)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(**ga))

    def train_step():
        for b in BATCHES:
            _loss(pmodel, b).backward()

    with pytest.warns(UserWarning, match="backward hook"):  # PEFT's hook on parameter-only gradients
        preprocess_loraga(pmodel, cfg, train_step)
    return get_peft_model(pmodel, cfg)


@pytest.mark.parametrize("direction", ["ArB2r", "ArBr"])
def test_lora_ga_matches_peft(direction, llama, tmp_path):
    """r = 8 on 32-wide layers: PEFT's svd_lowrank(q=4r) spans the whole range, so both SVDs are exact
    and the factors agree up to the sign of each singular triplet."""
    from peft import PeftModel

    base = llama()
    pm = _peft_lora_ga(base, direction=direction)
    mine = copy.deepcopy(base)
    rw.adapt(mine, "lora_ga", rank=8, alpha=16, direction=direction, variant="peft", targets=TARGETS,
             **_calib())
    ids = _ids()
    assert torch.equal(_logits(mine, ids), _logits(base, ids))  # base untouched, ΔW = 0 at init
    layers = _layers(mine)
    assert len(layers) == 4
    for name, layer in layers.items():
        ad, pl = layer.adapters["default"], pm.base_model.model.get_submodule(name)
        a_p, b_p = pl.lora_A["default"].weight, pl.lora_B["default"].weight
        sa = torch.sign((ad.init_A * a_p).sum(1))
        sb = torch.sign((ad.init_B * b_p).sum(0))
        torch.testing.assert_close(ad.init_A * sa[:, None], a_p, atol=2e-5, rtol=0)
        torch.testing.assert_close(ad.init_B * sb, b_p, atol=2e-6, rtol=0)
        # take PEFT's sign choice (an equally valid SVD): then the frozen offset is PEFT's residual base
        with torch.no_grad():
            for t in (ad.init_A, ad.lora_A):
                t.mul_(sa[:, None])
            for t in (ad.init_B, ad.lora_B):
                t.mul_(sb)
        torch.testing.assert_close(layer.view.weight2d() - ad.scale * ad.init_B @ ad.init_A, pl.base_layer.weight,
                                   atol=5e-6, rtol=0)
    torch.testing.assert_close(_logits(mine, ids), _logits(pm, ids), atol=1e-5, rtol=1e-5)
    pm.save_pretrained(tmp_path / "peft_init")  # PEFT needs its init to convert to LoRA later
    _sgd(mine, ids)
    _sgd(pm, ids)
    trained = _logits(mine, ids)
    assert not torch.allclose(trained, _logits(base, ids))
    torch.testing.assert_close(trained, _logits(pm, ids), atol=1e-5, rtol=1e-5)

    # rankwise → PEFT: the rank-2r LoRA on the original weights loads in PEFT
    rw.export_peft(mine, tmp_path / "to_peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "to_peft")
    torch.testing.assert_close(_logits(loaded, ids), trained, atol=1e-5, rtol=1e-5)
    # PEFT's own LoRA-GA file holds a gradient-dependent residual base: refused with the fix
    pm.save_pretrained(tmp_path / "raw")
    with pytest.raises(ConfigError, match="LoRA-GA.*Convert it to LoRA"):
        rw.import_peft(copy.deepcopy(base), tmp_path / "raw")
    # … and PEFT's converted file imports as a plain LoRA with the same outputs
    pm.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    back = rw.import_peft(copy.deepcopy(base), tmp_path / "converted")
    torch.testing.assert_close(_logits(back, ids), trained, atol=1e-5, rtol=1e-5)


def test_lora_ga_peft_variant_first_step_lies_in_the_top_gradient_subspace(llama):
    """variant="peft" (PEFT 0.21's form). Dense oracle: G from plain autograd, its SVD from torch.linalg.
    A₀ = V[:r]ᵀ, B₀ = c·U[r:2r]S[r:2r] with the stable c = d_out^¼/√γ, and one SGD step changes W by
    U[:, :2r] M V[:, :2r]ᵀ only."""
    base = llama()
    r, gamma = 4, 16
    mine = copy.deepcopy(base)
    rw.adapt(mine, "lora_ga", rank=r, alpha=8, svd="exact", variant="peft", targets=TARGETS, **_calib())
    layers = _layers(mine)
    grads = _dense_grads(base, layers)
    before = {n: layer.delta_weight().clone() for n, layer in layers.items()}
    _calib_step(mine, lr=0.1)
    for name, layer in layers.items():
        u, s, vh = torch.linalg.svd(grads[name], full_matrices=False)
        ad = layer.adapters["default"]
        torch.testing.assert_close((ad.init_A @ vh[:r].T).abs(), torch.eye(r), atol=1e-4, rtol=0)
        c = layer.view.out_features ** 0.25 / gamma ** 0.5
        torch.testing.assert_close(ad.init_B.norm(dim=0), c * s[r:2 * r], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close((u[:, r:2 * r].T @ ad.init_B).abs(), torch.diag(c * s[r:2 * r]),
                                   atol=1e-6, rtol=1e-4)
        assert before[name].abs().max() == 0
        step = layer.delta_weight()
        pu, pv = u[:, :2 * r] @ u[:, :2 * r].T, vh[:2 * r].T @ vh[:2 * r]
        assert step.norm() > 1e-6
        torch.testing.assert_close(pu @ step @ pv, step, atol=1e-4 * step.abs().max().item(), rtol=0)


def test_lora_ga_needs_gradients_and_checks_its_config(llama):
    with pytest.raises(CalibrationError, match="lora_ga.*loss_fn"):
        rw.adapt(llama(), "lora_ga", rank=2, targets=TARGETS)
    with pytest.raises(ConfigError, match="direction='BA'"):
        rw.adapt(llama(), "lora_ga", rank=2, direction="BA", targets=TARGETS, **_calib())
    with pytest.raises(ConfigError, match="stable_gamma"):
        rw.adapt(llama(), "lora_ga", rank=2, stable_gamma=0, targets=TARGETS, **_calib())


# ---- the authors' init (the default) -------------------------------------------------------------------------
def _official_lora_ga(g, r, gamma=16.0):
    """Transcription of the authors' init (Outsider565/LoRA-GA, reproduce/run_exp.py, mode "gradient",
    direction "ArB2r", scale "stable"): U, S, V = svd(G); B = U[:, r:2r], A = V[:r, :] (no singular
    values); m, n = G.shape; B = B·m^¼/√γ; A = A·m^¼/√γ."""
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    m = g.shape[0]
    return vh[:r, :] * m**0.25 / gamma**0.5, u[:, r:2 * r] * m**0.25 / gamma**0.5


def _cos(a, b):
    return (a * b).sum() / (a.norm() * b.norm())


def test_lora_ga_default_is_the_official_init_and_its_first_step_is_the_rank_2r_step(llama):
    base = llama()
    r, lr = 4, 1e-3
    models = {}
    for variant in ("official", "peft"):
        models[variant] = copy.deepcopy(base)
        kw = {} if variant == "official" else {"variant": "peft"}
        rw.adapt(models[variant], "lora_ga", rank=r, alpha=8, svd="exact", targets=TARGETS, **kw, **_calib())
    grads = _dense_grads(base, _layers(models["official"]))
    for name, layer in _layers(models["official"]).items():
        ad = layer.adapters["default"]
        a_ref, b_ref = _official_lora_ga(grads[name].double(), r)
        sa = torch.sign((ad.init_A.double() * a_ref).sum(1))  # SVD signs are arbitrary, per triplet
        sb = torch.sign((ad.init_B.double() * b_ref).sum(0))
        torch.testing.assert_close(ad.init_A.double() * sa[:, None], a_ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(ad.init_B.double() * sb, b_ref, atol=1e-4, rtol=0)
        # not PEFT 0.21's form: its B₀ carries the singular values, and A₀ no c
        peft_ad = _layers(models["peft"])[name].adapters["default"]
        assert not torch.allclose(peft_ad.init_B.norm(dim=0), ad.init_B.norm(dim=0), rtol=0.1)
    stats = {}
    for variant, model in models.items():
        _calib_step(model, lr)
        for name, layer in _layers(model).items():
            g = grads[name].double()
            u, s, vh = torch.linalg.svd(g, full_matrices=False)
            g2r = (u[:, :2 * r] * s[:2 * r]) @ vh[:2 * r]
            step = layer.delta_weight().double()  # ΔW₁ (ΔW = 0 before the step)
            sv = torch.linalg.svdvals(step)
            tail = lambda v: (v[r:2 * r].norm() / v[:2 * r].norm()).item()  # noqa: E731 - share of σ_r..σ_2r
            stats.setdefault(variant, []).append((_cos(step, -g2r).item(), int((sv > 1e-3 * sv[0]).sum()),
                                                  tail(sv), tail(s)))
    # LoRA-GA's claim, with the authors' init: ΔW₁ = −η s² c² [G]_2r — rank 2r, the same spectrum
    for cos, rank, tail_step, tail_g in stats["official"]:
        assert cos > 0.9999 and rank == 2 * r and abs(tail_step - tail_g) < 1e-3 * tail_g
    # PEFT 0.21's variant: B₀B₀ᵀG ∝ S³ is negligible, so the step is essentially [G]_r (its singular
    # values r..2r carry ~1% where [G]_2r's carry ~45%) and not along [G]_2r
    for cos, _, tail_step, tail_g in stats["peft"]:
        assert cos < 0.95 and tail_step < 0.1 * tail_g


def test_lora_ga_official_weight_svd_and_random_direction(llama):
    """weight_svd (the code's "weightS"): both factors times mean √(σ_i(W0)/s) over the top r; random:
    A and B take the two halves of one random permutation of the 2r triplets (disjoint, as the code)."""
    base = llama()
    r = 2
    mine = copy.deepcopy(base)
    rw.adapt(mine, "lora_ga", rank=r, alpha=4, svd="exact", scale_mode="weight_svd", targets=TARGETS,
             **_calib())
    grads = _dense_grads(base, _layers(mine))
    for name, layer in _layers(mine).items():
        ad = layer.adapters["default"]
        u, _, vh = torch.linalg.svd(grads[name].double(), full_matrices=False)
        c = (torch.linalg.svdvals(layer.view.weight2d().detach().double())[:r] / ad.scale).sqrt().mean()
        eye = c * torch.eye(r, dtype=torch.float64)
        torch.testing.assert_close((ad.init_A.double() @ vh[:r].T).abs(), eye, atol=1e-4, rtol=0)
        torch.testing.assert_close((u[:, r:2 * r].T @ ad.init_B.double()).abs(), eye, atol=1e-4, rtol=0)
    mine = copy.deepcopy(base)
    rw.adapt(mine, "lora_ga", rank=r, svd="exact", direction="random", scale_mode="unit", targets=TARGETS,
             seed=3, **_calib())
    for name, layer in _layers(mine).items():
        ad = layer.adapters["default"]
        u, _, vh = torch.linalg.svd(grads[name].double(), full_matrices=False)
        ia = set((ad.init_A.double() @ vh[:2 * r].T).abs().argmax(1).tolist())
        ib = set((u[:, :2 * r].T @ ad.init_B.double()).abs().argmax(0).tolist())
        assert len(ia) == len(ib) == r and not ia & ib and ia | ib == set(range(2 * r))
