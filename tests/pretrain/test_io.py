"""rankwise.pretrain.load_pretrained / export_dense on folders written by ``rankwise pretrain``."""

from __future__ import annotations

import json

import pytest
import torch

import rankwise.pretrain as rp
from rankwise.cli.main import main
from rankwise.cli.pretrain import Windows, evaluator, stdlib_bytes
from rankwise.errors import ConfigError, CorruptFileError, ShapeMismatchError

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pretrain(tmp_path, kind, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / kind
    assert main(["pretrain", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--valid-tokens", "256",
                 "--no-progress", "--threads", "1", "--model-config", str(cfg), "--optimizer", "adamw",
                 "--parametrization", kind, *extra, "--out", str(out)]) == 0
    return out


def _valid_loss(model):
    _, valid = stdlib_bytes(4 * 2 * 32, 256)
    return evaluator(Windows(valid, 32))(model)["loss"]


def _greedy(model, prompt, n):
    """Greedy decoding by hand (argmax of the full-sequence logits): the oracle for generate()."""
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("kind, extra, exact", [
    ("full", [], True),
    ("sltrain", ["--param-rank", "4", "--density", "0.1"], False),  # saved dense: B·A + S summed once
    ("loqt", ["--param-rank", "4", "--reset-every", "2"], False),
    ("cola", ["--param-rank", "4"], True),  # saved factorized, rebuilt with parametrize: the same model
])
def test_load_pretrained_reproduces_the_reported_loss_and_generates(tmp_path, kind, extra, exact):
    from transformers import LlamaForCausalLM

    out = _pretrain(tmp_path, kind, *extra)
    model = rp.load_pretrained(out)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert (getattr(model, "_rankwise_pretrain", (None,))[0] == "cola") == (kind == "cola")
    reported = json.loads((out / "run.json").read_text())["final"]["loss"]
    loss = _valid_loss(model)
    # the dense weight of a factorized layer is the same function up to float32 rounding of the sum
    assert loss == reported if exact else abs(loss - reported) < 1e-4
    prompt = torch.tensor([[ord(c) for c in "def "]])
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), _greedy(model, prompt, 6))


def test_export_dense_is_a_plain_hugging_face_folder(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    out = _pretrain(tmp_path, "relora", "--param-rank", "4", "--reset-every", "2")
    hf = tmp_path / "hf"
    rp.export_dense(out, hf)
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    plain = AutoModelForCausalLM.from_pretrained(hf)  # transformers alone: no rankwise module inside
    assert type(plain) is LlamaForCausalLM
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in plain.modules())
    ours = rp.load_pretrained(out)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, ours(input_ids=ids).logits)
    rp.export_dense(out, hf)  # an earlier export is replaced
    # the CLI writes the same folder with --hf
    cli = _pretrain(tmp_path / "cli", "relora", "--param-rank", "4", "--reset-every", "2", "--hf")
    assert (cli / "hf" / "model.safetensors").read_bytes() == (hf / "model.safetensors").read_bytes()


def test_export_refuses_cola_and_foreign_folders_writing_nothing(tmp_path):
    from rankwise.errors import OutputPathError

    out = _pretrain(tmp_path, "cola", "--param-rank", "4")
    with pytest.raises(ConfigError, match="has no dense form.*load_pretrained"):
        rp.export_dense(out, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OutputPathError, match="notes.txt"):
        rp.export_dense(out, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(CorruptFileError, match="config.json does not exist"):
        rp.load_pretrained(tmp_path)
    out = _pretrain(tmp_path, "full")
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorruptFileError, match="cannot be read as safetensors"):
        rp.load_pretrained(out)
    # weights of another model size: a shape mismatch, not a silent partial load
    out2 = _pretrain(tmp_path / "b", "full")
    cfg = json.loads((out2 / "config.json").read_text())
    (out2 / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=48)))
    with pytest.raises(ShapeMismatchError, match="does not fit the model"):
        rp.load_pretrained(out2)
