"""LoTR, and the engine's support for parameters shared between layers (LoTR's factors, Compacter's rules).

Oracles: dense re-derivations of ΔW from the parameters, the paper's parameter-count formulas,
autograd through an independent functional model in which one leaf tensor is used by every layer,
and the authors' LoTRLinear (github.com/daskol/lotr) transcribed."""

from __future__ import annotations

import copy
import gc
import json
import weakref

import pytest
import torch
from _factored_helpers import _layers, _logits, _perturb, _unique_adapter_params
from safetensors import safe_open
from torch import nn

import rankwise as rw
from rankwise.core.adapted import AdaptedLayer
from rankwise.core.api import adapter_state
from rankwise.errors import ConfigError, ShapeMismatchError

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- engine: parameters shared between layers ------------------------------------------------
SHARING = {
    # method, options, targets
    "lotr": ({"rank": 3}, ["query", "value"]),
    "compacter": ({"phm_dim": 4, "phm_rank": 2}, "all-linear"),
}


def _shared_model(bert, method):
    opts, targets = SHARING[method]
    base = bert()
    model = copy.deepcopy(base)
    rw.adapt(model, method, targets=targets, seed=3, **opts)
    _perturb(_unique_adapter_params(model), seed=5)
    return base, model


def _shared_tensors(layer: AdaptedLayer, name="default"):
    ad = layer.adapters[name]
    return ad.factors if hasattr(ad, "factors") else ad.rules


@pytest.mark.parametrize("method", sorted(SHARING))
def test_shared_parameters_are_one_object_counted_once(bert, method):
    _, model = _shared_model(bert, method)
    layers = _layers(model)
    entry = adapter_state(model)["default"]
    shared = entry["shared"]
    shared_ids = {id(p) for p in shared.parameters()}
    # every layer's adapter holds parameters of the one shared module, not copies
    for layer in layers.values():
        assert {id(p) for p in _shared_tensors(layer).parameters()} <= shared_ids
    # the model (and so any optimizer built from it) sees each shared tensor once
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len({id(p) for p in params})
    per_layer = sum(p.numel() for layer in layers.values() for p in layer.adapters.parameters()
                    if id(p) not in shared_ids)
    assert rw.parameter_count(model).trainable == per_layer + sum(p.numel() for p in shared.parameters())
    # rw.summary counts a shared tensor in one row only
    assert sum(r["params"] for r in rw.summary(model)) == rw.parameter_count(model).trainable


def test_lotr_param_count_formula_many_layers(bert):
    """LoTR on L layers of G types: G·r(out+in) + L·r² (the paper's saving over LoRA's L·r(out+in))."""
    r = 3
    for share, groups in (("type", {"query": 2, "value": 2}), ("shape", {"all": 4})):
        model = bert()
        rw.adapt(model, "lotr", rank=r, targets=["query", "value"], share=share, seed=0)
        n_groups = len(groups)
        assert len(adapter_state(model)["default"]["shared"]) == n_groups
        assert rw.parameter_count(model).trainable == n_groups * r * (32 + 32) + 4 * r * r
    # all-linear on BERT: 7 layer types (q, k, v, attention out, intermediate, output, pooler);
    # 3 weight shapes (32x32, 64x32, 32x64)
    model = bert()
    rw.adapt(model, "lotr", rank=r, share="shape", seed=0)
    shapes = {"shape_32x32": (32, 32), "shape_64x32": (64, 32), "shape_32x64": (32, 64)}
    assert set(adapter_state(model)["default"]["shared"]) == set(shapes)
    n_layers = len(_layers(model))
    assert rw.parameter_count(model).trainable == sum(r * (o + i) for o, i in shapes.values()) + n_layers * r * r
    model = bert()
    rw.adapt(model, "lotr", rank=r, seed=0)
    assert len(adapter_state(model)["default"]["shared"]) == 7


def test_shared_gradients_accumulate_from_all_layers(bert, token_batch):
    """The shared factors' gradient equals that of an independent functional model in which one
    leaf tensor U (and V) is used by every layer of the group: the sum over layers."""
    base, model = _shared_model(bert, "lotr")
    model.train()
    base.train()
    model(**token_batch).logits.square().mean().backward()
    layers = _layers(model)
    q_layers = [n for n in layers if n.endswith("query")]
    f = layers[q_layers[0]].adapters["default"].factors
    assert all(layers[n].adapters["default"].factors is f for n in q_layers)

    u = f.lotr_U.detach().clone().requires_grad_(True)
    v = f.lotr_V.detach().clone().requires_grad_(True)
    weights = {}
    for n, layer in layers.items():
        ad = layer.adapters["default"]
        if n in q_layers:
            weights[f"{n}.weight"] = layer.base.weight + ad.scale * u @ ad.lotr_G.detach() @ v
        else:
            weights[f"{n}.weight"] = layer.base.weight + ad.delta_weight().detach()
    out = torch.func.functional_call(base, weights, args=(), kwargs=token_batch)
    gu, gv = torch.autograd.grad(out.logits.square().mean(), (u, v))
    torch.testing.assert_close(f.lotr_U.grad, gu, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(f.lotr_V.grad, gv, atol=1e-6, rtol=1e-5)
    # one SGD step moves a shared tensor once (a duplicate in the optimizer would move it twice)
    before = f.lotr_U.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    torch.testing.assert_close(f.lotr_U.detach(), before - 0.1 * gu, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(SHARING))
def test_shared_saved_once_and_relinked_on_load(bert, token_batch, tmp_path, method):
    base, model = _shared_model(bert, method)
    rw.save(model, tmp_path / "ad")
    shared_sd = adapter_state(model)["default"]["shared"].state_dict()
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
        for k, t in shared_sd.items():
            assert torch.equal(fh.get_tensor(f"default/(shared)/{k}"), t)
    shared_keys = [k for k in keys if k.startswith("default/(shared)/")]
    assert len(shared_keys) == len(shared_sd), "each shared tensor is stored exactly once"
    # the file holds every adapter tensor once: its size is that of the unique tensors
    unique = {id(t): t for layer in _layers(model).values()
              for t in layer.adapters["default"].state_dict(keep_vars=True).values()}
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as fh:
        stored = sum(fh.get_tensor(k).numel() for k in keys)
    assert stored == sum(t.numel() for t in unique.values())

    fresh = copy.deepcopy(base)
    rw.load(fresh, tmp_path / "ad", trainable=True)
    assert torch.equal(_logits(fresh, token_batch), _logits(model, token_batch))
    fresh_shared = adapter_state(fresh)["default"]["shared"]
    ids = {id(p) for p in fresh_shared.parameters()}
    for layer in _layers(fresh).values():  # re-linked: every layer uses the loaded object
        assert {id(p) for p in _shared_tensors(layer).parameters()} <= ids
    for k, t in fresh_shared.state_dict().items():
        assert torch.equal(t, shared_sd[k]), k
    assert rw.parameter_count(fresh).trainable == rw.parameter_count(model).trainable


def test_shared_file_mismatch_is_refused(bert, tmp_path):
    """A file whose shared tensors do not fit (another share grouping) fails with a clear error
    and leaves the model unchanged."""
    base = bert()
    model = copy.deepcopy(base)
    rw.adapt(model, "lotr", rank=2, targets=["query", "value"], share="shape", seed=0)
    rw.save(model, tmp_path / "ad")
    cfg_file = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["adapters"]["default"]["config"]["share"] = "type"
    cfg["weights_sha256"] = None
    cfg_file.write_text(json.dumps(cfg))
    fresh = copy.deepcopy(base)
    with pytest.raises(ShapeMismatchError, match="shared between layers"):
        rw.load(fresh, tmp_path / "ad")
    assert not _layers(fresh) and adapter_state(fresh) == {}


@pytest.mark.parametrize("how", ["delete", "unadapt"])
def test_delete_and_unadapt_release_shared(bert, how):
    _, model = _shared_model(bert, "compacter")
    ref = weakref.ref(adapter_state(model)["default"]["shared"])
    if how == "delete":
        rw.delete(model, "default")
    else:
        rw.unadapt(model)
    gc.collect()
    assert ref() is None, "nothing may keep the shared module alive"
    assert not _layers(model)
    assert not any("rules" in n or "factors" in n for n, _ in model.named_parameters())


def test_two_sharing_adapters_keep_their_own_shared(bert, token_batch, tmp_path):
    base = bert()
    model = copy.deepcopy(base)
    rw.adapt(model, "compacter", targets=["query"], name="a", seed=0)
    rw.adapt(model, "lotr", rank=2, targets=["query", "key"], name="b", seed=1)
    _perturb(_unique_adapter_params(model), seed=2)
    st = adapter_state(model)
    assert st["a"]["shared"] is not st["b"]["shared"]
    rw.set_active(model, ["a", "b"])
    rw.save(model, tmp_path / "ad")
    fresh = copy.deepcopy(base)
    rw.load(fresh, tmp_path / "ad")
    assert torch.equal(_logits(fresh, token_batch), _logits(model, token_batch))


# ---- lotr -----------------------------------------------------------------------------------------
def test_lotr_closed_form_and_init(bert):
    model = bert()
    rw.adapt(model, "lotr", rank=4, alpha=8.0, targets=["query", "value"], seed=0)
    layers = _layers(model)
    for layer in layers.values():
        ad = layer.adapters["default"]
        u, v = ad.factors.lotr_U, ad.factors.lotr_V
        eye = torch.eye(4)
        torch.testing.assert_close(u.t() @ u, eye, atol=1e-5, rtol=0)  # orthonormal columns
        torch.testing.assert_close(v @ v.t(), eye, atol=1e-5, rtol=0)  # orthonormal rows
        assert torch.count_nonzero(ad.lotr_G) == 0
    _perturb(_unique_adapter_params(model), seed=1)
    for layer in layers.values():
        ad = layer.adapters["default"]
        dense = 2.0 * ad.factors.lotr_U @ ad.lotr_G @ ad.factors.lotr_V  # s = α / r = 2
        torch.testing.assert_close(layer.delta_weight(), dense, atol=1e-6, rtol=0)
        assert torch.linalg.matrix_rank(dense) <= 4


def test_lotr_rank_too_large_is_clear(bert):
    with pytest.raises(ConfigError, match="rank ≤ 32"):
        rw.adapt(bert(), "lotr", rank=40, targets=["query"])
    with pytest.raises(ConfigError, match="share"):
        rw.get_method("lotr").Config(share="layer")


def test_lotr_registered_with_docs():
    doc = __import__("rankwise.methods.lotr", fromlist=["_"]).__doc__
    assert "arXiv" in doc and "Parameters" in doc
    cls = rw.get_method("lotr")
    assert cls.summary and cls.default_lr > 0


class _ReferenceLoTRLinear(nn.Module):
    """The authors' ``LoTRLinear`` (github.com/daskol/lotr, ``lotr/lotr.py``), transcribed: factors stored
    transposed (``lhs (r × out)``, ``mid (r × r)``, ``rhs (in × r)``), ``normal_(lhs)``, ``zeros_(mid)``,
    ``normal_(rhs)``, ``self.scale = scale / rank`` and ``linear(x) + scale · ((x @ rhs) @ mid) @ lhs``."""

    def __init__(self, linear: nn.Linear, rank: int, scale: float = 1.0):
        super().__init__()
        self.linear = linear.requires_grad_(False)
        self.scale = scale / rank
        self.lhs = nn.Parameter(torch.empty(rank, linear.out_features))
        self.mid = nn.Parameter(torch.empty(rank, rank))
        self.rhs = nn.Parameter(torch.empty(linear.in_features, rank))
        nn.init.normal_(self.lhs)
        nn.init.zeros_(self.mid)
        nn.init.normal_(self.rhs)

    def forward(self, x):
        return self.linear(x) + self.scale * (((x @ self.rhs) @ self.mid) @ self.lhs)


def test_lotr_normal_init_is_the_authors_lotr_linear():
    """``init='normal', alpha=1`` is the reference's default: N(0, 1) factors, s = 1/r; three SGD steps
    on all factors (the reference trains lhs, mid, rhs) give the reference's outputs and parameters."""
    r = 3
    base = nn.Sequential(nn.Linear(12, 10))
    ours = rw.adapt(copy.deepcopy(base), "lotr", rank=r, alpha=1.0, init="normal", targets=["0"], seed=0)
    ad = ours[0].adapters["default"]
    assert ad.scale == 1.0 / r and torch.count_nonzero(ad.lotr_G) == 0
    ref = _ReferenceLoTRLinear(copy.deepcopy(base[0]), r)
    with torch.no_grad():  # the same random draw: lhs = Uᵀ, rhs = Vᵀ (and ΔW = s U midᵀ V)
        ref.lhs.copy_(ad.factors.lotr_U.t())
        ref.rhs.copy_(ad.factors.lotr_V.t())
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    target = torch.randn(16, 10, generator=torch.Generator().manual_seed(2))
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    opt_ref = torch.optim.SGD([ref.lhs, ref.mid, ref.rhs], lr=0.05)
    for _ in range(3):
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            (model(x) - target).square().mean().backward()
            opt.step()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ad.lotr_G.detach(), ref.mid.detach().t(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ad.factors.lotr_U.detach(), ref.lhs.detach().t(), atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(ad.lotr_G) > 0
    # the reference's factor law: N(0, 1) entries (columns of norm ≈ √dim, not orthonormal)
    big = rw.adapt(nn.Sequential(nn.Linear(256, 192)), "lotr", rank=8, alpha=1.0, init="normal", targets=["0"], seed=0)
    u = big[0].adapters["default"].factors.lotr_U.detach()
    assert abs(u.mean()) < 0.05 and abs(u.std() - 1) < 0.05
    # the default (orthonormal factors, s = 1) is not the reference's: same G, ΔW about √(out·in)/r smaller
    dflt = rw.adapt(nn.Sequential(nn.Linear(256, 192)), "lotr", rank=8, targets=["0"], seed=0)
    for m in (big, dflt):
        with torch.no_grad():
            m[0].adapters["default"].lotr_G.fill_(0.01)
    ratio = big[0].delta_weight().norm() / dflt[0].delta_weight().norm()
    assert 0.5 * (256 * 192) ** 0.5 / 8 < ratio < 2 * (256 * 192) ** 0.5 / 8
