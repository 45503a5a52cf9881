"""Methods of the DoRA group — dora, edora, bora, vera, nola, randlora: each against an independent
oracle (a dense re-derivation of the paper's formula, PEFT 0.21 for the methods it has, closed
forms), plus the defining property of each method and its parameter-count formula."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import rankwise as rw
from rankwise.core.adapted import AdaptedLayer
from rankwise.core.api import adapter_state

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

ATOL = 1e-5


# ---- helpers -----------------------------------------------------------------------------------
def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _adapter(model, name="layer"):
    return model.get_submodule(name).adapters["default"]


def _net(layer):
    return nn.Sequential(layer)


def _randomize(params, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def _peft(base, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), cfg)


def _peft_load(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


def _peft_save(pmodel, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel.save_pretrained(path)


# {rankwise parameter name: PEFT parameter name (without the adapter name)} per method
PEFT_NAMES = {
    "dora": {"lora_A": ("lora_A.default.weight", "lora_embedding_A.default"),
             "lora_B": ("lora_B.default.weight", "lora_embedding_B.default"),
             "magnitude": ("lora_magnitude_vector.default.weight",)},
    "vera": {"vera_lambda_b": ("vera_lambda_b.default",), "vera_lambda_d": ("vera_lambda_d.default",)},
    "randlora": {"randlora_lambda": ("randlora_lambda.default",), "randlora_gamma": ("randlora_gamma.default",)},
}


def _pairs(model, pmodel, method):
    """[(rankwise param, PEFT param, label)] for every adapted module, matched by name."""
    theirs = dict(pmodel.named_parameters())
    out = []
    for mname, layer in _layers(model).items():
        for pname, p in layer.adapters["default"].named_parameters():
            keys = [f"base_model.model.{mname}.{s}" for s in PEFT_NAMES[method][pname]]
            key = next(k for k in keys if k in theirs)
            out.append((p, theirs[key], f"{mname}.{pname}"))
    assert out
    return out


def _copy_peft_into_ours(model, pmodel, method, seed):
    pairs = _pairs(model, pmodel, method)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ours, theirs, _ in pairs:
            theirs.add_(torch.randn(theirs.shape, generator=g) * 0.1)  # move PEFT's init: B, λ ≠ 0 …
            ours.copy_(theirs.reshape(ours.shape))
    return pairs


def _loss(model, batch):
    logits = model(**batch).logits
    target = torch.arange(logits.numel(), dtype=logits.dtype).reshape(logits.shape).sin()
    return (logits * target).sum()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# ---- PEFT oracle: same weights → same outputs and gradients, for dora / vera / randlora -------------
CASES = {
    "dora": (lambda t: peft.LoraConfig(r=4, lora_alpha=6, target_modules=t, use_dora=True),
             {"rank": 4, "alpha": 6.0}),
    "vera": (lambda t: peft.VeraConfig(r=6, target_modules=t, projection_prng_key=0), {"rank": 6, "projection_seed": 0}),
    "randlora": (lambda t: peft.RandLoraConfig(r=8, randlora_alpha=16, target_modules=t, projection_prng_key=0),
                 {"rank": 8, "alpha": 16.0, "projection_seed": 0}),
}
MODELS = {"bert": ["query", "value", "dense"], "gpt2": ["c_attn", "c_proj", "c_fc"]}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", list(CASES))
def test_peft_same_weights_same_outputs_and_gradients(method, model_name, request, token_batch):
    targets = MODELS[model_name]
    base = request.getfixturevalue(model_name)(seed=0)
    make_cfg, opts = CASES[method]
    pmodel = _peft(base, make_cfg(targets))
    model = rw.adapt(copy.deepcopy(base), method, targets=targets, seed=0, **opts)
    assert set(_layers(model)) == {n.removeprefix("base_model.model.") for n, m in pmodel.named_modules()
                                   if hasattr(m, "base_layer") and n.startswith("base_model.model.")}
    if method == "dora":  # PEFT's init of the magnitude: ‖W0‖ per output row (our own formula)
        for ours, theirs, label in _pairs(model, pmodel, method):
            if label.endswith("magnitude"):
                torch.testing.assert_close(ours, theirs.reshape(ours.shape), atol=1e-6, rtol=1e-6, msg=label)
    pairs = _copy_peft_into_ours(model, pmodel, method, seed=1)
    model.eval()
    pmodel.eval()
    ours_out, theirs_out = _logits(model, token_batch), _logits(pmodel, token_batch)
    assert not torch.allclose(ours_out, _logits(base, token_batch), atol=1e-3), "the adapter should change the output"
    assert (ours_out - theirs_out).abs().max() <= ATOL
    model.train()
    pmodel.train()
    lo, lt = _loss(model, token_batch), _loss(pmodel, token_batch)
    torch.testing.assert_close(lo, lt, atol=1e-4, rtol=1e-6)
    lo.backward()
    lt.backward()
    for ours, theirs, label in pairs:
        assert ours.grad is not None and ours.grad.abs().max() > 0, label
        torch.testing.assert_close(ours.grad, theirs.grad.reshape(ours.shape), atol=ATOL, rtol=1e-4, msg=label)


def test_vera_randlora_bases_are_peft_bases(bert):
    """Same projection seed and same targets → PEFT's frozen projections bit for bit (their init)."""
    base = bert(seed=0)
    targets = ["query", "key", "intermediate.dense", "output.dense"]  # 32x32, 64x32, 32x64: bases sliced
    for method, seed in (("vera", 0), ("randlora", 5)):
        pmodel = _peft(base, peft.VeraConfig(r=6, target_modules=targets, projection_prng_key=seed) if method == "vera"
                       else peft.RandLoraConfig(r=6, target_modules=targets, projection_prng_key=seed))
        model = rw.adapt(copy.deepcopy(base), method, rank=6, targets=targets, projection_seed=seed)
        shared = adapter_state(model)["default"]["shared"]
        if method == "vera":
            theirs = (pmodel.base_model.vera_A["default"], pmodel.base_model.vera_B["default"])
            ours = (shared.vera_A, shared.vera_B)
        else:
            lay = next(m for m in pmodel.modules() if getattr(m, "randlora_A", None) is not None)
            theirs = (lay.randlora_A["default"], lay.randlora_B["default"])
            ours = (shared.randlora_A, shared.randlora_B)
        for o, t in zip(ours, theirs):
            assert o.shape == t.shape and torch.equal(o, t), method
        # one object for all layers: every adapter holds the very same bases
        assert len({id(ad.bases) for ad in (l_.adapters["default"] for l_ in _layers(model).values())}) == 1


# ---- PEFT file round trips ---------------------------------------------------------------------------
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 5, 3, padding=1, stride=2)
        self.c2 = nn.Conv2d(5, 4, (3, 2), padding=1)
        self.emb = nn.Embedding(10, 6, padding_idx=0)
        self.fc = nn.Linear(6, 5)

    def forward(self, x, ids):
        h = self.c1(x)
        h2 = self.c2(h[:, :, None, :].expand(-1, -1, 4, -1))
        return torch.cat([h.flatten(1), h2.flatten(1), self.fc(self.emb(ids)).flatten(1)], dim=1)


@pytest.mark.parametrize("method", list(CASES))
def test_export_then_import_peft(method, gpt2, tmp_path, token_batch):
    base = gpt2(seed=0)
    targets = MODELS["gpt2"]
    _, opts = CASES[method]
    opts = {k: v for k, v in opts.items() if k != "projection_seed"}  # a drawn seed goes to the file too
    model = rw.adapt(copy.deepcopy(base), method, targets=targets, seed=3, **opts)
    _randomize([p for p in model.parameters() if p.requires_grad], seed=4, std=0.1)
    ours = _logits(model, token_batch)
    rw.export_peft(model, tmp_path / "p")
    pmodel = _peft_load(base, tmp_path / "p")
    assert (_logits(pmodel, token_batch) - ours).abs().max() <= ATOL
    back = rw.import_peft(copy.deepcopy(base), tmp_path / "p")
    assert (_logits(back, token_batch) - ours).abs().max() <= ATOL
    # and a rankwise save of the imported adapter reloads to the same outputs
    rw.save(back, tmp_path / "rw")
    again = rw.load(copy.deepcopy(base), tmp_path / "rw")
    assert torch.equal(_logits(again, token_batch), _logits(back, token_batch))


@pytest.mark.parametrize("method", list(CASES))
def test_import_peft_then_export(method, bert, tmp_path, token_batch):
    base = bert(seed=0)
    make_cfg, _ = CASES[method]
    cfg = make_cfg(["query", "value", "dense"])
    cfg.modules_to_save = ["classifier"]
    pmodel = _peft(base, cfg)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in pmodel.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs = _logits(pmodel.eval(), token_batch)
    _peft_save(pmodel, tmp_path / "p")
    model = rw.import_peft(copy.deepcopy(base), tmp_path / "p")
    assert (_logits(model, token_batch) - theirs).abs().max() <= ATOL
    assert rw.trainable_parameters(model) == sum(p.numel() for p in pmodel.parameters() if p.requires_grad)
    rw.export_peft(model, tmp_path / "again")
    assert (_logits(_peft_load(base, tmp_path / "again"), token_batch) - theirs).abs().max() <= ATOL


def test_dora_conv_embedding_round_trip(tmp_path):
    torch.manual_seed(0)
    base = ConvNet()
    g = torch.Generator().manual_seed(0)
    x, ids = torch.randn(2, 3, 11, generator=g), torch.randint(0, 10, (2, 4), generator=g)
    model = rw.adapt(copy.deepcopy(base), "dora", rank=2, alpha=3.0, targets=["c1", "c2", "emb", "fc"], seed=0)
    _randomize([p for p in model.parameters() if p.requires_grad], seed=1)
    rw.export_peft(model, tmp_path / "p")
    pmodel = _peft_load(base, tmp_path / "p")
    with torch.no_grad():
        ours = model(x, ids)
        assert (ours - pmodel(x, ids)).abs().max() <= ATOL
        back = rw.import_peft(copy.deepcopy(base), tmp_path / "p")
        assert (back(x, ids) - ours).abs().max() <= ATOL


def test_vera_peft_file_holds_projections_once(gpt2, tmp_path):
    model = rw.adapt(gpt2(seed=0), "vera", rank=4, targets=["c_attn", "c_fc"], seed=0)
    rw.export_peft(model, tmp_path / "p")
    keys = set(load_file(str(tmp_path / "p" / "adapter_model.safetensors")))
    assert {"base_model.vera_A", "base_model.vera_B"} <= keys
    assert not any(k.endswith(("vera_A", "vera_B")) and k.startswith("base_model.model.") for k in keys)


# ---- DoRA ----------------------------------------------------------------------------------------
def test_dora_row_norm_formula_is_dense_norm():
    """‖W0 + sBA‖ per row from W0Aᵀ and AAᵀ equals the norm of the dense matrix (float64)."""
    from rankwise.methods._dora_common import row_norm_sq

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(7, 11, generator=g, dtype=torch.float64)
    a = torch.randn(3, 11, generator=g, dtype=torch.float64)
    b = torch.randn(7, 3, generator=g, dtype=torch.float64)
    s = 0.7
    got = row_norm_sq(w0.square().sum(1), w0 @ a.t(), a @ a.t(), b, s).sqrt()
    torch.testing.assert_close(got, torch.linalg.norm(w0 + s * b @ a, dim=1), atol=1e-12, rtol=1e-12)


def _dense_dora(layer: nn.Linear, a, b, m, s, x):
    """DoRA by the paper's formula, densely, with the norm detached (the oracle)."""
    v = layer.weight + s * b @ a
    w = (m / torch.linalg.norm(v, dim=1).detach())[:, None] * v
    return F.linear(x, w, layer.bias)


def test_dora_gradients_match_dense_formula():
    """The fused autograd node of the linear path gives the dense formula's gradients (float64)."""
    torch.manual_seed(0)
    layer = nn.Linear(9, 6).double()
    model = rw.adapt(_net(layer), "dora", rank=3, alpha=5.0, targets=["0"], seed=0)
    ad = _adapter(model, "0")
    _randomize(ad.parameters(), seed=2, std=0.5)
    x = torch.randn(4, 5, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 6, dtype=torch.float64)
    params = [x, ad.lora_A, ad.lora_B, ad.magnitude]
    ours = torch.autograd.grad((model(x) * w).sum(), params)
    ref = torch.autograd.grad((_dense_dora(layer, ad.lora_A, ad.lora_B, ad.magnitude, ad.scale, x) * w).sum(), params)
    for o, r, name in zip(ours, ref, ("x", "A", "B", "m")):
        torch.testing.assert_close(o, r, atol=1e-10, rtol=1e-10, msg=name)
    from rankwise.methods._dora_common import _DoraLinear

    xs = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    bo = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    g = torch.rand(6, dtype=torch.float64, requires_grad=True)
    args = (xs, bo, ad.lora_A.detach().clone().requires_grad_(), ad.lora_B.detach().clone().requires_grad_(), g)
    assert torch.autograd.gradcheck(lambda *t: _DoraLinear.apply(*t, layer.bias.detach(), 0.8), args)


def test_dora_norm_follows_w0_changes():
    """‖W0‖² is cached; merging another adapter into W0 (in place) refreshes it."""
    torch.manual_seed(0)
    model = _net(nn.Linear(8, 5))
    rw.adapt(model, "dora", rank=2, targets=["0"], name="d", seed=0)
    rw.adapt(model, "lora", rank=2, targets=["0"], name="l", seed=1)
    _randomize([p for p in model.parameters() if p.requires_grad], seed=3)
    x = torch.randn(3, 8)
    rw.set_active(model, ["d", "l"])
    layer = model[0]
    with torch.no_grad():
        model(x)  # fills the cache with the pristine W0
        layer.merge(["l"])  # W0 ← W0 + ΔW_lora, in place
        rw.set_active(model, ["d", "l"])
        ad = layer.adapters["d"]
        ref = _dense_dora(layer.base, ad.lora_A, ad.lora_B, ad.magnitude, ad.scale, x)
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-6)


def test_dora_parameter_count_and_identity_at_init():
    model = rw.adapt(_net(nn.Linear(10, 7)), "dora", rank=3, targets=["0"], seed=0)
    assert rw.trainable_parameters(model) == 3 * (10 + 7) + 7  # r (in + out) + out
    x = torch.randn(2, 10)
    with torch.no_grad():
        assert torch.equal(model(x), model[0].base(x))


# ---- EDoRA ---------------------------------------------------------------------------------------
def test_edora_factors_are_truncated_svd_and_only_core_and_magnitude_train():
    torch.manual_seed(0)
    layer = nn.Linear(12, 9)
    model = rw.adapt(_net(layer), "edora", rank=4, targets=["0"], seed=0)
    ad = _adapter(model, "0")
    w = layer.weight.detach().double()
    s = torch.linalg.svdvals(w)
    b, a = ad.edora_B.double(), ad.edora_A.double()
    torch.testing.assert_close(b.t() @ b, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)  # orthonormal U_r
    # Eckart–Young: ‖W0 − B A‖_F² = Σ_{j>r} σ_j² (B A is the best rank-r approximation)
    torch.testing.assert_close(torch.linalg.norm(w - b @ a) ** 2, (s[4:] ** 2).sum(), atol=1e-4, rtol=1e-4)
    assert {n for n, p in ad.named_parameters()} == {"edora_R", "magnitude"}
    assert rw.trainable_parameters(model) == 4 * 4 + 9  # r² + out
    assert ad.edora_R.abs().max() < 1e-4  # N(0, 1e-5²)
    torch.testing.assert_close(ad.magnitude, torch.linalg.norm(layer.weight, dim=1), atol=1e-6, rtol=1e-6)


def test_edora_matches_dense_formula_and_gradients():
    torch.manual_seed(1)
    layer = nn.Linear(10, 8).double()
    model = rw.adapt(_net(layer), "edora", rank=3, alpha=6.0, targets=["0"], seed=0)
    ad = _adapter(model, "0")
    _randomize(ad.parameters(), seed=5, std=0.5)
    x = torch.randn(5, 10, dtype=torch.float64)
    v = layer.weight + ad.scale * ad.edora_B @ ad.edora_R @ ad.edora_A
    w = (ad.magnitude / torch.linalg.norm(v, dim=1).detach())[:, None] * v
    ref = F.linear(x, w, layer.bias)
    out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    go = torch.autograd.grad(out.square().sum(), [ad.edora_R, ad.magnitude])
    gr = torch.autograd.grad(ref.square().sum(), [ad.edora_R, ad.magnitude])
    for o, r in zip(go, gr):
        torch.testing.assert_close(o, r, atol=1e-10, rtol=1e-10)


def test_edora_zero_init_std_is_identity():
    layer = nn.Linear(6, 5)
    model = rw.adapt(_net(copy.deepcopy(layer)), "edora", rank=2, init_std=0.0, targets=["0"], seed=0)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(model(x), layer(x))


# ---- BoRA ----------------------------------------------------------------------------------------
def _dense_bora(w0, a, b, m_row, m_col, s):
    v = w0 + s * b @ a
    h = (m_row / torch.linalg.norm(v, dim=1).detach())[:, None] * v
    return h * (m_col / torch.linalg.norm(h, dim=0).detach())[None, :]


def test_bora_matches_dense_formula_gradients_and_column_norms():
    torch.manual_seed(2)
    layer = nn.Linear(7, 9).double()
    model = rw.adapt(_net(layer), "bora", rank=3, alpha=4.0, targets=["0"], seed=0)
    ad = _adapter(model, "0")
    assert rw.trainable_parameters(model) == 3 * (7 + 9) + 9 + 7
    _randomize(ad.parameters(), seed=8, std=0.5)
    with torch.no_grad():
        ad.m_row.abs_()
        ad.m_col.abs_()
    x = torch.randn(4, 7, dtype=torch.float64)
    params = list(ad.parameters())
    w_ref = _dense_bora(layer.weight, ad.lora_A, ad.lora_B, ad.m_row, ad.m_col, ad.scale)
    ref = F.linear(x, w_ref, layer.bias)
    out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    # the defining property: every input column of the adapted weight has norm m_col
    w = layer.weight + ad.delta_weight()
    torch.testing.assert_close(torch.linalg.norm(w, dim=0), ad.m_col.detach(), atol=1e-10, rtol=1e-10)
    for o, r in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)):
        torch.testing.assert_close(o, r, atol=1e-9, rtol=1e-9)


def test_bora_magnitudes_init_to_row_and_column_norms():
    layer = nn.Linear(6, 4)
    ad = _adapter(rw.adapt(_net(layer), "bora", rank=2, targets=["0"], seed=0), "0")
    torch.testing.assert_close(ad.m_row, torch.linalg.norm(layer.weight, dim=1))
    torch.testing.assert_close(ad.m_col, torch.linalg.norm(layer.weight, dim=0))


# ---- VeRA ----------------------------------------------------------------------------------------
def test_vera_parameters_sharing_and_init(bert):
    model = rw.adapt(bert(seed=0), "vera", rank=16, d_initial=0.25, targets=["query", "intermediate.dense"], seed=0)
    layers = _layers(model)
    assert rw.trainable_parameters(model) == sum(16 + layer.view.out_features for layer in layers.values())
    shared = adapter_state(model)["default"]["shared"]
    assert tuple(shared.vera_A.shape) == (16, 32) and tuple(shared.vera_B.shape) == (64, 16)  # max in, max out
    for layer in layers.values():
        ad = layer.adapters["default"]
        a, b = ad.factors()
        assert a.data_ptr() == shared.vera_A.data_ptr() and b.data_ptr() == shared.vera_B.data_ptr()  # views
        assert torch.equal(ad.vera_lambda_d, torch.full((16,), 0.25)) and not ad.vera_lambda_b.any()
    # ΔW = Λ_b B Λ_d A
    ad = layers["bert.encoder.layer.0.intermediate.dense"].adapters["default"]
    _randomize([ad.vera_lambda_b, ad.vera_lambda_d], seed=1)
    a, b = shared.vera_A[:, :32], shared.vera_B[:64]
    torch.testing.assert_close(ad.delta_weight(), torch.diag(ad.vera_lambda_b) @ b @ torch.diag(ad.vera_lambda_d) @ a)


@pytest.mark.parametrize("keep_z", [False, True])
def test_vera_linear_node_gradients(keep_z):
    """The fused linear node (either way of getting b's gradient) against autograd of the formula."""
    from rankwise.methods.vera import _VeraLinear

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


@pytest.mark.parametrize("save_projection", [False, True])
def test_vera_randlora_save_load_regenerates_bases(save_projection, bert, tmp_path, token_batch):
    for method in ("vera", "randlora"):
        base = bert(seed=0)
        model = rw.adapt(copy.deepcopy(base), method, rank=4, targets=["query", "output.dense"], seed=7,
                         save_projection=save_projection)
        _randomize([p for p in model.parameters() if p.requires_grad], seed=2, std=0.05)
        rw.save(model, tmp_path / method / str(save_projection))
        keys = set(load_file(str(tmp_path / method / str(save_projection) / "adapter_model.safetensors")))
        stored = {k for k in keys if "(shared)" in k}
        names = {"vera": ("vera_A", "vera_B"), "randlora": ("randlora_A", "randlora_B")}[method]
        assert stored == {f"default/(shared)/{n}" for n in ("key", *(names if save_projection else ()))}
        torch.manual_seed(123)  # the fresh adapter draws another seed from the global RNG; load replaces it
        fresh = rw.load(copy.deepcopy(base), tmp_path / method / str(save_projection))
        new, old = adapter_state(fresh)["default"]["shared"], adapter_state(model)["default"]["shared"]
        for n in names:
            assert torch.equal(getattr(new, n), getattr(old, n)), n
        assert torch.equal(_logits(fresh, token_batch), _logits(model, token_batch))


# ---- NoLA ----------------------------------------------------------------------------------------
def test_nola_parameter_count_is_shape_independent(bert):
    model = rw.adapt(bert(seed=0), "nola", rank=4, num_basis_A=10, num_basis_B=7, targets=["query", "dense"], seed=0)
    layers = _layers(model)
    assert len({(ly.view.out_features, ly.view.in_features) for ly in layers.values()}) > 1
    assert rw.trainable_parameters(model) == len(layers) * (10 + 7)
    seeds = {int(ly.adapters["default"].bases.key) for ly in layers.values()}
    assert len(seeds) == len(layers), "each layer has its own seed (the paper's per-layer bases)"


def test_nola_update_is_combination_of_bases():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    model = rw.adapt(_net(layer), "nola", rank=2, num_basis_A=4, num_basis_B=3, alpha=3.0, targets=["0"], seed=0)
    ad = _adapter(model, "0")
    bs = ad.bases
    # frozen bases: A0 ~ U(±1/√in), bases ~ U(±1)/√k
    assert bs.nola_A0.abs().max() <= 1 / math.sqrt(6) and bs.nola_basis_A.abs().max() <= 1 / math.sqrt(4)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(model(x), layer(x))  # β = 0: B = 0
    out = model(x).square().sum()
    g_alpha, g_beta = torch.autograd.grad(out, [ad.nola_alpha, ad.nola_beta])
    assert not g_alpha.any() and g_beta.abs().max() > 0  # β learns through the frozen A0 from the first step
    _randomize([ad.nola_alpha, ad.nola_beta], seed=3)
    a = bs.nola_A0 + torch.einsum("j,jri->ri", ad.nola_alpha, bs.nola_basis_A)
    b = torch.einsum("i,ior->or", ad.nola_beta, bs.nola_basis_B)
    torch.testing.assert_close(ad.delta_weight(), 1.5 * b @ a)


def test_nola_file_holds_seed_and_coefficients_only(tmp_path):
    torch.manual_seed(0)
    base = _net(nn.Linear(6, 5))
    model = rw.adapt(copy.deepcopy(base), "nola", rank=2, num_basis_A=4, num_basis_B=3, targets=["0"], seed=0)
    _randomize([p for p in model.parameters() if p.requires_grad], seed=1)
    rw.save(model, tmp_path / "n")
    keys = set(load_file(str(tmp_path / "n" / "adapter_model.safetensors")))
    assert keys == {"default/0/nola_alpha", "default/0/nola_beta", "default/0/bases.key"}
    fresh = rw.load(copy.deepcopy(base), tmp_path / "n")
    for n in ("nola_A0", "nola_basis_A", "nola_basis_B"):
        assert torch.equal(getattr(_adapter(fresh, "0").bases, n), getattr(_adapter(model, "0").bases, n))


# ---- RandLoRA ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9)])
def test_randlora_update_is_full_rank(shape):
    n_out, n_in = shape
    model = rw.adapt(_net(nn.Linear(n_in, n_out).double()), "randlora", rank=3, targets=["0"], seed=0)
    ad = _adapter(model, "0")
    d = min(shape)
    n = -(-d // 3)
    assert rw.trainable_parameters(model) == 3 * n + n * d
    assert not ad.delta_weight().any()  # λ = 0 at init
    _randomize([ad.randlora_lambda, ad.randlora_gamma], seed=1)
    assert torch.linalg.matrix_rank(ad.delta_weight()) == d > 3  # full rank although each basis has rank 3
    lo_rank = rw.adapt(_net(nn.Linear(n_in, n_out).double()), "lora", rank=3, targets=["0"], seed=0)
    _randomize([p for p in lo_rank.parameters() if p.requires_grad], seed=1)
    assert torch.linalg.matrix_rank(_adapter(lo_rank, "0").delta_weight()) == 3  # LoRA's update stays at rank r


def test_randlora_dense_and_thin_paths_agree():
    """Few tokens: two thin products; many tokens: one product with W0 + ΔW. Same layer, same output."""
    torch.manual_seed(0)
    layer = nn.Linear(10, 6).double()
    model = rw.adapt(_net(layer), "randlora", rank=2, targets=["0"], seed=0)
    ad = _adapter(model, "0")
    _randomize([ad.randlora_lambda, ad.randlora_gamma], seed=2)
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
