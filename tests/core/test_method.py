"""Universal properties, for every registered method × every layer kind it declares × random shapes.

The oracle is the dense weight view: a copy of the base layer whose weight is
``W0 + delta_weight()`` run through its own ``forward`` (and ``AdaptedLayer.view.functional``).
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import rankwise as rw
from rankwise.core.adapted import AdaptedLayer, TrainedCopies
from rankwise.core.api import saved_module

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("single_thread")
SHAPE_SEEDS = (0, 1, 2)


# ---- layers of every kind, with seeded random shapes -------------------------------------------
def _make_layer(kind: str, seed: int):
    """(layer, input) for ``kind`` with shapes drawn from ``seed``."""
    r = random.Random(f"{kind}-{seed}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        n_in, n_out = r.randint(3, 17), r.randint(3, 17)
        layer = nn.Linear(n_in, n_out, bias=r.random() < 0.7)
        x = torch.randn(2, r.randint(1, 4), n_in, generator=g)
    elif kind == "hf_conv1d":
        n_in, n_out = r.randint(3, 17), r.randint(3, 17)
        layer = Conv1D(n_out, n_in)
        with torch.no_grad():
            layer.weight.normal_(0, 0.3, generator=g)
            layer.bias.normal_(0, 0.3, generator=g)
        x = torch.randn(2, r.randint(1, 4), n_in, generator=g)
    elif kind == "conv1d":
        c_in, c_out, k = r.randint(2, 5), r.randint(2, 6), r.choice([1, 2, 3])
        layer = nn.Conv1d(c_in, c_out, k, stride=r.choice([1, 2]), padding=r.choice([0, 1]),
                          dilation=r.choice([1, 2]), bias=r.random() < 0.7,
                          padding_mode=r.choice(["zeros", "circular"]))
        x = torch.randn(2, c_in, r.randint(8, 12), generator=g)
    elif kind == "conv2d":
        c_in, c_out = r.randint(2, 4), r.randint(2, 5)
        k = (r.choice([1, 2, 3]), r.choice([1, 3]))
        layer = nn.Conv2d(c_in, c_out, k, stride=r.choice([1, 2]), padding=r.choice([0, 1]),
                          dilation=r.choice([1, 2]), bias=r.random() < 0.7,
                          padding_mode=r.choice(["zeros", "reflect"]))
        x = torch.randn(2, c_in, r.randint(7, 9), r.randint(7, 9), generator=g)
    elif kind == "embedding":
        num, dim = r.randint(5, 20), r.randint(3, 12)
        layer = nn.Embedding(num, dim, padding_idx=r.choice([None, 0]))
        x = torch.randint(0, num, (2, r.randint(3, 6)), generator=g)
    else:  # pragma: no cover - a new kind needs a builder here
        raise AssertionError(f"no test builder for layer kind {kind!r}")
    return layer, x


class Scale(nn.Module):
    """Elementwise ``y * w + b`` with scalar parameters: a non-adaptable module to put in modules_to_save."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(0.0))

    def forward(self, y):
        return y * self.w + self.b


class Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.post = Scale()

    def forward(self, x):
        return self.post(self.layer(x))


def _kinds_of(method: str) -> tuple[str, ...]:
    return tuple(rw.get_method(method).kinds)


CASES = [
    pytest.param(m, k, s, id=f"{m}-{k}-s{s}")
    for m in rw.methods()
    for k in ("linear", "hf_conv1d", "conv1d", "conv2d", "embedding")
    if k in _kinds_of(m)
    for s in SHAPE_SEEDS
]
IDENTITY_CASES = [c for c in CASES if rw.get_method(c.values[0]).identity_at_init]


def _config(method: str, layer, **kw):
    cls = rw.get_method(method)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    if "rank" in fields:
        w = layer.weight
        limit = min(w.shape[0], w[0].numel()) if w.dim() > 1 else 1
        kw.setdefault("rank", min(2, limit))
    kw.setdefault("targets", ["layer"])
    return cls.Config(**kw)


def _calibration(method, x) -> dict:
    """For a data-driven init (the method declares ``calibration_needs``): the layer's own input as
    two calibration batches, and a loss that squares the output."""
    if not rw.get_method(method).calibration_needs:
        return {}
    return {"calibration": [x, x], "loss_fn": lambda model, batch: model(batch).square().mean()}


def _build(method, kind, seed, **kw):
    """(pristine base Net, adapted Net with perturbed adapter + post params, input, the AdaptedLayer)."""
    layer, x = _make_layer(kind, seed)
    base = Net(layer).eval()
    model = copy.deepcopy(base)
    rw.adapt(model, _config(method, layer, **kw), seed=seed, **_calibration(method, x))
    model.eval()
    adapted = model.layer
    assert isinstance(adapted, AdaptedLayer)
    for ad in adapted.adapters.values():  # a warm-up schedule (SingLoRA's ramp-up) would hide the update
        ad.finish_warmup()
    _perturb(adapted.adapters.parameters(), seed + 100)
    return base, model, x, adapted


def _perturb(params, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _dense_reference(layer: AdaptedLayer, x, weight):
    """The base layer's own forward with its weight replaced by ``weight`` (param layout)."""
    ref = copy.deepcopy(layer.base)
    with torch.no_grad():
        ref.weight.copy_(weight)
    return ref(x)


# ---- activation view == weight view -------------------------------------------------------------
@pytest.mark.parametrize("method,kind,seed", CASES)
def test_activation_view_equals_weight_view(method, kind, seed):
    _, model, x, layer = _build(method, kind, seed)
    delta = layer.delta_weight()
    assert delta.shape == layer.base.weight.shape
    assert delta.abs().max() > 1e-3, "perturbed adapter should give a non-zero update"
    with torch.no_grad():
        out = layer(x)
        w = layer.base.weight + delta
        ref = _dense_reference(layer, x, w)
        view_ref = layer.view.functional(x, _to2d(layer, w))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(out, view_ref, atol=ATOL, rtol=ATOL)
    # and through the whole model (post is identity at init)
    torch.testing.assert_close(model(x), ref, atol=ATOL, rtol=ATOL)


def _to2d(layer: AdaptedLayer, delta_param_layout):
    """Param layout → canonical ``(out, in)``, computed independently of LayerView."""
    k = layer.view.kind
    if k in ("hf_conv1d", "embedding"):
        return delta_param_layout.t()
    if k in ("conv1d", "conv2d"):
        return delta_param_layout.reshape(delta_param_layout.shape[0], -1)
    return delta_param_layout


def test_layer_view_functional_matches_module():
    """``LayerView.functional`` with the base weight is the base module's own forward."""
    for kind in ("linear", "hf_conv1d", "conv1d", "conv2d", "embedding"):
        for seed in SHAPE_SEEDS:
            layer, x = _make_layer(kind, seed)
            view = rw.core.layers.LayerView(layer, "layer")
            with torch.no_grad():
                torch.testing.assert_close(view.functional(x, view.weight2d()), layer(x), atol=0, rtol=0)
                assert view.to_param(view.weight2d()).shape == layer.weight.shape


# ---- merge / unmerge ------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kind,seed", CASES)
def test_merge_unmerge(method, kind, seed):
    _, model, x, layer = _build(method, kind, seed)
    cls = rw.get_method(method)
    w0 = layer.base.weight.detach().clone()
    delta = layer.delta_weight().detach().clone()
    with torch.no_grad():
        unmerged = model(x)
        rw.merge(model)
        assert layer.merged == ["default"]
        torch.testing.assert_close(layer.base.weight, w0 + delta, atol=ATOL, rtol=ATOL)
        merged = model(x)
        torch.testing.assert_close(merged, unmerged, atol=ATOL, rtol=ATOL)
        rw.merge(model)  # merging twice is a no-op
        torch.testing.assert_close(model(x), unmerged, atol=ATOL, rtol=ATOL)
        rw.unmerge(model)
        assert layer.merged == []
        torch.testing.assert_close(layer.base.weight, w0, atol=cls.merge_atol, rtol=0)
        torch.testing.assert_close(model(x), unmerged, atol=ATOL, rtol=ATOL)


# ---- save / load -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kind,seed", CASES)
def test_save_load_roundtrip(method, kind, seed, tmp_path):
    base, model, x, layer = _build(method, kind, seed, modules_to_save=["post"])
    head = saved_module(model, "post", "default")
    _perturb(head.parameters(), seed + 7)
    rw.save(model, tmp_path / "ad")
    fresh = copy.deepcopy(base)
    rw.load(fresh, tmp_path / "ad", trainable=True)  # trainable as the saved model was (its own frozen tensors too)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x)), "save → load must reproduce outputs bitwise (fp32)"
    a, b = model.layer.adapters["default"].state_dict(), fresh.layer.adapters["default"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert isinstance(fresh.post, TrainedCopies) and list(fresh.post.copies) == ["default"]
    fresh_head = saved_module(fresh, "post", "default")
    assert torch.equal(fresh_head.w, head.w) and torch.equal(fresh_head.b, head.b)
    assert not torch.equal(fresh_head.w, base.post.w), "the perturbed head must differ from the original"
    # the original stays the base model's
    assert torch.equal(fresh.post.original.w, base.post.w) and torch.equal(fresh.post.original.b, base.post.b)
    assert torch.equal(fresh.layer.base.weight, base.layer.weight)
    assert rw.parameter_count(fresh).trainable == rw.parameter_count(model).trainable


# ---- identity at init -------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kind,seed", IDENTITY_CASES)
def test_identity_at_init(method, kind, seed):
    layer, x = _make_layer(kind, seed)
    base = Net(layer).eval()
    model = copy.deepcopy(base)
    rw.adapt(model, _config(method, layer), seed=seed, **_calibration(method, x))
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
        assert torch.count_nonzero(model.layer.delta_weight()) == 0


# ---- gradients and parameter counts ---------------------------------------------------------------
@pytest.mark.parametrize("method,kind,seed", CASES)
def test_only_adapters_get_grads(method, kind, seed):
    _, model, x, layer = _build(method, kind, seed, modules_to_save=["post"])
    cls = rw.get_method(method)
    model.train()
    out = model(x)
    out.square().mean().backward()
    head = saved_module(model, "post", "default")
    adapter_ids = {id(p) for p in layer.adapters.parameters()} | {id(p) for p in head.parameters()}
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert p.requires_grad and p.grad is not None, f"{name} should have a gradient"
            assert torch.isfinite(p.grad).all()
        else:
            assert not p.requires_grad and p.grad is None, f"base parameter {name} got a gradient"
    # the head trains as the adapter's copy; the original (post.original.*) is frozen above
    assert {n for n, p in model.named_parameters() if id(p) in {id(q) for q in head.parameters()}} == {
        "post.copies.default.w", "post.copies.default.b"}
    expected = cls.num_params(layer.view, layer.adapters["default"].config) + 2  # + post (w, b)
    assert rw.parameter_count(model).trainable == expected
    assert sum(p.numel() for p in layer.adapters.parameters() if p.requires_grad) == expected - 2


# ---- seeding -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kind,seed", CASES)
def test_seed_determinism(method, kind, seed):
    layer, x = _make_layer(kind, seed)
    base = Net(layer)
    models = [copy.deepcopy(base) for _ in range(4)]
    cal = _calibration(method, x)
    rw.adapt(models[0], _config(method, layer), seed=11, **cal)
    rw.adapt(models[1], _config(method, layer), seed=11, **cal)
    rw.adapt(models[2], _config(method, layer), seed=12, **cal)
    rw.adapt(models[3], _config(method, layer), generator=torch.Generator().manual_seed(11), **cal)
    sds = [m.layer.adapters["default"].state_dict() for m in models]
    for k in sds[0]:
        assert torch.equal(sds[0][k], sds[1][k]), k
        assert torch.equal(sds[0][k], sds[3][k]), k
    if models[0].layer.adapters["default"].deterministic_init:  # may depend on the config
        # the init is a function of W0 alone (SVD / LU of the base weight): no seed may change it
        assert all(torch.equal(sds[0][k], sds[2][k]) for k in sds[0]), "a deterministic init changed with the seed"
    else:
        assert any(not torch.equal(sds[0][k], sds[2][k]) for k in sds[0]), "another seed should change the init"


# ---- LoRA dropout: the custom autograd path ---------------------------------------------------------
@pytest.mark.skipif("lora" not in rw.methods(), reason="lora is not registered")
def test_lora_dropout_function_matches_plain_autograd():
    from rankwise.core.ops import DropoutLinear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.rand(3, 4, 6, generator=g) < 0.7
    keep = 0.7
    assert torch.autograd.gradcheck(lambda x_, a_: DropoutLinear.apply(x_, a_, mask, keep), (x, a))

    w = torch.randn(3, 4, 2, dtype=torch.float64, generator=g)
    h = DropoutLinear.apply(x, a, mask, keep)
    gx, ga = torch.autograd.grad((h * w).sum(), (x, a))
    h_ref = F.linear(x * mask / keep, a)
    gx_ref, ga_ref = torch.autograd.grad((h_ref * w).sum(), (x, a))
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(ga, ga_ref)


@pytest.mark.skipif("lora" not in rw.methods(), reason="lora is not registered")
@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("kind", ["linear", "hf_conv1d", "conv2d"])
def test_lora_dropout_layer_gradcheck(kind, dropout):
    """The whole adapted layer in train mode (whatever autograd path LoRA takes), with the
    dropout mask fixed by reseeding before each call: analytic gradients == numerical ones."""
    layer, x = _make_layer(kind, 1)
    layer = layer.double()
    x = (x[:1, :, :6, :6] if kind == "conv2d" else x).double().requires_grad_(True)  # keep gradcheck cheap
    net = Net(layer).double()
    rw.adapt(net, rw.LoraConfig(rank=2, alpha=3.0, dropout=dropout, targets=["layer"]), seed=0)
    net.train()
    ad = net.layer.adapters["default"]
    _perturb(ad.parameters(), 5)

    def f(x_, a_, b_):
        torch.manual_seed(1234)  # the same dropout mask on every evaluation
        return torch.func.functional_call(net.layer, {"adapters.default.lora_A": a_, "adapters.default.lora_B": b_},
                                          (x_,))

    a = ad.lora_A.detach().clone().requires_grad_(True)
    b = ad.lora_B.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, a, b), fast_mode=kind == "conv2d")
    # dropout really drops in train mode, and is off in eval mode
    with torch.no_grad():
        train_out = f(x, a, b)
        net.eval()
        eval_out = net.layer(x)
        dense = _dense_reference(net.layer, x, net.layer.base.weight + net.layer.delta_weight())
    if dropout:
        assert not torch.allclose(train_out, eval_out)
    else:
        torch.testing.assert_close(train_out, eval_out)
    torch.testing.assert_close(eval_out, dense)


# ---- gradients: activation view == weight view ------------------------------------------------------
def _float_input(x, dtype):
    return x.to(dtype) if x.is_floating_point() else x


@pytest.mark.parametrize("method,kind,seed", CASES)
def test_activation_grads_equal_weight_view_grads(method, kind, seed):
    """The backward of ``forward`` (custom autograd nodes included) is the gradient of the weight view:
    for a random upstream gradient, d/dθ of ``layer(x)`` equals d/dθ of ``functional(x, W0 + ΔW(θ))``
    for every adapter parameter θ, and the input gradients agree (float64, so only real errors show)."""
    layer, x = _make_layer(kind, seed)
    model = Net(layer.double()).eval()
    x = _float_input(x, torch.float64)
    rw.adapt(model, _config(method, layer), seed=seed, **_calibration(method, x))
    adapted = model.layer
    for ad in adapted.adapters.values():
        ad.finish_warmup()
    _perturb(adapted.adapters.parameters(), seed + 100)
    params = [p for p in adapted.adapters.parameters() if p.requires_grad]
    xs = x.clone().requires_grad_(x.is_floating_point())
    out = adapted(xs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    inputs = params + ([xs] if x.is_floating_point() else [])
    got = torch.autograd.grad((out * g).sum(), inputs, allow_unused=True)
    w = adapted.base.weight + adapted.delta_weight()
    ref_out = adapted.view.functional(xs, _to2d(adapted, w))
    want = torch.autograd.grad((ref_out * g).sum(), inputs, allow_unused=True)
    names = [n for n, p in adapted.adapters.named_parameters() if p.requires_grad] + ["input"]
    for name, a, b in zip(names, got, want):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        if a is None:
            continue
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=lambda m, n=name: f"{method}/{kind} {n}: {m}")


# ---- low precision: bf16 weights, autocast, meta device ---------------------------------------------
def _bf16_close(out, ref):
    """Within bfloat16's precision (8 significant bits) of a float32 reference."""
    out, ref = out.float(), ref.float()
    err = (out - ref).abs().max().item()
    assert err <= 0.04 * (ref.abs().max().item() + 1.0), f"max error {err:.3g} vs scale {ref.abs().max().item():.3g}"


@pytest.mark.parametrize("method,kind,seed", [c for c in CASES if c.values[2] == 0])
def test_trains_with_bf16_weights(method, kind, seed):
    """Reliability case A12 (HRA crashed in bf16 / fp16). A bfloat16 model: adapter tensors in bf16, forward matches the weight view at bf16 precision,
    one backward gives finite gradients on every adapter parameter and none on the base.
    Reliability case A11."""
    layer, x = _make_layer(kind, seed)
    model = Net(layer.to(torch.bfloat16))
    x = _float_input(x, torch.bfloat16)
    rw.adapt(model, _config(method, layer), seed=seed, **_calibration(method, x))
    adapted = model.layer
    for ad in adapted.adapters.values():
        ad.finish_warmup()
    _perturb(adapted.adapters.parameters(), seed + 100, std=0.1)
    for name, t in adapted.adapters.state_dict().items():
        assert t.dtype == torch.bfloat16 or not t.is_floating_point(), f"{method}: {name} is {t.dtype}, not bf16"
    model.train()
    out = adapted(x)
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        w = (adapted.base.weight.float() + adapted.delta_weight().float())
        ref = adapted.view.functional(_float_input(x, torch.float32), _to2d(adapted, w), bias=False)
        bias = adapted.base.bias if kind != "embedding" else None
        if bias is not None:
            shape = [1, -1] + [1] * (ref.dim() - 2) if kind.startswith("conv") else [-1]
            ref = ref + bias.float().view(shape)
    _bf16_close(out, ref)
    out.float().square().mean().backward()
    for n, p in adapted.adapters.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), n
    assert adapted.base.weight.grad is None


@pytest.mark.parametrize("method,kind,seed", [c for c in CASES if c.values[2] == 0])
def test_trains_under_autocast(method, kind, seed):
    """float32 weights under ``torch.autocast("cpu", bfloat16)``: the output matches the float32 weight
    view at bf16 precision, gradients are finite and the adapter's parameters stay float32."""
    _, model, x, adapted = _build(method, kind, seed)
    model.train()
    with torch.no_grad():
        ref = adapted(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapted(x)
    _bf16_close(out, ref)
    out.float().square().mean().backward()
    for n, p in adapted.adapters.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all(), n


def _has_dropout(method: str) -> bool:
    """The method's default configuration accepts ``dropout > 0`` (Bone's default mode does not)."""
    cls = rw.get_method(method)
    if "dropout" not in {f.name for f in dataclasses.fields(cls.Config)}:
        return False
    try:
        cls.Config(dropout=0.3)
    except rw.errors.ConfigError:
        return False
    return True


DROPOUT_CASES = [c for c in CASES if c.values[2] == 0 and _has_dropout(c.values[0])]


@pytest.mark.parametrize("method,kind,seed", DROPOUT_CASES)
@pytest.mark.parametrize("precision", ["autocast", "bf16"])
def test_dropout_trains_in_low_precision(method, kind, seed, precision):
    """Adapter dropout in training (its own autograd paths) under autocast and with bf16 weights:
    finite gradients on every adapter parameter, in the parameter's dtype."""
    layer, x = _make_layer(kind, seed)
    if precision == "bf16":
        layer, x = layer.to(torch.bfloat16), _float_input(x, torch.bfloat16)
    model = Net(layer)
    rw.adapt(model, _config(method, layer, dropout=0.3), seed=seed, **_calibration(method, x))
    adapted = model.layer
    _perturb(adapted.adapters.parameters(), seed + 100, std=0.1)
    adapted.train()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        out = adapted(_float_input(x, x.dtype).requires_grad_(x.is_floating_point()))
    out.float().square().mean().backward()
    for n, p in adapted.adapters.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("method,kind,seed", [c for c in CASES if c.values[2] == 0])
def test_adapts_meta_device_model(method, kind, seed):
    """Reliability case A9. ``rw.adapt`` on a model built under ``torch.device("meta")`` (how FSDP and large-model loaders
    build models) creates every adapter tensor on the meta device, with the declared parameter count."""
    layer, x = _make_layer(kind, seed)
    with torch.device("meta"):
        model = Net(copy.deepcopy(layer).to("meta"))
        rw.adapt(model, _config(method, layer), seed=seed, **_calibration(method, x.to("meta")))
    adapted = model.layer
    tensors = dict(adapted.adapters.named_parameters()) | dict(adapted.adapters.named_buffers())
    assert tensors, method
    for name, t in tensors.items():
        assert t.device.type == "meta", f"{method}: {name} was created on {t.device}"
    cls = rw.get_method(method)
    assert rw.parameter_count(model).trainable == cls.num_params(adapted.view, adapted.adapters["default"].config)


# ---- the contract is checked when a method registers -------------------------------------------------
def test_register_checks_the_contract():
    """``@register`` refuses a class that is not a Method, lacks a view, declares an unknown layer
    kind, or implements half of an optional capability — naming the class and what is missing."""
    import inspect
    from dataclasses import dataclass

    from rankwise.core.config import AdapterConfig
    from rankwise.core.method import Method
    from rankwise.core.registry import _REGISTRY, register

    @dataclass
    class Cfg(AdapterConfig):
        pass

    def make(**attrs):
        body = {"Config": Cfg, "summary": "test", "__doc__": "ΔW = 0.",
                "forward": lambda self, x, b: b, "delta_weight": lambda self: None,
                "num_params": classmethod(lambda cls, v, c: 0), **attrs}
        return type("Probe", (Method,), body)

    cases = [
        (type("Plain", (torch.nn.Module,), {}), "subclass rankwise.core.method.Method"),
        (make(delta_weight=Method.delta_weight), "implement 'delta_weight'"),
        (make(num_params=inspect.getattr_static(Method, "num_params")), "implement 'num_params'"),
        (make(kinds=("linear", "conv3d")), "kinds="),
        (make(summary=""), "summary"),
        (make(calibration_needs=("activations",)), "calibration_needs="),
        (make(peft_type="LORA"), "lacks"),
        (make(peft_type="LORA", to_peft_config=classmethod(lambda c, cfg, v: {}),
              peft_tensors=lambda self: {}, peft_accepts=classmethod(lambda c, p: True)), "PEFT import needs"),
    ]
    for cls, words in cases:
        with pytest.raises(TypeError, match=words) as err:
            register("probe_contract")(cls)
        assert "probe_contract" in str(err.value)
    assert "probe_contract" not in _REGISTRY
    ok = make()
    try:
        assert register("probe_contract")(ok) is ok and ok.name == "probe_contract"
        assert ok.kinds == rw.core.layers.KINDS and ok.merge_atol == 1e-5 and ok.identity_at_init
    finally:
        _REGISTRY.pop("probe_contract", None)
