"""Shared by the structured adapters' tests (fourierft, circular, kron, hra, bone, hira): the PEFT 0.21
oracle cases and the checks every case runs.

Oracles: PEFT (same weights → same logits and gradients; ``export_peft`` → PEFT and PEFT →
``import_peft`` → PEFT round trips) and the dense weight view (autograd through ``W0 + delta_weight()``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core.adapted import AdaptedLayer
from rankwise.errors import ConfigError

peft = pytest.importorskip("peft")

ATOL = 1e-5


# ---- helpers ------------------------------------------------------------------------------------
def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _peft_param(pmodel, module: str, suffix: str) -> torch.Tensor:
    return getattr(pmodel.base_model.model.get_submodule(module), suffix)["default"]


def _pairs(model, pmodel):
    """[(our parameter, PEFT's parameter, label)] for every adapted module, matched by PEFT name."""
    out = []
    for mname, layer in layers(model).items():
        ad = layer.adapters["default"]
        by_id = {id(p): p for p in ad.parameters()}
        for suffix, t in ad.peft_tensors().items():
            ours = t if id(t) in by_id else t._base if t._base is not None and id(t._base) in by_id else None
            assert ours is not None, f"{mname}.{suffix} is not a view of an adapter parameter"
            out.append((ours, _peft_param(pmodel, mname, suffix), f"{mname}.{suffix}"))
    return out


def randomize(params, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def _peft_adapter_params(pmodel, prefix):
    return [p for n, p in pmodel.named_parameters() if prefix in n]


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def linear(m, n, seed=0):
    """``nn.Sequential(nn.Linear(n, m))`` in float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n, m)).double()


class ConvNet(nn.Module):
    """nn.Conv1d, nn.Conv2d (square 3×3 kernel), nn.Embedding and nn.Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1, stride=2)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        self.emb = nn.Embedding(12, 8, padding_idx=0)
        self.fc = nn.Linear(8, 6)

    def forward(self, x, ids):
        h = self.c1(x)
        h2 = self.c2(h[:, :, None, :].expand(-1, -1, 4, -1))
        return torch.cat([h.flatten(1), h2.flatten(1), self.fc(self.emb(ids)).flatten(1)], dim=1)


def conv_net(seed=0):
    torch.manual_seed(seed)
    net = ConvNet()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # O(1) outputs, so an absolute tolerance of 1e-5 is strict
    g = torch.Generator().manual_seed(seed)
    return net.eval(), (torch.randn(2, 4, 11, generator=g), torch.randint(0, 12, (2, 5), generator=g))


# (rankwise method, options, PEFT config factory, PEFT parameter prefix, model, targets)
ORACLE = {
    "fourierft-bert": ("fourierft", {"n_frequency": 40, "scaling": 60.0},
                       lambda t: peft.FourierFTConfig(n_frequency=40, scaling=60.0, target_modules=t),
                       "fourierft_", "bert", ["query", "value", "dense"]),
    "fourierft-gpt2": ("fourierft", {"n_frequency": 70, "scaling": 90.0, "random_loc_seed": 5},
                       lambda t: peft.FourierFTConfig(n_frequency=70, scaling=90.0, random_loc_seed=5,
                                                      target_modules=t, fan_in_fan_out=True),
                       "fourierft_", "gpt2", ["c_attn", "c_fc"]),
    "circular-bert": ("circular", {"block_size": 16},
                      lambda t: peft.C3AConfig(block_size=16, target_modules=t), "c3a_", "bert",
                      ["query", "value", "dense"]),
    "circular-fft": ("circular", {"block_size": 8, "path": "fft"},
                     lambda t: peft.C3AConfig(block_size=8, target_modules=t), "c3a_", "bert",
                     ["query", "value", "dense"]),
    "kron-bert": ("kron", {"rank": 4, "alpha": 6.0},
                  lambda t: peft.LoKrConfig(r=4, alpha=6.0, target_modules=t), "lokr_", "bert",
                  ["query", "key", "dense"]),
    "kron-lowrank": ("kron", {"rank": 1, "alpha": 2.0, "decompose_both": True},
                     lambda t: peft.LoKrConfig(r=1, alpha=2.0, decompose_both=True, target_modules=t), "lokr_",
                     "bert", ["query", "dense"]),
    "kron-conv": ("kron", {"rank": 2, "alpha": 3.0},
                  lambda t: peft.LoKrConfig(r=2, alpha=3.0, target_modules=t), "lokr_", "conv", ["c2", "fc"]),
    "kron-conv1d": ("kron", {"rank": 1, "alpha": 3.0},  # low-rank w2 (see test_kron_conv1d_full_w2_refused)
                    lambda t: peft.LoKrConfig(r=1, alpha=3.0, target_modules=t), "lokr_", "conv", ["c1", "c2"]),
    "hra-bert": ("hra", {"rank": 4}, lambda t: peft.HRAConfig(r=4, target_modules=t), "hra_", "bert",
                 ["query", "value", "dense"]),
    "hra-gs": ("hra", {"rank": 3, "apply_gs": True, "init": "random"},
               lambda t: peft.HRAConfig(r=3, apply_GS=True, init_weights=False, target_modules=t), "hra_", "bert",
               ["key", "dense"]),
    "hra-conv": ("hra", {"rank": 2}, lambda t: peft.HRAConfig(r=2, target_modules=t), "hra_", "conv", ["c2", "fc"]),
    "bone-bat": ("bone", {"rank": 8, "mode": "bat"},
                 lambda t: peft.MissConfig(r=8, init_weights="bat", target_modules=t), "miss_", "bert",
                 ["query", "value", "dense"]),
    "bone-share": ("bone", {"rank": 5, "mode": "share"},
                   lambda t: peft.MissConfig(r=5, target_modules=t), "miss_", "bert", ["query", "value", "dense"]),
    "hira-bert": ("hira", {"rank": 3}, lambda t: peft.HiraConfig(r=3, target_modules=t), "hira_", "bert",
                  ["query", "value", "dense", "word_embeddings"]),
    "hira-gpt2": ("hira", {"rank": 2}, lambda t: peft.HiraConfig(r=2, target_modules=t, fan_in_fan_out=True),
                  "hira_", "gpt2", ["c_attn", "c_proj", "wte"]),
    "hira-conv": ("hira", {"rank": 2}, lambda t: peft.HiraConfig(r=2, target_modules=t), "hira_", "conv",
                  ["c1", "c2", "emb", "fc"]),
}

# PEFT 0.21's C3A autograd function returns a wrong input gradient (its backward uses
# fft(fft(g)·ifft(w)) where the adjoint is fft(ifft(g)·conj(fft(w))); finite differences agree with
# rankwise, see test_circular_input_gradient_matches_finite_differences). Its kernel gradient is
# right, so the gradient comparison adapts one module: no other C3A layer lies between it and the loss.
GRAD_TARGETS = {"circular-bert": ["bert.encoder.layer.1.output.dense"],
                "circular-fft": ["bert.encoder.layer.1.output.dense"]}


def cases(method: str) -> list[str]:
    """The ORACLE case names of ``method``."""
    return [c for c, spec in ORACLE.items() if spec[0] == method]


def _base(which, request):
    if which == "conv":
        return conv_net()
    return request.getfixturevalue(which)(seed=0), None


def _run(model, which, batch, inputs):
    if which == "conv":
        return model(*inputs)
    return model(**batch).logits


def _loss(out):
    target = torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin()
    return (out * target).sum()


# ---- PEFT oracle: same weights → same outputs and gradients ----------------------------------------
def check_same_as_peft(case, request, token_batch):
    method, opts, pcfg, prefix, which, targets = ORACLE[case]
    targets = GRAD_TARGETS.get(case, targets)
    base, inputs = _base(which, request)
    pmodel = quiet(peft.get_peft_model, copy.deepcopy(base), pcfg(targets))
    randomize(_peft_adapter_params(pmodel, prefix), seed=3)
    model = rw.adapt(copy.deepcopy(base), method, targets=targets, seed=0, **opts)
    pairs = _pairs(model, pmodel)
    assert len(pairs) == len(_peft_adapter_params(pmodel, prefix)), "every PEFT tensor has a rankwise twin"
    with torch.no_grad():
        for ours, theirs, _ in pairs:
            ours.copy_(theirs.reshape(ours.shape))
    model.train()
    pmodel.train()
    out, pout = _run(model, which, token_batch, inputs), _run(pmodel, which, token_batch, inputs)
    with torch.no_grad():
        assert (out - _run(base, which, token_batch, inputs)).abs().max() > 1e-3, "the adapter must change the output"
    assert (out - pout).abs().max() <= ATOL
    _loss(out).backward()
    _loss(pout).backward()
    for ours, theirs, label in pairs:
        assert ours.grad is not None and ours.grad.abs().max() > 0, label
        torch.testing.assert_close(ours.grad, theirs.grad.reshape(ours.shape), atol=ATOL, rtol=1e-4, msg=label)
    assert rw.parameter_count(model).trainable == sum(p.numel() for p in _peft_adapter_params(pmodel, prefix))


# ---- gradients of the activation view == gradients of the dense weight view --------------------------
def check_gradients_equal_dense_weight_view(case, request, token_batch):
    """Each adapted layer replaced by its base with weight ``W0 + delta_weight()`` (autograd through the
    weight view) gives the same loss and adapter gradients as the activation view's own backward."""
    method, opts, _, _, which, targets = ORACLE[case]
    base, inputs = _base(which, request)
    model = rw.adapt(copy.deepcopy(base), method, targets=targets, seed=0, **opts)
    randomize([p for p in model.parameters() if p.requires_grad], seed=6)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    loss = _loss(_run(model, which, token_batch, inputs))
    grads = torch.autograd.grad(loss, params)
    weights = {f"{name}.weight": layer.base.weight + layer.adapters["default"].delta_weight()
               for name, layer in layers(model).items()}
    ref_model = copy.deepcopy(base).train()
    # tie_weights=False: GPT-2's lm_head shares wte's weight; the adapter changes only the embedding lookup
    if which == "conv":
        ref_out = torch.func.functional_call(ref_model, weights, inputs, tie_weights=False)
    else:
        ref_out = torch.func.functional_call(ref_model, weights, (), token_batch, tie_weights=False).logits
    ref_loss = _loss(ref_out)
    ref_grads = torch.autograd.grad(ref_loss, params)
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, r, atol=ATOL, rtol=1e-4)


# ---- PEFT format round trips -----------------------------------------------------------------------
def check_peft_round_trip(case, request, token_batch, tmp_path):
    method, opts, pcfg, prefix, which, targets = ORACLE[case]
    base, inputs = _base(which, request)
    # rankwise → PEFT
    model = rw.adapt(copy.deepcopy(base), method, targets=targets, seed=0, **opts)
    randomize([p for p in model.parameters() if p.requires_grad], seed=4)
    with torch.no_grad():
        ours = _run(model, which, token_batch, inputs)
    rw.export_peft(model, tmp_path / "out")
    p1 = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path / "out").eval()
    with torch.no_grad():
        assert (_run(p1, which, token_batch, inputs) - ours).abs().max() <= ATOL
    # PEFT → rankwise → PEFT
    pmodel = quiet(peft.get_peft_model, copy.deepcopy(base), pcfg(targets)).eval()
    randomize(_peft_adapter_params(pmodel, prefix), seed=5)
    with torch.no_grad():
        theirs = _run(pmodel, which, token_batch, inputs)
    quiet(pmodel.save_pretrained, tmp_path / "peft")
    imported = rw.import_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    assert rw.core.api.adapter_state(imported)["default"]["config"].method == method
    with torch.no_grad():
        assert (_run(imported, which, token_batch, inputs) - theirs).abs().max() <= ATOL
    rw.export_peft(imported, tmp_path / "again")
    p2 = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path / "again").eval()
    with torch.no_grad():
        assert (_run(p2, which, token_batch, inputs) - theirs).abs().max() <= ATOL


def check_clamps_round_trip_through_peft_patterns(method, opts, key, tmp_path):
    """Where rankwise clamps a setting on a small layer (FourierFT's K ≤ m·n, C3A's block dividing both sides),
    the export writes PEFT's per-module pattern, PEFT builds the same adapter, and it imports back."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 12)
    model = rw.adapt(copy.deepcopy(base), method, targets=["0", "2", "4"], seed=0, **opts)
    randomize([p for p in model.parameters() if p.requires_grad], seed=1)
    rw.export_peft(model, tmp_path / method)
    pcfg = rw.io.atomic.read_json(tmp_path / method / "adapter_config.json", "")
    assert pcfg[key], f"{method}: a clamped module needs a pattern entry"
    pmodel = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path / method).eval()
    with torch.no_grad():
        ours = model(x)
        assert (pmodel(x) - ours).abs().max() <= ATOL, method
    back = rw.import_peft(copy.deepcopy(base), tmp_path / method).eval()
    with torch.no_grad():
        assert (back(x) - ours).abs().max() <= ATOL, method


def check_export_refuses_hf_conv1d(method, opts, gpt2, tmp_path):
    """PEFT's version of ``method`` has no HF Conv1D layers: the export names the module and refuses."""
    model = rw.adapt(gpt2(seed=0), method, targets=["c_attn"], **opts)
    with pytest.raises(ConfigError, match="c_attn"):
        rw.export_peft(model, tmp_path / method)


def check_config_round_trip(method, bad: dict):
    cls = rw.get_method(method)
    cfg = cls.Config(targets=["q"])
    assert cls.Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=next(iter(bad))):
        cls.Config(**bad)


# ---- bfloat16 and autocast against a float64 transcription of the method's formula ---------------------
def check_low_precision(method, opts, layer, x, weight_of, mode, tol=3e-2):
    """``mode='bf16'``: base and adapter in bfloat16; ``'autocast'``: float32 weights under
    ``torch.autocast("cpu", bfloat16)``. The output, every adapter gradient and ``delta_weight()`` agree, to
    bfloat16 tolerance (``tol`` relative to the largest entry), with the float64 reference
    ``weight_of(params, W0) -> W0 + ΔW`` (canonical ``(out, in)``; ``params`` maps the adapter's parameter
    names to float64 leaves); then one optimizer step leaves finite parameters."""
    from rankwise.core.layers import LayerView

    low = torch.bfloat16 if mode == "bf16" else torch.float32
    net = nn.Sequential(copy.deepcopy(layer)).to(low)
    base64 = copy.deepcopy(net[0]).double()  # W0 as the adapter sees it (rounded to bf16 in 'bf16' mode)
    model = rw.adapt(net, method, targets=["0"], seed=0, **opts).train()
    ad = model[0].adapters["default"]
    randomize(ad.parameters(), seed=1, std=0.5)
    assert all(p.dtype == low for p in ad.parameters())
    xin = x.to(low) if x.is_floating_point() else x
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        out = model(xin)
    assert out.dtype == (torch.bfloat16 if mode == "bf16" or x.is_floating_point() else out.dtype)
    target = torch.arange(out.numel(), dtype=torch.float64).reshape(out.shape).sin()
    (out.double() * target).sum().backward()

    params = {n: p.detach().double().requires_grad_() for n, p in ad.named_parameters()}
    view = LayerView(base64)
    w0 = view.weight2d().detach()
    w = weight_of(params, w0)
    ref = torch.func.functional_call(base64, {"weight": view.to_param(w)}, (x.double() if x.is_floating_point() else x,))
    (ref * target).sum().backward()

    def close(got, want, label):
        err = (got.double() - want).abs().max().item()
        assert err <= tol * want.abs().max().item(), f"{method} {mode} {label}: error {err:.3g}"

    close(out, ref.detach(), "output")
    close(ad.delta_weight(), view.to_param(w - w0).detach(), "delta_weight")
    for n, p in ad.named_parameters():
        assert p.grad is not None and p.grad.dtype == low, n
        close(p.grad, params[n].grad, f"grad {n}")
    torch.optim.SGD(ad.parameters(), lr=1e-2).step()
    assert all(torch.isfinite(p).all() for p in ad.parameters())
