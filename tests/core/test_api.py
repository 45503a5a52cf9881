"""The public API: named adapters, set_active, delete, unadapt, summary, target forms,
modules_to_save, trainable_parameters, and atomic writes."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core.adapted import AdaptedLayer, TrainedCopies
from rankwise.core.api import adapter_state, saved_module

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("single_thread")


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _adapted(model) -> dict[str, AdaptedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _dense_model(base, model, names=None):
    """A copy of ``base`` whose adapted weights are ``W0 + Σ delta_weight`` of ``names`` (default: active)."""
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for n, layer in _adapted(model).items():
            on_layer = None if names is None else [a for a in names if a in layer.adapters]
            dense.get_submodule(n).weight.add_(layer.delta_weight(on_layer))
    return dense


@pytest.fixture
def two_adapters(bert, perturb, adapter_params_of):
    """(base, model) with adapters 'a' on query/value and 'b' on query/key, both non-zero."""
    base = bert()
    model = copy.deepcopy(base)
    rw.adapt(model, "lora", rank=2, alpha=4.0, targets=["query", "value"], name="a", seed=0)
    rw.adapt(model, rw.LoraConfig(rank=3, targets=["query", "key"]), name="b", seed=1)
    perturb(adapter_params_of(model, "a"), seed=1)
    perturb(adapter_params_of(model, "b"), seed=2)
    return base, model


# ---- several adapters, set_active ----------------------------------------------------------------
def test_several_adapters_per_layer(two_adapters):
    _, model = two_adapters
    layers = _adapted(model)
    q = "bert.encoder.layer.0.attention.self.query"
    assert list(layers[q].adapters) == ["a", "b"]
    assert list(layers[q.replace("query", "value")].adapters) == ["a"]
    assert list(layers[q.replace("query", "key")].adapters) == ["b"]
    assert len(layers) == 6
    assert rw.active_adapters(model) == ["b"]  # the newest adapter becomes the active one
    # AdaptedLayer still looks like the layer it wraps
    assert layers[q].in_features == 32 and layers[q].weight is layers[q].base.weight


def test_set_active(two_adapters, token_batch):
    base, model = two_adapters
    ref = _logits(base, token_batch)

    rw.set_active(model, None)
    assert rw.active_adapters(model) == []
    assert torch.equal(_logits(model, token_batch), ref), "no active adapter must give the base output exactly"

    for names in ("a", "b", ["a", "b"], ["b", "a"]):
        rw.set_active(model, names)
        expect = _logits(_dense_model(base, model), token_batch)
        got = _logits(model, token_batch)
        assert (got - expect).abs().max() <= ATOL, names
        assert (got - ref).abs().max() > 1e-3

    # two active adapters: the update is the sum of both
    rw.set_active(model, ["a", "b"])
    both = _dense_model(base, model, ["a", "b"])
    only_a, only_b = _dense_model(base, model, ["a"]), _dense_model(base, model, ["b"])
    for n in _adapted(model):
        w0 = base.get_submodule(n).weight
        torch.testing.assert_close(both.get_submodule(n).weight - w0,
                                   (only_a.get_submodule(n).weight - w0) + (only_b.get_submodule(n).weight - w0))


def test_set_active_after_merge_restores_base(two_adapters, token_batch):
    """Deactivating a merged adapter takes it out of the weights too."""
    base, model = two_adapters
    rw.set_active(model, ["a", "b"])
    merged_out = _logits(model, token_batch)
    rw.merge(model)
    assert (_logits(model, token_batch) - merged_out).abs().max() <= ATOL
    rw.set_active(model, None)
    assert (_logits(model, token_batch) - _logits(base, token_batch)).abs().max() <= ATOL
    for n, layer in _adapted(model).items():
        assert layer.merged == []
        torch.testing.assert_close(layer.base.weight, base.get_submodule(n).weight, atol=1e-5, rtol=0)
    rw.set_active(model, "a")
    assert (_logits(model, token_batch) - _logits(_dense_model(base, model, ["a"]), token_batch)).abs().max() <= ATOL


def test_merge_by_name(two_adapters, token_batch):
    base, model = two_adapters
    rw.set_active(model, ["a", "b"])
    out = _logits(model, token_batch)
    rw.merge(model, ["a"])
    q = _adapted(model)["bert.encoder.layer.0.attention.self.query"]
    assert q.merged == ["a"]
    assert (_logits(model, token_batch) - out).abs().max() <= ATOL
    rows = {(r["module"], r["adapter"]): r["state"] for r in rw.summary(model)}
    assert rows[("bert.encoder.layer.0.attention.self.query", "a")] == "merged"
    assert rows[("bert.encoder.layer.0.attention.self.query", "b")] == "active"
    rw.unmerge(model)
    assert q.merged == []
    assert (_logits(model, token_batch) - out).abs().max() <= ATOL


# ---- delete, unadapt ------------------------------------------------------------------------------
def test_delete(two_adapters, token_batch):
    """Reliability case A22."""
    base, model = two_adapters
    rw.set_active(model, ["a", "b"])
    rw.delete(model, "a")
    assert "a" not in adapter_state(model)
    assert rw.active_adapters(model) == ["b"]
    value = model.get_submodule("bert.encoder.layer.0.attention.self.value")
    assert type(value) is nn.Linear, "a layer left without adapters gets its plain module back"
    assert set(_adapted(model)) == {f"bert.encoder.layer.{i}.attention.self.{k}" for i in (0, 1)
                                    for k in ("query", "key")}
    assert (_logits(model, token_batch) - _logits(_dense_model(base, model), token_batch)).abs().max() <= ATOL
    rw.merge(model)  # deleting a merged adapter unmerges it first
    rw.delete(model, "b")
    assert _adapted(model) == {} and adapter_state(model) == {}
    out = _logits(model, token_batch)
    assert (out - _logits(base, token_batch)).abs().max() <= ATOL
    for n, p in model.state_dict().items():
        torch.testing.assert_close(p, base.state_dict()[n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("merge", [True, False])
def test_unadapt(two_adapters, token_batch, merge):
    base, model = two_adapters
    rw.set_active(model, ["a", "b"])
    adapted_out = _logits(model, token_batch)
    dense = _dense_model(base, model)
    plain = rw.unadapt(model, merge=merge)
    assert plain is model
    assert _adapted(plain) == {} and adapter_state(plain) == {}
    assert not any("adapters" in k or "lora" in k for k in plain.state_dict())
    assert set(plain.state_dict()) == set(base.state_dict())
    assert type(plain.get_submodule("bert.encoder.layer.0.attention.self.query")) is nn.Linear
    assert all(p.requires_grad for p in plain.parameters())
    ref = dense if merge else base
    for n, p in plain.state_dict().items():
        torch.testing.assert_close(p, ref.state_dict()[n], atol=1e-6, rtol=0, msg=n)
    if merge:
        assert (_logits(plain, token_batch) - adapted_out).abs().max() <= ATOL
    else:
        assert torch.equal(_logits(plain, token_batch), _logits(base, token_batch))


def test_unadapt_after_merge_without_merge(two_adapters):
    base, model = two_adapters
    rw.merge(model)
    plain = rw.unadapt(model, merge=False)
    for n, p in plain.state_dict().items():
        torch.testing.assert_close(p, base.state_dict()[n], atol=1e-5, rtol=0, msg=n)


# ---- summary ----------------------------------------------------------------------------------
def test_summary(two_adapters):
    _, model = two_adapters
    rows = rw.summary(model)
    assert len(rows) == 8  # 2 layers × (query: a, b; value: a; key: b)
    q = [r for r in rows if r["module"] == "bert.encoder.layer.0.attention.self.query"]
    assert [(r["adapter"], r["rank"], r["state"]) for r in q] == [("a", 2, "off"), ("b", 3, "active")]
    for r in rows:
        assert set(r) == set(rows.columns)
        assert r["kind"] == "linear" and r["shape"] == "32x32" and r["method"] == "lora"
        assert r["params"] == r["rank"] * (32 + 32)
    # only the active adapter trains; the inactive one's rows still count what it trains when active
    assert sum(r["params"] for r in rows if r["adapter"] == "b") == rw.parameter_count(model).trainable
    text = str(rows)
    assert "module" in text and "8 adapted modules" in text and f"{sum(r['params'] for r in rows):,}" in text


# ---- targets ------------------------------------------------------------------------------------
def _targets(model):
    return sorted(adapter_state(model)["default"]["modules"])


def test_all_linear_bert_excludes_classifier(bert):
    model = rw.adapt(bert(), "lora", rank=2, targets="all-linear")
    names = _targets(model)
    assert "classifier" not in names
    linears = sorted(n for n, m in bert().named_modules() if isinstance(m, nn.Linear) and n != "classifier")
    assert names == linears and "bert.pooler.dense" in names
    assert len(names) == 2 * 6 + 1


def test_all_linear_gpt2_excludes_lm_head(gpt2):
    model = rw.adapt(gpt2(), "lora", rank=2)  # "all-linear" is the default
    names = _targets(model)
    assert "lm_head" not in names
    assert names == sorted(f"transformer.h.{i}.{m}" for i in (0, 1)
                           for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert {layer.view.kind for layer in _adapted(model).values()} == {"hf_conv1d"}


def test_all_linear_plain_module_excludes_last_layer():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    rw.adapt(model, "lora", rank=2)
    assert _targets(model) == ["0", "2"]


def test_suffix_targets(bert):
    model = rw.adapt(bert(), "lora", rank=2, targets=["query", "attention.output.dense"])
    assert _targets(model) == sorted(f"bert.encoder.layer.{i}.attention.{k}" for i in (0, 1)
                                     for k in ("self.query", "output.dense"))


def test_regex_targets_gpt2(gpt2):
    model = rw.adapt(gpt2(), "lora", rank=2, targets=r".*attn.*")
    assert _targets(model) == sorted(f"transformer.h.{i}.attn.{m}" for i in (0, 1) for m in ("c_attn", "c_proj"))


@pytest.mark.parametrize("exclude", [["pooler.dense", "layer.1.output.dense"],
                                     r"bert\.pooler\.dense|.*layer\.1\.output\.dense"])
def test_exclude(bert, exclude):
    model = rw.adapt(bert(), "lora", rank=2, targets="all-linear", exclude=exclude)
    names = _targets(model)
    assert "bert.pooler.dense" not in names and "bert.encoder.layer.1.output.dense" not in names
    assert "bert.encoder.layer.0.output.dense" in names and len(names) == 11


def test_embedding_target(gpt2, token_batch, perturb, adapter_params_of):
    base = gpt2()
    model = rw.adapt(copy.deepcopy(base), "lora", rank=2, targets=["wte"])
    assert _adapted(model)["transformer.wte"].view.kind == "embedding"
    assert torch.equal(_logits(model, token_batch), _logits(base, token_batch))
    perturb(adapter_params_of(model), seed=4)
    out = _logits(model, token_batch)
    assert not torch.allclose(out, _logits(base, token_batch))
    assert model.lm_head.weight is model.transformer.wte.base.weight  # the tie survives wrapping


# ---- modules_to_save, trainable_parameters --------------------------------------------------------
def test_modules_to_save_trains_and_saves_head(bert, token_batch, tmp_path):
    base = bert()
    model = copy.deepcopy(base)
    rw.adapt(model, "lora", rank=2, targets=["query", "value"], modules_to_save=["classifier"], seed=0)
    lora = 4 * 2 * (32 + 32)
    head = 3 * 32 + 3
    assert rw.parameter_count(model).trainable == lora + head
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.copies.default.weight", "classifier.copies.default.bias"} <= trainable
    assert all("lora_" in n or n.startswith("classifier.copies.default.") for n in trainable)
    assert isinstance(model.classifier, TrainedCopies) and model.classifier.active == "default"

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    labels = torch.tensor([0, 2])
    model.train()
    for _ in range(3):
        loss = model(**token_batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    head_copy = saved_module(model, "classifier", "default")
    assert not torch.equal(head_copy.weight, base.classifier.weight), "the head trains"
    assert not torch.equal(head_copy.bias, base.classifier.bias), "the head trains"
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert {"classifier.original.weight", "classifier.original.bias"} <= set(frozen)
    for n, p in frozen.items():  # the original head among them: unchanged
        assert torch.equal(p, base.get_parameter(re.sub(r"\.(?:base|original)\.", ".", n))), f"{n} changed"

    rw.save(model, tmp_path / "ad")
    fresh = rw.load(copy.deepcopy(base), tmp_path / "ad", trainable=True)  # to continue training
    fresh_copy = saved_module(fresh, "classifier", "default")
    assert torch.equal(fresh_copy.weight, head_copy.weight) and torch.equal(fresh_copy.bias, head_copy.bias)
    assert torch.equal(fresh.classifier.original.weight, base.classifier.weight)
    assert torch.equal(_logits(fresh, token_batch), _logits(model, token_batch))
    assert fresh_copy.weight.requires_grad and not fresh.classifier.original.weight.requires_grad
    assert rw.parameter_count(fresh).trainable == lora + head


def test_second_adapter_keeps_first_heads_trainable(bert):
    """Adding "b" makes it the only active adapter, so "a" (and its head) is frozen as PEFT's
    set_adapter does; made active again, "a" and its head train again (not frozen like the base)."""
    model = rw.adapt(bert(), "lora", rank=2, targets=["query"], modules_to_save=["classifier"], name="a")
    rw.adapt(model, "lora", rank=2, targets=["value"], name="b")
    a_params = lambda: [*saved_module(model, "classifier", "a").parameters(),  # noqa: E731
                        *model.get_submodule("bert.encoder.layer.0.attention.self.query").adapters["a"].parameters()]
    assert not any(p.requires_grad for p in a_params())
    rw.set_active(model, "a")
    assert all(p.requires_grad for p in a_params())
    assert not model.classifier.original.weight.requires_grad
    assert list(model.classifier.copies) == ["a"]  # "b" trains no head of its own
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad


# ---- modules_to_save: one trained copy of the head per adapter --------------------------------------
@pytest.fixture
def two_heads(bert, perturb, adapter_params_of):
    """(base, model): adapters 'a' (query/value) and 'b' (query/key), each with its own classifier
    copy; adapters and both copies perturbed, so every adapter and head changes the output."""
    base = bert()
    model = copy.deepcopy(base)
    rw.adapt(model, "lora", rank=2, targets=["query", "value"], modules_to_save=["classifier"], name="a", seed=0)
    rw.adapt(model, "lora", rank=3, targets=["query", "key"], modules_to_save=["classifier"], name="b", seed=1)
    perturb(adapter_params_of(model, "a"), seed=1)
    perturb(adapter_params_of(model, "b"), seed=2)
    perturb(saved_module(model, "classifier", "a").parameters(), seed=3)
    perturb(saved_module(model, "classifier", "b").parameters(), seed=4)
    return base, model


def _reference(base, model, names, head):
    """``_dense_model`` of ``names`` with the classifier replaced by a copy of ``head`` (None: base's)."""
    ref = _dense_model(base, model, names)
    if head is not None:
        ref.classifier = copy.deepcopy(saved_module(model, "classifier", head))
    return ref


def _clone_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_state(module, state) -> bool:
    own = module.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k], state[k]) for k in own)


def test_each_adapter_trains_its_own_head(bert, token_batch, adapter_params_of):
    base = bert()
    model = copy.deepcopy(base)
    rw.adapt(model, "lora", rank=2, targets=["query", "value"], modules_to_save=["classifier"], name="a", seed=0)
    rw.adapt(model, "lora", rank=2, targets=["query", "key"], modules_to_save=["classifier"], name="b", seed=1)
    assert isinstance(model.classifier, TrainedCopies) and list(model.classifier.copies) == ["a", "b"]
    head_a, head_b = saved_module(model, "classifier", "a"), saved_module(model, "classifier", "b")
    assert head_a is not head_b and head_a.weight is not head_b.weight
    assert _same_state(head_a, _clone_state(base.classifier)) and _same_state(head_b, _clone_state(base.classifier))
    lora, head = 2 * 2 * 2 * (32 + 32), 3 * 32 + 3
    assert rw.parameter_count(model).trainable == lora + head  # only the active adapter ("b") trains
    rw.set_active(model, ["a", "b"])
    assert rw.parameter_count(model).trainable == lora + lora + head + head
    original = _clone_state(base.classifier)
    labels = torch.tensor([0, 2])

    def train(name, steps=3):
        rw.set_active(model, name)
        model.zero_grad(set_to_none=True)  # the other adapter is frozen now: its last .grad would stay
        assert model.classifier.current() is saved_module(model, "classifier", name)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model.train()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            model(**token_batch, labels=labels).loss.backward()
            opt.step()
        model.eval()

    for trained, other in (("a", "b"), ("b", "a")):
        other_head = _clone_state(saved_module(model, "classifier", other))
        other_lora = [p.detach().clone() for p in adapter_params_of(model, other)]
        trained_head = _clone_state(saved_module(model, "classifier", trained))
        train(trained)
        assert not _same_state(saved_module(model, "classifier", trained), trained_head), f"{trained}'s head trains"
        assert _same_state(saved_module(model, "classifier", other), other_head), f"{other}'s head must not change"
        assert all(p.grad is None for p in saved_module(model, "classifier", other).parameters())
        assert all(torch.equal(p, q) for p, q in zip(adapter_params_of(model, other), other_lora))
        assert _same_state(model.classifier.original, original), "the original head stays frozen"
        assert all(not p.requires_grad for p in model.classifier.original.parameters())
    # each adapter runs with its own head
    for name in ("a", "b"):
        rw.set_active(model, name)
        ref = _logits(_reference(base, model, [name], name), token_batch)
        assert (_logits(model, token_batch) - ref).abs().max() <= ATOL, name


def test_set_active_none_gives_base_output_with_heads(two_heads, token_batch, perturb, adapter_params_of):
    base, model = two_heads
    rw.adapt(model, "lora", rank=2, targets=["value"], name="c", seed=2)  # no head of its own
    perturb(adapter_params_of(model, "c"), seed=5)
    ref = _logits(base, token_batch)
    rw.set_active(model, None)
    assert model.classifier.current() is model.classifier.original
    assert torch.equal(_logits(model, token_batch), ref), "no active adapter must give the base output exactly"
    # which head runs: the first active adapter that has one, else the original
    for names, head in (("a", "a"), ("b", "b"), (["a", "b"], "a"), (["b", "a"], "b"), ("c", None),
                        (["c", "b"], "b"), (["c", "a", "b"], "a")):
        rw.set_active(model, names)
        assert model.classifier.active == head, names
        expect = _logits(_reference(base, model, None, head), token_batch)
        got = _logits(model, token_batch)
        assert (got - expect).abs().max() <= ATOL, names
        assert (got - ref).abs().max() > 1e-3, names
    rw.set_active(model, None)
    assert torch.equal(_logits(model, token_batch), ref)


def test_merge_by_name_activates_its_head(two_heads, token_batch):
    base, model = two_heads
    rw.adapt(model, "lora", rank=2, targets=["value"], name="c", seed=2)  # active, no head
    assert model.classifier.active is None
    rw.merge(model, "a")  # "a" becomes active (after "c"): its head runs
    assert sorted(rw.active_adapters(model)) == ["a", "c"] and model.classifier.active == "a"
    expect = _logits(_reference(base, model, ["c", "a"], "a"), token_batch)
    assert (_logits(model, token_batch) - expect).abs().max() <= ATOL
    rw.merge(model, "b")  # "a" came first and keeps the head
    assert model.classifier.active == "a"
    rw.set_active(model, "c")
    assert model.classifier.active is None


def test_delete_restores_original_head(two_heads, token_batch):
    base, model = two_heads
    original = model.classifier.original
    rw.set_active(model, ["a", "b"])
    rw.delete(model, "a")
    assert isinstance(model.classifier, TrainedCopies) and list(model.classifier.copies) == ["b"]
    assert rw.active_adapters(model) == ["b"]
    assert model.classifier.active == "b", "the remaining active adapter's head takes over"
    expect = _logits(_reference(base, model, ["b"], "b"), token_batch)
    assert (_logits(model, token_batch) - expect).abs().max() <= ATOL
    rw.delete(model, "b")
    assert model.classifier is original and type(model.classifier) is nn.Linear
    assert _adapted(model) == {} and adapter_state(model) == {}
    assert not any(isinstance(m, TrainedCopies) for m in model.modules())
    assert set(model.state_dict()) == set(base.state_dict())
    for n, p in model.state_dict().items():
        assert torch.equal(p, base.state_dict()[n]), n
    assert torch.equal(_logits(model, token_batch), _logits(base, token_batch))


def test_delete_inactive_adapter_keeps_active_head(two_heads, token_batch):
    base, model = two_heads
    rw.set_active(model, "b")
    out = _logits(model, token_batch)
    rw.delete(model, "a")
    assert model.classifier.active == "b"
    assert torch.equal(_logits(model, token_batch), out)


@pytest.mark.parametrize("merge", [True, False])
def test_unadapt_with_heads(two_heads, token_batch, merge):
    base, model = two_heads
    rw.set_active(model, ["b", "a"])  # b's head runs
    out = _logits(model, token_batch)
    head_b = saved_module(model, "classifier", "b")
    trained = _clone_state(head_b)
    dense = _dense_model(base, model)
    plain = rw.unadapt(model, merge=merge)
    assert type(plain.classifier) is nn.Linear
    assert not any(isinstance(m, (AdaptedLayer, TrainedCopies)) for m in plain.modules())
    assert set(plain.state_dict()) == set(base.state_dict())
    assert all(p.requires_grad for p in plain.parameters())
    if merge:
        assert plain.classifier is head_b and _same_state(plain.classifier, trained)
        assert (_logits(plain, token_batch) - out).abs().max() <= ATOL
        for n, p in plain.state_dict().items():
            if not n.startswith("classifier."):
                torch.testing.assert_close(p, dense.state_dict()[n], atol=1e-6, rtol=0, msg=n)
    else:
        for n, p in plain.state_dict().items():
            assert torch.equal(p, base.state_dict()[n]), n
        assert torch.equal(_logits(plain, token_batch), _logits(base, token_batch))


def test_unadapt_merge_without_active_head_keeps_original(two_heads, token_batch):
    base, model = two_heads
    rw.set_active(model, None)
    plain = rw.unadapt(model, merge=True)
    assert type(plain.classifier) is nn.Linear
    assert _same_state(plain.classifier, _clone_state(base.classifier))


def test_save_load_two_adapters_with_heads(two_heads, token_batch, tmp_path):
    base, model = two_heads
    rw.save(model, tmp_path / "ad")
    fresh = rw.load(copy.deepcopy(base), tmp_path / "ad", trainable=True)
    assert sorted(adapter_state(fresh)) == ["a", "b"]
    assert isinstance(fresh.classifier, TrainedCopies) and list(fresh.classifier.copies) == ["a", "b"]
    for name in ("a", "b"):
        assert _same_state(saved_module(fresh, "classifier", name),
                           _clone_state(saved_module(model, "classifier", name))), name
        assert all(p.requires_grad for p in saved_module(fresh, "classifier", name).parameters())
    assert _same_state(fresh.classifier.original, _clone_state(base.classifier))
    assert not any(p.requires_grad for p in fresh.classifier.original.parameters())
    rw.set_active(model, ["a", "b"])  # rw.load made both active (and trainable=True: both train)
    assert rw.parameter_count(fresh).trainable == rw.parameter_count(model).trainable
    outs = {}
    for names in ("a", "b", ["a", "b"], ["b", "a"], None):
        rw.set_active(model, names)
        rw.set_active(fresh, names)
        assert fresh.classifier.active == model.classifier.active
        outs[str(names)] = _logits(model, token_batch)
        assert torch.equal(_logits(fresh, token_batch), outs[str(names)]), names
    assert not torch.allclose(outs["a"], outs["b"], atol=1e-3)
    only_b = rw.load(copy.deepcopy(base), tmp_path / "ad", names="b")
    assert list(only_b.classifier.copies) == ["b"]
    assert torch.equal(_logits(only_b, token_batch), outs["b"])
    # loading onto a model that already has an adapter with a head adds a copy beside it
    rw.delete(fresh, "b")
    rw.load(fresh, tmp_path / "ad", names="b")
    assert list(fresh.classifier.copies) == ["a", "b"]
    assert torch.equal(_logits(fresh, token_batch), outs["b"])
    rw.set_active(fresh, "a")
    assert torch.equal(_logits(fresh, token_batch), outs["a"])


def test_all_linear_skips_modules_in_trained_copies(bert):
    model = rw.adapt(bert(), "lora", rank=2, targets=["query"], modules_to_save=["classifier", "pooler"], name="a")
    assert isinstance(model.bert.pooler, TrainedCopies)
    rw.adapt(model, "lora", rank=2, targets="all-linear", name="b")
    names = sorted(adapter_state(model)["b"]["modules"])
    assert names == sorted(n for n, m in bert().named_modules() if isinstance(m, nn.Linear)
                           and n not in ("classifier", "bert.pooler.dense"))
    for n, _ in model.named_modules():
        if ".original" in n or ".copies" in n:
            assert not isinstance(model.get_submodule(n), AdaptedLayer), n
    assert not any(".original." in n or ".copies." in n for n in _adapted(model))
    # the copies hold plain layers, and adapter b trains no head
    assert type(saved_module(model, "bert.pooler", "a").dense) is nn.Linear
    assert list(model.bert.pooler.copies) == ["a"] and list(model.classifier.copies) == ["a"]
    # a regex or suffix target does not reach inside either
    with pytest.raises(rw.errors.TargetError):
        rw.adapt(model, "lora", rank=2, targets=r".*pooler\..*", name="c")
    assert "c" not in adapter_state(model)


def test_all_linear_plain_module_still_excludes_saved_last_layer():
    """all-linear leaves out a plain model's last layer whether or not another adapter trains it."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    rw.adapt(model, "lora", rank=2, targets=["0"], modules_to_save=["4"], name="a")
    rw.adapt(model, "lora", rank=2, name="b")
    assert sorted(adapter_state(model)["b"]["modules"]) == ["0", "2"]
    assert isinstance(model[4], TrainedCopies) and list(model[4].copies) == ["a"]


def test_trainable_parameters_counts_shared_once():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, lin)
    assert rw.parameter_count(model).trainable == 20
    rw.adapt(model, "lora", rank=2, targets=["0"])
    assert rw.parameter_count(model).trainable == 2 * (4 + 4)


def test_save_load_several_adapters(two_adapters, bert, token_batch, tmp_path):
    base, model = two_adapters
    rw.set_active(model, ["a", "b"])
    rw.save(model, tmp_path / "ad")
    fresh = rw.load(copy.deepcopy(base), tmp_path / "ad", trainable=True)
    assert sorted(adapter_state(fresh)) == ["a", "b"]
    assert rw.active_adapters(fresh) == ["a", "b"]
    assert torch.equal(_logits(fresh, token_batch), _logits(model, token_batch))
    only_b = rw.load(copy.deepcopy(base), tmp_path / "ad", names="b")
    rw.set_active(model, "b")
    assert torch.equal(_logits(only_b, token_batch), _logits(model, token_batch))
    # the saved config is the user's, not the internal exact-match regex
    assert adapter_state(fresh)["a"]["config"].targets == ["query", "value"]


# ---- atomic writes -------------------------------------------------------------------------------
def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_save_over_existing_dir_replaces_it(bert, tmp_path, token_batch, perturb, adapter_params_of):
    """Reliability case W11."""
    base = bert()
    m1 = rw.adapt(copy.deepcopy(base), "lora", rank=2, targets=["query"], name="first")
    m2 = rw.adapt(copy.deepcopy(base), "lora", rank=2, targets=["value"], name="second")
    perturb(adapter_params_of(m2), seed=3)
    out = tmp_path / "ad"
    rw.save(m1, out)
    rw.save(m2, out)  # a folder holding the user's own files is refused instead: tests/io/test_atomic.py
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = rw.load(copy.deepcopy(base), out)
    assert list(adapter_state(fresh)) == ["second"]
    assert torch.equal(_logits(fresh, token_batch), _logits(m2, token_batch))
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["safetensors", "json"])
@pytest.mark.parametrize("writer", ["save", "export_peft"])
def test_failed_save_leaves_old_dir_intact(bert, tmp_path, monkeypatch, where, writer):
    """Reliability case DF1."""
    import safetensors.torch

    import rankwise.io.atomic as atomic

    base = bert()
    m1 = rw.adapt(copy.deepcopy(base), "lora", rank=2, targets=["query"])
    m2 = rw.adapt(copy.deepcopy(base), "lora", rank=4, targets=["value"])
    write = getattr(rw, writer)
    out = tmp_path / "ad"
    write(m1, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    if where == "safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", boom)
    else:
        monkeypatch.setattr(atomic.json, "dumps", boom)
    with pytest.raises(OSError, match="disk full"):
        write(m2, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    if writer == "save":
        fresh = rw.load(copy.deepcopy(base), out)
        assert _targets(fresh) == _targets(m1)


def test_failed_first_save_leaves_nothing(bert, tmp_path, monkeypatch):
    import safetensors.torch

    model = rw.adapt(bert(), "lora", rank=2, targets=["query"])
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        rw.save(model, tmp_path / "ad")
    assert list(tmp_path.iterdir()) == []


def test_merge_inactive_adapter_by_name_activates_it(two_adapters, token_batch):
    base, model = two_adapters
    assert rw.active_adapters(model) == ["b"]
    rw.merge(model, "a")
    assert sorted(rw.active_adapters(model)) == ["a", "b"]
    expect = _logits(_dense_model(base, model, ["a", "b"]), token_batch)
    assert (_logits(model, token_batch) - expect).abs().max() <= ATOL
    rw.set_active(model, "b")  # deactivating "a" takes it out of the weights again
    expect = _logits(_dense_model(base, model, ["b"]), token_batch)
    assert (_logits(model, token_batch) - expect).abs().max() <= ATOL


def test_merge_refuses_tied_weights(gpt2, token_batch, perturb, adapter_params_of):
    """GPT-2 ties lm_head to wte: merging an adapter on wte would change lm_head as well."""
    model = rw.adapt(gpt2(), "lora", rank=2, targets=["wte", "c_attn"])
    perturb(adapter_params_of(model), seed=2)
    out = _logits(model, token_batch)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: rw.merge(model), lambda: rw.unadapt(model, merge=True)):
        with pytest.raises(rw.errors.ConfigError) as e:
            call()
        assert "'transformer.wte'" in str(e.value) and "lm_head" in str(e.value) and "(100, 32)" in str(e.value)
        assert all(layer.merged == [] for layer in _adapted(model).values())
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
        assert torch.equal(_logits(model, token_batch), out)


def test_merge_embedding_untied(bert, token_batch, perturb, adapter_params_of):
    base = bert()
    model = rw.adapt(copy.deepcopy(base), "lora", rank=2, targets=["word_embeddings", "query"])
    perturb(adapter_params_of(model), seed=2)
    out = _logits(model, token_batch)
    rw.merge(model)
    assert (_logits(model, token_batch) - out).abs().max() <= ATOL
    plain = rw.unadapt(model, merge=True)
    assert (_logits(plain, token_batch) - out).abs().max() <= ATOL


def test_config_object_with_overrides(bert):
    model = rw.adapt(bert(), rw.LoraConfig(rank=4, alpha=8.0, targets=["query"]), rank=2, name="x")
    cfg = adapter_state(model)["x"]["config"]
    assert (cfg.rank, cfg.alpha, cfg.targets) == (2, 8.0, ["query"])
    assert _adapted(model)["bert.encoder.layer.0.attention.self.query"].adapters["x"].lora_A.shape == (2, 32)


def test_config_override_keeps_default_alpha(bert):
    model = rw.adapt(bert(), rw.LoraConfig(rank=4, targets=["query"]), rank=8)
    cfg = adapter_state(model)["default"]["config"]
    assert cfg.rank == 8 and cfg.scale == 1.0  # the default alpha is the rank: s = 1


def test_saved_files_follow_umask(bert, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        rw.save(rw.adapt(bert(), "lora", rank=2, targets=["query"]), tmp_path / "ad")
    finally:
        os.umask(old)
    assert (tmp_path / "ad").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "ad" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644


def test_training_through_a_merged_adapter_is_refused():
    """Reliability case A21: backward through a merged model raised torch's 'element 0 of tensors
    does not require grad'; the adapter would silently get no gradient."""
    import torch
    from torch import nn

    model = rw.adapt(nn.Sequential(nn.Linear(4, 3)), "lora", rank=2, targets=["0"], seed=0)
    rw.merge(model)
    x = torch.randn(2, 4)
    model.eval()
    model(x)  # inference is fine
    with torch.no_grad():
        model.train()(x)
    with pytest.raises(rw.errors.ConfigError, match=r"module '0'.*merged.*rw\.unmerge\(model\) before training"):
        model.train()(x)
    rw.unmerge(model)
    model(x).sum().backward()
    assert model[0].adapters["default"].lora_B.grad is not None


def _two(method="lora"):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    a = rw.adapt(copy.deepcopy(base), method, rank=2, targets=["0"], seed=0)
    b = rw.adapt(copy.deepcopy(base), method, rank=2, targets=["0"], seed=1)
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(0.3)  # a non-zero ΔW
    return a, b


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_state_dict_records_the_merge_state(method):
    """Reliability case A18: a merged model's state_dict loaded into an unmerged one applied ΔW twice."""
    x = torch.randn(5, 8)
    a, b = _two(method)
    a.eval(), b.eval()
    want = a(x)
    assert not any("rankwise_merged" in k for k in a.state_dict())  # nothing new for unmerged models
    rw.merge(a)
    merged_state = a.state_dict()
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(rw.errors.ConfigError, match=r"module '0'.*\['default'\] merged.*has none merged.*twice.*rw.merge"):
        b.load_state_dict(merged_state)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in before.items())  # unchanged

    rw.merge(b)  # the same merge state: loads, and unmerging gives a's adapted model back
    b.load_state_dict(merged_state)
    torch.testing.assert_close(b(x), want, rtol=1e-5, atol=1e-6)
    rw.unmerge(b)
    rw.unmerge(a)
    torch.testing.assert_close(b[0].base.weight, a[0].base.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(b(x), want, rtol=1e-5, atol=1e-6)

    rw.merge(b)
    with pytest.raises(rw.errors.ConfigError, match=r"taken with adapter\(s\) none merged.*not at all"):
        b.load_state_dict(a.state_dict())  # an unmerged state into a merged model
