"""Gradient- and quantization-driven inits (lora_ga, lora_sb, loftq): each method's defining property
against a dense re-derivation (autograd on the full weights + torch.linalg.svd, bitsandbytes' NF4
as the quantizer oracle), and PEFT 0.21 as the oracle for LoRA-GA (same gradients → same factors up
to SVD sign, same residual base, same training, PEFT file round trips). PEFT's own LoftQ moves the
weight to cuda/xpu and cannot run on this CPU-only machine, so LoftQ is checked against the same
alternation written out with bitsandbytes here."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import rankwise as rw
from rankwise.core.adapted import AdaptedLayer
from rankwise.core.calibrate import Batches
from rankwise.errors import CalibrationError, ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")
TARGETS = ["q_proj", "o_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _global_seed():
    torch.manual_seed(0)


def _ids(seed=0, shape=(2, 12)):
    return torch.randint(1, 100, shape, generator=torch.Generator().manual_seed(seed))


BATCHES = [_ids(10), _ids(11)]


def _loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def _calib():
    return {"calibration": Batches(BATCHES, progress=False), "loss_fn": _loss}


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _dense_grads(base, names):
    """Oracle: mean over BATCHES of ∂loss/∂W for the named Linear layers, by plain autograd."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    for b in BATCHES:
        _loss(model, b).backward()
    return {n: model.get_submodule(n).weight.grad / len(BATCHES) for n in names}


def _sgd(model, ids, steps=2, lr=0.05):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids).logits.square().mean().backward()
        opt.step()


def _calib_step(model, lr):
    """One SGD step on the mean calibration loss (whose full-FT gradient is the one the init used)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    sum(_loss(model, b) for b in BATCHES).div(len(BATCHES)).backward()
    with torch.no_grad():
        for p in params:
            p.sub_(lr * p.grad)


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
    rw.adapt(mine, "lora_ga", rank=8, alpha=16, direction=direction, targets=TARGETS, **_calib())
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


def test_lora_ga_first_step_lies_in_the_top_gradient_subspace(llama):
    """Dense oracle: G from plain autograd, its SVD from torch.linalg. A₀ = V[:r]ᵀ, B₀ = c·U[r:2r]S[r:2r]
    with the stable c = d_out^¼/√γ, and one SGD step changes W by U[:, :2r] M V[:, :2r]ᵀ only."""
    base = llama()
    r, gamma = 4, 16
    mine = copy.deepcopy(base)
    rw.adapt(mine, "lora_ga", rank=r, alpha=8, svd="exact", targets=TARGETS, **_calib())
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
    assert rw.trainable_parameters(mine) == 4 * r * r


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


# ---- LoftQ ------------------------------------------------------------------------------------------------
def _bnb_nf4(w):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as F

        # flattened: bitsandbytes 0.50.2's CPU dequantize_4bit mis-assigns block maxima for 2-D inputs
        # whose rows are shorter than the block (e.g. 32 columns); quantize_4bit itself is right
        q, st = F.quantize_4bit(w.reshape(-1).contiguous(), quant_type="nf4", blocksize=64)
        return F.dequantize_4bit(q, st).view(w.shape)


def _loftq_oracle(w, r, iters):
    """PEFT's loftq_init (peft/utils/loftq_utils.py) written out with bitsandbytes NF4 on CPU:
    Q ← nf4(W − LR), L R ← top-r SVD of W − Q (L = U√S, R = √S Vᵀ)."""
    res = w
    for i in range(iters):
        q = _bnb_nf4(res)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        lr_ = (u[:, :r] * s[:r]) @ vh[:r]
        if i + 1 < iters:
            res = w - lr_
    return q, lr_


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_matches_the_alternation_with_bitsandbytes_nf4(iters, llama):
    base = llama()
    r = 4
    mine = copy.deepcopy(base)
    rw.adapt(mine, "loftq", rank=r, iters=iters, targets=TARGETS)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    for layer in _layers(mine).values():
        ad = layer.adapters["default"]
        w = layer.view.weight2d().detach()
        q_ref, lr_ref = _loftq_oracle(w, r, iters)
        q = ad.quantized_weight()
        if iters == 1:
            assert torch.equal(q, q_ref)  # Q(W0): bitsandbytes' NF4 bit for bit
        else:  # later rounds quantize W − LR, whose float rounding may move a rare boundary element
            assert (q != q_ref).float().mean() < 1e-3
        torch.testing.assert_close(ad.scale * ad.lora_B @ ad.lora_A, lr_ref, atol=2e-3 * lr_ref.abs().max().item(),
                                   rtol=0)
        # the adapted layer computes with Q + s·BA (ΔW = Q − W0 + s·BA against the untouched W0)
        torch.testing.assert_close(layer.delta_weight(), q - w + ad.scale * ad.lora_B @ ad.lora_A, atol=1e-6, rtol=0)
        xi = x[..., : layer.view.in_features]
        torch.testing.assert_close(layer(xi), torch.nn.functional.linear(xi, q + ad.scale * ad.lora_B @ ad.lora_A),
                                   atol=1e-5, rtol=1e-5)


def test_loftq_reduces_the_quantization_error(llama):
    """Defining property: ‖W − Q − s·BA‖_F is the Eckart–Young tail of W − Q, below QLoRA's ‖W − Q(W)‖_F."""
    base = llama()
    for quant in ("nf4", "int4", "int8"):
        mine = copy.deepcopy(base)
        rw.adapt(mine, "loftq", rank=4, alpha=8, quant=quant, iters=2, targets=TARGETS)
        for layer in _layers(mine).values():
            ad = layer.adapters["default"]
            w = layer.view.weight2d().detach()
            q = ad.quantized_weight()
            err = (w - q - ad.scale * ad.lora_B @ ad.lora_A).norm()
            tail = torch.linalg.svdvals(w - q)[4:].norm()
            torch.testing.assert_close(err, tail, atol=1e-5, rtol=1e-4)
            assert err < (w - rw.quant.fake_quantize(w, quant)).norm()


def test_loftq_save_load_and_peft_files(llama, tmp_path):
    base = llama()
    ids = _ids()
    mine = copy.deepcopy(base)
    rw.adapt(mine, "loftq", rank=4, iters=2, targets=TARGETS)
    _sgd(mine, ids)
    trained = _logits(mine, ids)
    rw.save(mine, tmp_path / "rw")
    again = rw.load(copy.deepcopy(base), tmp_path / "rw")
    torch.testing.assert_close(_logits(again, ids), trained, atol=1e-6, rtol=0)
    # PEFT's LoftQ format: A, B plus loftq_config; Q is rebuilt from W0 on import (as PEFT rebuilds it)
    rw.export_peft(mine, tmp_path / "peft")
    pcfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert pcfg["init_lora_weights"] == "loftq" and pcfg["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    back = rw.import_peft(copy.deepcopy(base), tmp_path / "peft")
    assert rw.summary(back)[0]["method"] == "loftq"
    torch.testing.assert_close(_logits(back, ids), trained, atol=1e-6, rtol=0)
    rw.merge(back)
    torch.testing.assert_close(_logits(back, ids), trained, atol=1e-5, rtol=1e-5)
    rw.unmerge(back)
    other = copy.deepcopy(base)
    rw.adapt(other, "loftq", rank=4, quant="int4", targets=TARGETS)
    with pytest.raises(ConfigError, match="NF4, block 64"):
        rw.export_peft(other, tmp_path / "int4")
