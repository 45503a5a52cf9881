"""rankwise.compress save / load / export: round trips against the in-memory model, and damaged folders."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import rankwise as rw
import rankwise.compress as rc
from rankwise.errors import CorruptFileError, OutputPathError, ShapeMismatchError


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def _llama():
    from conftest import make_llama

    return make_llama(seed=0)


def test_save_load_factored_onto_a_fresh_model(tmp_path):
    model = _mlp()
    x = torch.randn(4, 16)
    rep = rc.compress(model, "cur", ratio=0.5, targets=["0", "2"], progress=False)
    want = model(x)
    rc.save(model, tmp_path / "c", rep)
    loaded = rc.load(tmp_path / "c", model=_mlp(seed=1))
    torch.testing.assert_close(loaded(x), want, atol=0, rtol=0)
    meta = json.loads((tmp_path / "c" / "compress_config.json").read_text())
    assert meta["layers"]["0"]["core"] is True and meta["report"]["params after"] == rep.params_after


def test_hf_model_loads_with_one_call_and_exports_dense(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _llama()
    ids = torch.randint(0, 100, (2, 7))
    batches = [{"input_ids": torch.randint(0, 100, (2, 16))} for _ in range(3)]
    rc.compress(model, "svd_llm", ratio=0.6, calibration=batches, progress=False)
    want = model(ids).logits
    rc.save(model, tmp_path / "c")
    loaded = rc.load(tmp_path / "c")  # rebuilt from config.json
    torch.testing.assert_close(loaded(ids).logits, want, atol=1e-5, rtol=1e-5)
    rc.export(model, tmp_path / "hf")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not rc.factored_layers(plain)
    torch.testing.assert_close(plain(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_eora_saves_packed_and_loads_back(tmp_path):
    model = _llama()
    ids = torch.randint(0, 100, (2, 7))
    batches = [{"input_ids": torch.randint(0, 100, (2, 16))} for _ in range(3)]
    rep = rc.compress(model, "eora", rank=4, calibration=batches, quant="int4", progress=False)
    saved = sum(4 * m * k - (m * k // 2 + 4 * -(-m * k // 64)) - 4 * 4 * (m + k) for m, k in (r["shape"] for r in rep))
    assert rep.bytes_before - rep.bytes_after == saved  # int4 codes + float32 absmax per 64 + fp32 LoRA factors
    want = model(ids).logits
    rc.save(model, tmp_path / "c", rep)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "c" / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert stored[q + ".qdata"].dtype == torch.uint8 and q not in stored
    loaded = rc.load(tmp_path / "c")
    torch.testing.assert_close(loaded(ids).logits, want, atol=1e-5, rtol=1e-5)
    # dense export = quantized weights + merged compensation
    rc.export(model, tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(plain(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_adapter_trained_after_compression_is_saved(tmp_path):
    model = _mlp()
    rc.compress(model, "svd", ratio=0.5, targets=["0", "2"], progress=False)
    rw.adapt(model, "lora", rank=2, targets=["down", "up"], seed=0)
    with torch.no_grad():
        for _, layer in rw.core.api.adapted_layers(model):
            layer.adapters["default"].lora_B.normal_()
    x = torch.randn(3, 16)
    want = model(x)
    rc.save(model, tmp_path / "c")
    loaded = rc.load(tmp_path / "c", model=_mlp(seed=2))
    torch.testing.assert_close(loaded(x), want, atol=1e-6, rtol=1e-6)


def _damage(folder, what):
    if what == "truncated":
        p = folder / "model.safetensors"
        p.write_bytes(p.read_bytes()[:100])
    elif what == "flipped":
        p = folder / "model.safetensors"
        b = bytearray(p.read_bytes())
        b[-5] ^= 0xFF
        p.write_bytes(bytes(b))
    elif what == "json":
        (folder / "compress_config.json").write_text("{not json")
    elif what == "missing":
        (folder / "model.safetensors").unlink()
    elif what == "layer":
        meta = json.loads((folder / "compress_config.json").read_text())
        meta["layers"]["0"]["type"] = "mystery"
        (folder / "compress_config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("what", ["truncated", "flipped", "json", "missing", "layer"])
def test_corrupted_folder_is_refused_and_the_model_untouched(tmp_path, what):
    model = _mlp()
    rc.compress(model, "svd", ratio=0.5, targets=["0", "2"], progress=False)
    rc.save(model, tmp_path / "c")
    _damage(tmp_path / "c", what)
    fresh = _mlp(seed=3)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CorruptFileError):
        rc.load(tmp_path / "c", model=fresh)
    assert not rc.factored_layers(fresh)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())


def test_wrong_model_is_refused_unchanged(tmp_path):
    model = _mlp()
    rc.compress(model, "svd", ratio=0.5, targets=["0", "2"], progress=False)
    rc.save(model, tmp_path / "c")
    other = nn.Sequential(nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ShapeMismatchError):
        rc.load(tmp_path / "c", model=other)
    assert not rc.factored_layers(other)


def test_save_never_overwrites_user_files(tmp_path):
    model = _mlp()
    rc.compress(model, "svd", ratio=0.5, targets=["0", "2"], progress=False)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError):
        rc.save(model, tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["notes.txt"]
