"""Bad input gives clear errors: the right exception class, and a message that names the
module and the shape or value at fault. Failed loads leave the model unchanged."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core import registry
from rankwise.core.adapted import AdaptedLayer, TrainedCopies
from rankwise.core.api import adapter_state
from rankwise.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    ConfigError,
    CorruptFileError,
    MethodNotFoundError,
    RankwiseError,
    ShapeMismatchError,
    TargetError,
    UnsupportedLayerError,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _fingerprint(model):
    """Everything a failed call must not change: module types, tensors, flags, adapter state."""
    return (
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        {k: (list(v["modules"]), list(v["modules_to_save"])) for k, v in adapter_state(model).items()},
        [(n, list(m.active), list(m.merged)) for n, m in model.named_modules() if isinstance(m, AdaptedLayer)],
        [(n, m.active, list(m.copies)) for n, m in model.named_modules() if isinstance(m, TrainedCopies)],
    )


def assert_unchanged(model, before):
    after = _fingerprint(model)
    assert after[0] == before[0], "module structure changed"
    assert after[1].keys() == before[1].keys()
    for k in before[1]:
        assert torch.equal(after[1][k], before[1][k]), f"tensor {k} changed"
    assert after[2:] == before[2:]


def _bert_other(**kw):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               vocab_size=100, max_position_embeddings=64, num_labels=3,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(kw)
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**cfg)).eval()


# ---- targets --------------------------------------------------------------------------------------
def test_unknown_target_suggests_close_names(bert):
    """Reliability case A2."""
    model = bert()
    before = _fingerprint(model)
    with pytest.raises(TargetError) as e:
        rw.adapt(model, "lora", rank=2, targets=["quer"])
    msg = str(e.value)
    assert "'quer'" in msg and "query" in msg and "BertForSequenceClassification" in msg
    assert_unchanged(model, before)


def test_target_matching_nothing(bert):
    """Reliability case A3."""
    with pytest.raises(TargetError, match="selects no adaptable layer"):
        rw.adapt(bert(), "lora", rank=2, targets=r".*nothing_here.*")
    with pytest.raises(TargetError, match="selects no adaptable layer"):
        rw.adapt(bert(), "lora", rank=2, targets=["query"], exclude=["query"])


def test_bad_regex(bert):
    """Reliability case A3."""
    with pytest.raises(TargetError, match=re.escape("'query[('")):
        rw.adapt(bert(), "lora", rank=2, targets="query[(")


@pytest.mark.parametrize("targets", [["LayerNorm"], r".*\.LayerNorm"])
def test_unsupported_layer_norm(bert, targets):
    model = bert()
    before = _fingerprint(model)
    with pytest.raises((UnsupportedLayerError, TargetError)) as e:
        rw.adapt(model, "lora", rank=2, targets=targets)
    msg = str(e.value)
    assert "LayerNorm" in msg and "bert.embeddings.LayerNorm" in msg
    assert "linear" in msg  # says what it can adapt
    assert_unchanged(model, before)


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 4)
        self.fc = nn.Linear(4, 4)


def test_unsupported_lstm():
    model = WithLSTM()
    with pytest.raises(UnsupportedLayerError) as e:
        rw.adapt(model, "lora", rank=2, targets=["rnn"])
    assert "'rnn'" in str(e.value) and "LSTM" in str(e.value)
    assert isinstance(e.value, TypeError) and isinstance(e.value, RankwiseError)
    assert not isinstance(model.rnn, AdaptedLayer) and not isinstance(model.fc, AdaptedLayer)


def test_grouped_conv_fails_at_adapt_time():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(UnsupportedLayerError) as e:
        rw.adapt(model, "lora", rank=1, targets=["0"])
    assert "'0'" in str(e.value) and "groups=2" in str(e.value)
    assert isinstance(model[0], nn.Conv2d)


def test_embedding_with_max_norm():
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(UnsupportedLayerError, match=r"'0'.*max_norm=1.0"):
        rw.adapt(model, "lora", rank=1, targets=["0"])


def test_method_without_a_kind(monkeypatch):
    """A method that declares only linear layers refuses an embedding, naming it."""
    from rankwise.methods.lora import Lora, LoraConfig

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class LinearOnlyConfig(LoraConfig):
        pass

    @registry.register("linear-only-test")
    class LinearOnly(Lora):
        Config = LinearOnlyConfig
        kinds = ("linear",)

    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(UnsupportedLayerError) as e:
        rw.adapt(model, "linear-only-test", rank=1, targets=["0", "1"])
    msg = str(e.value)
    assert "'linear-only-test'" in msg and "'0'" in msg and "Embedding" in msg and "(10, 4)" in msg
    assert isinstance(model[0], nn.Embedding) and isinstance(model[1], nn.Linear)
    assert LoraConfig.method == "lora"
    assert LinearOnlyConfig.method == "linear-only-test"


def test_method_reusing_another_methods_config_is_refused(monkeypatch):
    """Two methods sharing one Config class would both claim it (Config.method): refused, and
    the other method's Config keeps its name."""
    from rankwise.methods.lora import Lora, LoraConfig

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(TypeError, match="reuses the Config class of method 'lora'"):

        @registry.register("shares-lora-config")
        class Shares(Lora):
            Config = LoraConfig
            kinds = ("linear",)

    assert "shares-lora-config" not in registry._REGISTRY
    assert LoraConfig.method == "lora" and rw.get_method("lora") is Lora


# ---- config values ----------------------------------------------------------------------------------
def test_rank_too_large_for_layer():
    """Reliability case A4."""
    model = nn.Sequential(nn.Linear(16, 32))  # weight 32x16
    with pytest.raises(ConfigError) as e:
        rw.adapt(model, "lora", rank=64, targets=["0"])
    msg = str(e.value)
    assert "'0'" in msg and "32x16" in msg and "rank=64" in msg and "16" in msg
    assert isinstance(model[0], nn.Linear) and adapter_state(model) == {}


def test_unknown_option_suggests_close_name(bert):
    """Reliability case A8."""
    with pytest.raises(ConfigError) as e:
        rw.adapt(bert(), "lora", rnk=4)
    assert "'rnk'" in str(e.value) and "rank" in str(e.value)
    # also with a config object plus overrides
    with pytest.raises(ConfigError, match="rnk"):
        rw.adapt(bert(), rw.LoraConfig(rank=2, targets=["query"]), rnk=4)


@pytest.mark.parametrize("field,value", [("rank", 0), ("rank", -3), ("rank", 2.5), ("dropout", 1.5),
                                         ("dropout", -0.1), ("alpha", 0.0), ("init", "xavier")])
def test_invalid_config_values(field, value):
    """Reliability cases A4 and A5."""
    with pytest.raises(ConfigError) as e:
        rw.LoraConfig(**{field: value})
    assert f"{field}={value!r}" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_invalid_targets_value():
    """Reliability case A2."""
    with pytest.raises(ConfigError, match="targets"):
        rw.LoraConfig(targets=[])
    with pytest.raises(ConfigError, match="targets"):
        rw.LoraConfig(targets=3)


def test_unknown_method_suggests_close_names(bert):
    """Reliability case A8."""
    with pytest.raises(MethodNotFoundError) as e:
        rw.adapt(bert(), "lroa", rank=2)
    assert "'lroa'" in str(e.value) and "lora" in str(e.value)
    with pytest.raises(MethodNotFoundError, match=r"Did you mean: [^?]*\blora\b"):
        rw.get_method("Lora")


def test_adapt_rejects_non_module_and_bad_method_type():
    """Reliability case A8."""
    with pytest.raises(TypeError, match="nn.Module"):
        rw.adapt("not a model", "lora")
    with pytest.raises(TypeError, match="method name"):
        rw.adapt(nn.Sequential(nn.Linear(4, 4)), 42)


# ---- adapter names --------------------------------------------------------------------------------
def test_duplicate_adapter_name(bert):
    """Reliability case A1."""
    model = rw.adapt(bert(), "lora", rank=2, targets=["query"], name="task")
    before = _fingerprint(model)
    with pytest.raises(AdapterExistsError) as e:
        rw.adapt(model, "lora", rank=2, targets=["value"], name="task")
    assert "'task'" in str(e.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["", "a.b", "a/b"])
def test_bad_adapter_name(bert, name):
    """Reliability case A8."""
    with pytest.raises(ConfigError, match="adapter name"):
        rw.adapt(bert(), "lora", rank=2, targets=["query"], name=name)


def test_unknown_adapter_name_in_api(bert):
    """Reliability case A23."""
    model = rw.adapt(bert(), "lora", rank=2, targets=["query"], name="task_a")
    for call in (lambda: rw.set_active(model, "task_b"), lambda: rw.delete(model, "task_b"),
                 lambda: rw.merge(model, ["task_b"]), lambda: rw.set_active(model, ["task_a", "task_b"])):
        with pytest.raises(AdapterNotFoundError) as e:
            call()
        assert "'task_b'" in str(e.value) and "task_a" in str(e.value)
    assert rw.active_adapters(model) == ["task_a"]


def test_target_and_modules_to_save_overlap(bert):
    with pytest.raises(ConfigError, match="classifier"):
        rw.adapt(bert(), "lora", rank=2, targets=["classifier"], modules_to_save=["classifier"])
    with pytest.raises(ConfigError, match=r"'bert\.pooler\.dense'.*inside 'bert\.pooler'"):
        rw.adapt(bert(), "lora", rank=2, targets=["dense"], modules_to_save=["pooler"])
    model = rw.adapt(bert(), "lora", rank=2, targets=["pooler.dense"], name="a")
    with pytest.raises(ConfigError, match=r"'bert\.pooler\.dense'"):
        rw.adapt(model, "lora", rank=2, targets=["query"], modules_to_save=["pooler"], name="b")
    with pytest.raises(TargetError, match="'classifer'.*classifier"):
        rw.adapt(bert(), "lora", rank=2, targets=["query"], modules_to_save=["classifer"])


# ---- loading ---------------------------------------------------------------------------------------
@pytest.fixture
def saved(bert, tmp_path):
    """A BERT adapter (query + intermediate.dense, classifier saved) in tmp_path/'ad'."""
    model = rw.adapt(bert(), "lora", rank=4, targets=["query", "intermediate.dense"],
                     modules_to_save=["classifier"], seed=0)
    rw.save(model, tmp_path / "ad")
    return tmp_path / "ad"


def test_load_onto_other_shapes(saved):
    """Reliability case F12."""
    other = _bert_other(intermediate_size=48)
    before = _fingerprint(other)
    with pytest.raises(ShapeMismatchError) as e:
        rw.load(other, saved)
    msg = str(e.value)
    assert "bert.encoder.layer.0.intermediate.dense" in msg
    assert "(64, 32)" in msg and "(48, 32)" in msg
    assert_unchanged(other, before)


def test_load_onto_model_missing_module(saved):
    other = _bert_other(num_hidden_layers=1)
    before = _fingerprint(other)
    with pytest.raises(ShapeMismatchError) as e:
        rw.load(other, saved)
    assert "bert.encoder.layer.1." in str(e.value) and "does not have" in str(e.value)
    assert_unchanged(other, before)


def test_load_with_other_head_shape_leaves_model_unchanged(saved):
    other = _bert_other(num_labels=5)
    before = _fingerprint(other)
    with pytest.raises(ShapeMismatchError) as e:
        rw.load(other, saved)
    assert "'classifier'" in str(e.value) and re.search(r"\(3,.*\(5,", str(e.value))
    assert_unchanged(other, before)


@pytest.mark.parametrize("own_head", [False, True])
def test_load_with_mismatching_config_rolls_back(saved, bert, own_head):
    """The failure is found only after the adapters are built: everything is undone,
    including trainable flags and the active/merged state of adapters already there
    (and, with ``own_head``, the classifier copy the model's adapter already trains)."""
    cfg_file = saved / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["adapters"]["default"]["config"]["rank"] = 2  # tensors in the file have rank 4
    cfg_file.write_text(json.dumps(cfg))

    model = rw.adapt(bert(), "lora", rank=2, targets=["value"], name="other", seed=1,
                     modules_to_save=["classifier"] if own_head else [])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    rw.merge(model)
    before = _fingerprint(model)
    with pytest.raises(ShapeMismatchError) as e:
        rw.load(model, saved)
    assert "lora_A" in str(e.value) and "(4, 32)" in str(e.value) and "(2, 32)" in str(e.value)
    assert_unchanged(model, before)
    if own_head:
        assert list(model.classifier.copies) == ["other"] and model.classifier.active == "other"
    else:
        assert type(model.classifier) is nn.Linear


def test_load_twice_same_name(saved, bert):
    model = rw.load(bert(), saved)
    before = _fingerprint(model)
    with pytest.raises(AdapterExistsError, match="'default'"):
        rw.load(model, saved)
    assert_unchanged(model, before)


def test_load_unknown_adapter_name(saved, bert):
    with pytest.raises(TargetError, match="'nope'"):
        rw.load(bert(), saved, names="nope")


def test_truncated_file(saved, bert):
    """Reliability case F1."""
    w = saved / "adapter_model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    model = bert()
    before = _fingerprint(model)
    with pytest.raises(CorruptFileError) as e:
        rw.load(model, saved)
    assert "adapter_model.safetensors" in str(e.value)
    assert_unchanged(model, before)


def test_bit_flipped_file(saved, bert):
    """Reliability case F3."""
    w = saved / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x10  # a flipped bit inside the tensor data: still parses, wrong values
    w.write_bytes(bytes(data))
    model = bert()
    before = _fingerprint(model)
    with pytest.raises(CorruptFileError, match="SHA-256"):
        rw.load(model, saved)
    assert_unchanged(model, before)


def test_truncated_file_without_checksum(saved, bert):
    """Reliability case F2."""
    cfg_file = saved / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["weights_sha256"]
    cfg_file.write_text(json.dumps(cfg))
    w = saved / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    model = bert()
    before = _fingerprint(model)
    with pytest.raises(CorruptFileError, match="safetensors"):
        rw.load(model, saved)
    assert_unchanged(model, before)


def test_damaged_or_missing_config(saved, bert, tmp_path):
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        rw.load(bert(), saved)
    with pytest.raises(CorruptFileError, match="does not exist"):
        rw.load(bert(), tmp_path / "nowhere")


def test_rw_load_of_a_peft_dir_points_to_import_peft(bert, tmp_path):
    model = rw.adapt(bert(), "lora", rank=2, targets=["query"])
    rw.export_peft(model, tmp_path / "p")
    with pytest.raises(CorruptFileError, match="import_peft"):
        rw.load(bert(), tmp_path / "p")


def test_save_without_adapters(bert, tmp_path):
    with pytest.raises(TargetError, match="no adapters"):
        rw.save(bert(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---- PEFT import ---------------------------------------------------------------------------------
def _peft_dir(base, tmp_path, targets, **kw):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=targets, **kw))
        pm.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


def test_import_peft_onto_model_missing_module(bert, tmp_path):
    """Reliability case E5."""
    d = _peft_dir(bert(), tmp_path, ["query"])
    other = _bert_other(num_hidden_layers=1)
    before = _fingerprint(other)
    with pytest.raises(ShapeMismatchError, match=r"bert\.encoder\.layer\.1\.attention\.self\.query"):
        rw.import_peft(other, d)
    assert_unchanged(other, before)


def test_import_peft_onto_other_input_shape(bert, tmp_path):
    """Reliability case E5."""
    d = _peft_dir(bert(), tmp_path, ["output.dense"])
    other = _bert_other(intermediate_size=48)  # output.dense: 32x64 in the file, 32x48 here
    before = _fingerprint(other)
    with pytest.raises(ShapeMismatchError) as e:
        rw.import_peft(other, d)
    assert "bert.encoder.layer.0.output.dense" in str(e.value) and "(4, 64)" in str(e.value)
    assert_unchanged(other, before)


def test_import_peft_onto_other_output_shape(bert, tmp_path):
    d = _peft_dir(bert(), tmp_path, ["intermediate.dense"])
    other = _bert_other(intermediate_size=48)  # intermediate.dense: 64x32 in the file, 48x32 here
    before = _fingerprint(other)
    try:
        with pytest.raises(ShapeMismatchError, match="bert.encoder.layer.0.intermediate.dense"):
            rw.import_peft(other, d)
    finally:
        assert_unchanged(other, before)  # the engine's rollback works even for the bare error


def test_import_peft_rejects_unsupported(bert, tmp_path):
    """Reliability cases E1 and E7."""
    import peft

    with warnings.catch_warnings():  # IA3: a PEFT adapter type rankwise has no method for
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(bert(), peft.IA3Config(target_modules=["query"], feedforward_modules=[]))
        pm.save_pretrained(tmp_path / "ia3")
    model = bert()
    before = _fingerprint(model)
    with pytest.raises(ConfigError, match="'IA3'.*has no rankwise method"):
        rw.import_peft(model, tmp_path / "ia3")
    assert_unchanged(model, before)
    d2 = _peft_dir(bert(), tmp_path / "b", ["query"], bias="lora_only")
    with pytest.raises(ConfigError, match="bias"):
        rw.import_peft(bert(), d2)


def test_import_peft_missing_files(tmp_path, bert):
    """Reliability case E6."""
    with pytest.raises(CorruptFileError, match="adapter_config.json"):
        rw.import_peft(bert(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    with pytest.raises(CorruptFileError, match="safetensors"):
        rw.import_peft(bert(), tmp_path)


def test_export_peft_needs_a_name_with_two_adapters(bert, tmp_path):
    model = rw.adapt(bert(), "lora", rank=2, targets=["query"], name="a")
    rw.adapt(model, "lora", rank=2, targets=["value"], name="b")
    with pytest.raises(TargetError, match="name="):
        rw.export_peft(model, tmp_path / "p")
    rw.export_peft(model, tmp_path / "p", name="b")


@pytest.mark.parametrize("targets", ["all-linear", r".*"])
def test_bare_layer_as_model(targets):
    """The root module cannot be replaced in place: a clear error, not a self-referencing wrapper."""
    layer = nn.Linear(4, 4)
    with pytest.raises(TargetError, match=r"nn\.Sequential\(layer\)"):
        rw.adapt(layer, "lora", rank=2, targets=targets)
    assert list(layer.children()) == [] and adapter_state(layer) == {}


def _encoder_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                         nn.Linear(8, 2)).eval()


@pytest.mark.parametrize("target,inside", [("linear1", "'1', a TransformerEncoderLayer"),
                                           ("out_proj", "'1.self_attn', a MultiheadAttention")])
def test_layers_inside_fused_torch_modules(target, inside):
    """nn.MultiheadAttention reads out_proj.weight directly, and TransformerEncoderLayer's inference
    fast path reads linear1/linear2 directly: adapters there would be silently ignored."""
    model = _encoder_net()
    before = _fingerprint(model)
    with pytest.raises(UnsupportedLayerError) as e:
        rw.adapt(model, "lora", rank=2, targets=[target])
    assert f"'1.{'self_attn.' if target == 'out_proj' else ''}{target}'" in str(e.value) and inside in str(e.value)
    assert_unchanged(model, before)
    # all-linear and regexes leave them out
    rw.adapt(model, "lora", rank=2, targets="all-linear", name="a")
    assert adapter_state(model)["a"]["modules"] == ["0"]
    with pytest.raises(TargetError, match="cannot adapt"):
        rw.adapt(model, "lora", rank=2, targets=r"1\..*", name="b")
    # and exclude lets a suffix list skip them
    rw.adapt(model, "lora", rank=2, targets=["0", "linear1"], exclude=["1.linear1"], name="c")
    assert adapter_state(model)["c"]["modules"] == ["0"]
