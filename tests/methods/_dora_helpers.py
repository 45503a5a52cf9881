"""Shared by the tests of dora, vera and randlora (the methods of the DoRA / seeded-bases group that
PEFT 0.21 also has): the PEFT oracle checks and small helpers.

Oracles: PEFT (same weights → same logits and gradients; ``export_peft`` → PEFT → ``import_peft``
and PEFT → ``import_peft`` → ``export_peft`` → PEFT round trips)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core.adapted import AdaptedLayer

peft = pytest.importorskip("peft")

ATOL = 1e-5
MODELS = {"bert": ["query", "value", "dense"], "gpt2": ["c_attn", "c_proj", "c_fc"]}

# PEFT config factory (targets → config) and the same adapter's rankwise options, per method
CASES = {
    "dora": (lambda t: peft.LoraConfig(r=4, lora_alpha=6, target_modules=t, use_dora=True),
             {"rank": 4, "alpha": 6.0}),
    "vera": (lambda t: peft.VeraConfig(r=6, target_modules=t, projection_prng_key=0), {"rank": 6, "projection_seed": 0}),
    "randlora": (lambda t: peft.RandLoraConfig(r=8, randlora_alpha=16, target_modules=t, projection_prng_key=0),
                 {"rank": 8, "alpha": 16.0, "projection_seed": 0}),
}

# {rankwise parameter name: PEFT parameter names (without the adapter name)} per method
PEFT_NAMES = {
    "dora": {"lora_A": ("lora_A.default.weight", "lora_embedding_A.default"),
             "lora_B": ("lora_B.default.weight", "lora_embedding_B.default"),
             "magnitude": ("lora_magnitude_vector.default.weight",)},
    "vera": {"vera_lambda_b": ("vera_lambda_b.default",), "vera_lambda_d": ("vera_lambda_d.default",)},
    "randlora": {"randlora_lambda": ("randlora_lambda.default",), "randlora_gamma": ("randlora_gamma.default",)},
}


# ---- helpers -----------------------------------------------------------------------------------
def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def adapter(model, name="layer"):
    return model.get_submodule(name).adapters["default"]


def net(layer):
    return nn.Sequential(layer)


def randomize(params, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def peft_model(base, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), cfg)


def peft_load(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


def peft_save(pmodel, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel.save_pretrained(path)


def pairs(model, pmodel, method):
    """[(rankwise param, PEFT param, label)] for every adapted module, matched by name."""
    theirs = dict(pmodel.named_parameters())
    out = []
    for mname, layer in layers(model).items():
        for pname, p in layer.adapters["default"].named_parameters():
            keys = [f"base_model.model.{mname}.{s}" for s in PEFT_NAMES[method][pname]]
            key = next(k for k in keys if k in theirs)
            out.append((p, theirs[key], f"{mname}.{pname}"))
    assert out
    return out


def copy_peft_into_ours(model, pmodel, method, seed):
    matched = pairs(model, pmodel, method)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ours, theirs, _ in matched:
            theirs.add_(torch.randn(theirs.shape, generator=g) * 0.1)  # move PEFT's init: B, λ ≠ 0 …
            ours.copy_(theirs.reshape(ours.shape))
    return matched


def loss(model, batch):
    logits = model(**batch).logits
    target = torch.arange(logits.numel(), dtype=logits.dtype).reshape(logits.shape).sin()
    return (logits * target).sum()


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# ---- the PEFT checks ---------------------------------------------------------------------------
def check_same_weights_same_outputs_and_gradients(method, model_name, request, token_batch):
    targets = MODELS[model_name]
    base = request.getfixturevalue(model_name)(seed=0)
    make_cfg, opts = CASES[method]
    pmodel = peft_model(base, make_cfg(targets))
    model = rw.adapt(copy.deepcopy(base), method, targets=targets, seed=0, **opts)
    assert set(layers(model)) == {n.removeprefix("base_model.model.") for n, m in pmodel.named_modules()
                                  if hasattr(m, "base_layer") and n.startswith("base_model.model.")}
    if method == "dora":  # PEFT's init of the magnitude: ‖W0‖ per output row (our own formula)
        for ours, theirs, label in pairs(model, pmodel, method):
            if label.endswith("magnitude"):
                torch.testing.assert_close(ours, theirs.reshape(ours.shape), atol=1e-6, rtol=1e-6, msg=label)
    matched = copy_peft_into_ours(model, pmodel, method, seed=1)
    model.eval()
    pmodel.eval()
    ours_out, theirs_out = logits(model, token_batch), logits(pmodel, token_batch)
    assert not torch.allclose(ours_out, logits(base, token_batch), atol=1e-3), "the adapter should change the output"
    assert (ours_out - theirs_out).abs().max() <= ATOL
    model.train()
    pmodel.train()
    lo, lt = loss(model, token_batch), loss(pmodel, token_batch)
    torch.testing.assert_close(lo, lt, atol=1e-4, rtol=1e-6)
    lo.backward()
    lt.backward()
    for ours, theirs, label in matched:
        assert ours.grad is not None and ours.grad.abs().max() > 0, label
        torch.testing.assert_close(ours.grad, theirs.grad.reshape(ours.shape), atol=ATOL, rtol=1e-4, msg=label)


def check_export_then_import(method, gpt2, tmp_path, token_batch):
    base = gpt2(seed=0)
    _, opts = CASES[method]
    opts = {k: v for k, v in opts.items() if k != "projection_seed"}  # a drawn seed goes to the file too
    model = rw.adapt(copy.deepcopy(base), method, targets=MODELS["gpt2"], seed=3, **opts)
    randomize([p for p in model.parameters() if p.requires_grad], seed=4, std=0.1)
    ours = logits(model, token_batch)
    rw.export_peft(model, tmp_path / "p")
    pmodel = peft_load(base, tmp_path / "p")
    assert (logits(pmodel, token_batch) - ours).abs().max() <= ATOL
    back = rw.import_peft(copy.deepcopy(base), tmp_path / "p")
    assert (logits(back, token_batch) - ours).abs().max() <= ATOL
    # and a rankwise save of the imported adapter reloads to the same outputs
    rw.save(back, tmp_path / "rw")
    again = rw.load(copy.deepcopy(base), tmp_path / "rw")
    assert torch.equal(logits(again, token_batch), logits(back, token_batch))


def check_import_then_export(method, bert, tmp_path, token_batch):
    base = bert(seed=0)
    make_cfg, _ = CASES[method]
    cfg = make_cfg(["query", "value", "dense"])
    cfg.modules_to_save = ["classifier"]
    pmodel = peft_model(base, cfg)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in pmodel.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs = logits(pmodel.eval(), token_batch)
    peft_save(pmodel, tmp_path / "p")
    model = rw.import_peft(copy.deepcopy(base), tmp_path / "p")
    assert (logits(model, token_batch) - theirs).abs().max() <= ATOL
    assert rw.parameter_count(model).trainable == sum(p.numel() for p in pmodel.parameters() if p.requires_grad)
    rw.export_peft(model, tmp_path / "again")
    assert (logits(peft_load(base, tmp_path / "again"), token_batch) - theirs).abs().max() <= ATOL
