"""io/files.py and io/peft.py: files that hold no adapter, or an adapter of the other format, are named."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import rankwise as rw


def _saved(tmp_path):
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model = rw.adapt(copy.deepcopy(base), "lora", rank=2, targets=["0"], seed=0)
    rw.save(model, tmp_path / "ad")
    return base, tmp_path / "ad"


@pytest.mark.parametrize("empty", [{}, [], None])
def test_load_of_a_file_with_no_adapter_is_an_error(tmp_path, empty):
    """Reliability case F10: ``"adapters": {}`` loaded nothing and returned normally."""
    base, path = _saved(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["adapters"] = empty
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    model = copy.deepcopy(base)
    with pytest.raises(rw.errors.CorruptFileError, match=r"holds no adapter.*rw.save"):
        rw.load(model, path)
    assert not rw.core.api.adapter_state(model), "nothing may be added to the model"


def test_import_peft_of_a_rankwise_adapter_points_to_load(tmp_path):
    """Reliability case E9: the message said the PEFT type None had no method."""
    base, path = _saved(tmp_path)
    with pytest.raises(rw.errors.ConfigError, match=r"is a rankwise adapter.*rw\.load\(model"):
        rw.import_peft(copy.deepcopy(base), path)


def _exported(tmp_path):
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model = rw.adapt(copy.deepcopy(base), "lora", rank=2, targets=["0", "2"], seed=0)
    rw.export_peft(model, tmp_path / "peft")
    return base, tmp_path / "peft"


@pytest.mark.parametrize("edit,words", [
    (lambda c: c.update(lora_alpha="sixteen"), r"has a value rankwise cannot read .*sixteen"),
    (lambda c: c.pop("r"), r"lacks the field 'r'"),
])
def test_import_peft_config_errors_name_the_field(tmp_path, edit, words):
    """Reliability case E3: a raw ValueError / KeyError with no file or field named."""
    base, path = _exported(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    edit(cfg)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    model = copy.deepcopy(base)
    with pytest.raises(rw.errors.ConfigError, match=words + r".*adapter_config\.json|adapter_config\.json.*" + words):
        rw.import_peft(model, path)
    assert not rw.core.api.adapter_state(model)


def test_import_peft_missing_tensor_names_module_and_key(tmp_path):
    """Reliability case E10: a raw KeyError 'lora_B.weight'; the model must stay unchanged."""
    from safetensors.torch import load_file, save_file

    base, path = _exported(tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    drop = next(k for k in tensors if k.endswith("2.lora_B.weight"))
    del tensors[drop]
    save_file(tensors, str(path / "adapter_model.safetensors"))
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(rw.errors.CorruptFileError, match=r"lacks tensor 'lora_B\.weight' of module '2'.*unchanged"):
        rw.import_peft(model, path)
    assert not rw.core.api.adapter_state(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_load_onto_a_meta_device_model_is_refused(tmp_path):
    """Reliability case A10: rw.load on a meta model kept the adapter on meta and dropped the values."""
    base, path = _saved(tmp_path)
    meta = copy.deepcopy(base).to("meta")
    with pytest.raises(rw.errors.ConfigError, match=r"module '0' is on the meta device.*to_empty.*then rw\.load"):
        rw.load(meta, path)
    assert not rw.core.api.adapter_state(meta)


@pytest.mark.parametrize("edit,where", [
    (lambda c: c["adapters"]["default"].pop("config"), r"adapters\.default\.config should be an object"),
    (lambda c: c["adapters"]["default"].update(modules=["0"]), r"adapters\.default\.modules should be an object"),
    (lambda c: c["adapters"]["default"].update(method=None), r"adapters\.default\.method should be a method name"),
    (lambda c: c["adapters"]["default"].pop("modules_to_save"), r"modules_to_save should be a list"),
    (lambda c: c.update(weights_sha256=123), r"'weights_sha256' should be a hex string"),
    (lambda c: c["adapters"]["default"]["modules"]["0"].update(weight_shape="5x6"),
     r"modules\.0\.weight_shape should be a list of integers"),
])
def test_load_names_the_field_of_a_damaged_config(tmp_path, edit, where):
    """Reliability case F9: hand-edited configs raised raw TypeError / KeyError / AttributeError."""
    base, path = _saved(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    edit(cfg)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    model = copy.deepcopy(base)
    with pytest.raises(rw.errors.CorruptFileError, match=where + r".*rw\.save"):
        rw.load(model, path)
    assert not rw.core.api.adapter_state(model)


def test_load_of_a_config_that_is_a_list_is_named(tmp_path):
    base, path = _saved(tmp_path)
    (path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(rw.errors.CorruptFileError, match="the top level should be a JSON object"):
        rw.load(copy.deepcopy(base), path)
