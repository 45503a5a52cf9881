"""Helpers shared by the tests of the weight- and data-driven inits (tests/methods/test_{pissa,milora,
olora,nlora,corda,eva,lora_ga,lora_sb,loftq,_init_common}.py): tiny-LLaMA batches, a few SGD steps,
dense autograd gradients (the oracle of the gradient-driven inits) and the checks two methods share."""

from __future__ import annotations

import copy

import torch
from torch import nn

import rankwise as rw
from rankwise.core.adapted import AdaptedLayer
from rankwise.core.calibrate import Batches

TARGETS = ["q_proj", "o_proj", "up_proj", "down_proj"]  # four different layer inputs in LLaMA


def ids(seed=0, shape=(2, 7)):
    return torch.randint(1, 100, shape, generator=torch.Generator().manual_seed(seed))


BATCHES = [ids(10, (2, 12)), ids(11, (2, 12))]  # calibration batches of the gradient-driven inits


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def peft_layer(pm, name):
    return pm.base_model.model.get_submodule(name)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def sgd(model, x, steps=3, lr=0.05):
    """A few plain SGD steps on a fixed batch (linear in the gradients, so implementations that
    agree to float precision stay that close; Adam would amplify noise-level differences)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=x).logits.square().mean().backward()
        opt.step()


def residual(layer: AdaptedLayer):
    """``W0 − s·B₀A₀`` (canonical ``out × in``): the base weight PEFT holds for a residual-init adapter."""
    ad = layer.adapters["default"]
    a0, b0 = ad.frozen()
    return layer.view.weight2d() - ad.scale * (b0 @ a0)


def perturb_b(model, seed=3, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model).values():
            b = layer.adapters["default"].lora_B
            b.add_(torch.randn(b.shape, generator=g) * std)


# ---- gradient-driven inits --------------------------------------------------------------------------------
def loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def calib():
    return {"calibration": Batches(BATCHES, progress=False), "loss_fn": loss}


def dense_grads(base, names):
    """Oracle: mean over BATCHES of ∂loss/∂W for the named Linear layers, by plain autograd."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    for b in BATCHES:
        loss(model, b).backward()
    return {n: model.get_submodule(n).weight.grad / len(BATCHES) for n in names}


def calib_step(model, lr):
    """One SGD step on the mean calibration loss (whose full-FT gradient is the one the init used)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    sum(loss(model, b) for b in BATCHES).div(len(BATCHES)).backward()
    with torch.no_grad():
        for p in params:
            p.sub_(lr * p.grad)


# ---- checks shared by two methods ---------------------------------------------------------------------------
def check_svd_split(method, smallest):
    """PiSSA / MiLoRA: the adapter holds exactly the top / bottom rank-r SVD part of W0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(9, 7), nn.Conv2d(3, 5, 3), nn.Embedding(11, 6))
    base = copy.deepcopy(net)
    rw.adapt(net, method, rank=2, alpha=6.0, targets=["0", "1", "2"])
    for name, layer in layers(net).items():
        ad = layer.adapters["default"]
        w = layer.view.weight2d().detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        sl = slice(-2, None) if smallest else slice(0, 2)
        part = (u[:, sl] * s[sl]) @ vh[sl]
        # the adapter holds exactly the chosen SVD part of W0 ...
        a0, b0 = ad.frozen()
        torch.testing.assert_close((ad.scale * b0 @ a0).double(), part, atol=1e-5, rtol=1e-5)
        # ... the rest stays frozen: for PiSSA the best rank-r approximation (residual norm σ_{r+1}),
        # for MiLoRA the principal part (its top singular values are W0's)
        rest = torch.linalg.svdvals(w - part)
        torch.testing.assert_close(rest[: len(s) - 2], s[2:] if not smallest else s[:-2], atol=1e-5, rtol=1e-5)
        # training starts at that point, and the adapted layer is the base layer exactly
        assert torch.equal(ad.lora_A, a0) and torch.equal(ad.lora_B, b0)
        assert torch.count_nonzero(layer.delta_weight()) == 0
        assert torch.equal(layer.base.weight, base.get_submodule(name).weight)  # W0 itself is never modified


def check_weight_init_matches_peft(method, base, tmp_path):
    """PiSSA / OLoRA against PEFT 0.21: same init, same training, PEFT file round trips."""
    from peft import LoraConfig, PeftModel, get_peft_model

    x = ids()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS,
                                                        init_lora_weights=method))
    mine = copy.deepcopy(base)
    rw.adapt(mine, method, rank=2, alpha=4, targets=TARGETS)
    found = layers(mine)
    assert len(found) == 4
    for name, layer in found.items():
        pl = peft_layer(pm, name)
        ad = layer.adapters["default"]
        # PEFT overwrites the base weight with the residual; rankwise keeps W0 and holds B₀A₀
        torch.testing.assert_close(residual(layer), pl.base_layer.weight, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ad.lora_B @ ad.lora_A, pl.lora_B["default"].weight @ pl.lora_A["default"].weight,
                                   atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(mine, x), logits(pm, x), atol=1e-5, rtol=1e-5)
    sgd(mine, x)
    sgd(pm, x)
    torch.testing.assert_close(logits(mine, x), logits(pm, x), atol=1e-5, rtol=1e-5)

    # rankwise → PEFT: the rank-2r LoRA on the original base weights
    rw.export_peft(mine, tmp_path / "to_peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "to_peft")
    torch.testing.assert_close(logits(loaded, x), logits(mine, x), atol=1e-5, rtol=1e-5)
    # PEFT's own (unconverted) adapter → rankwise: the frozen part is rebuilt from W0, as PEFT does
    pm.save_pretrained(tmp_path / "from_peft")
    back = rw.import_peft(copy.deepcopy(base), tmp_path / "from_peft")
    assert rw.summary(back)[0]["method"] == method
    torch.testing.assert_close(logits(back, x), logits(pm, x), atol=1e-5, rtol=1e-5)


def check_export_loads_in_peft(method, kw, base, tmp_path):
    """Methods PEFT lacks (MiLoRA, NLoRA): their rank-2r LoRA export loads in PEFT, same outputs."""
    from peft import PeftModel

    x = ids()
    model = copy.deepcopy(base)
    rw.adapt(model, method, rank=2, alpha=4, targets=TARGETS, seed=0, **kw)
    assert torch.equal(logits(model, x), logits(base, x))
    sgd(model, x)
    rw.export_peft(model, tmp_path / "p")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-5, rtol=1e-5)
    back = rw.import_peft(copy.deepcopy(base), tmp_path / "p")  # a plain LoRA of rank 2r, same outputs
    assert rw.summary(back)[0]["method"] == "lora" and rw.summary(back)[0]["rank"] == 4
    torch.testing.assert_close(logits(back, x), logits(model, x), atol=1e-5, rtol=1e-5)


def check_hf_conv1d_matches_peft(method, base):
    """GPT-2's transposed ``Conv1D`` layers: PEFT's residual weight (stored ``in × out``) is the
    transpose of rankwise's canonical ``W0 − s·B₀A₀``."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    targets = ["c_attn", "c_fc"]
    calib_ids = ids(2, (1, 12))
    extra = {"corda_config": CordaConfig(corda_method="ipm")} if method == "corda" else {}
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=method, fan_in_fan_out=True,
                     **extra)
    pmodel = copy.deepcopy(base)
    if method == "corda":
        preprocess_corda(pmodel, cfg, run_model=lambda: pmodel(input_ids=calib_ids))
    pm = get_peft_model(pmodel, cfg)
    mine = copy.deepcopy(base)
    kw = {"calibration": Batches([{"input_ids": calib_ids}], progress=False)} if method == "corda" else {}
    rw.adapt(mine, method, rank=2, alpha=4, targets=targets, **kw)
    for name, layer in layers(mine).items():
        assert layer.view.kind == "hf_conv1d"
        torch.testing.assert_close(residual(layer).T, peft_layer(pm, name).base_layer.weight, atol=1e-4, rtol=1e-4)
    x = ids()
    torch.testing.assert_close(logits(mine, x), logits(pm, x), atol=1e-4, rtol=1e-4)
