"""``rankwise pretrain`` on a very small LLaMA for a few steps: files, report, weights, errors."""

from __future__ import annotations

import json

import pytest
import torch

from rankwise.cli.main import main
from rankwise.cli.pretrain import Windows, build_model, evaluator, make_optimizer, model_config, stdlib_bytes
from rankwise.errors import ConfigError

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2}


def _args(out, *extra):
    return ["pretrain", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--valid-tokens", "256",
            "--no-progress", "--threads", "1", "--out", str(out), *extra]


def test_pretrain_writes_report_curve_and_weights(tmp_path, capsys):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    assert main(_args(out, "--model-config", str(cfg), "--optimizer", "apollo", "--rank", "4",
                      "--eval-every", "2")) == 0
    assert {"report.md", "loss_curve.png", "model.safetensors", "config.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    report = (out / "report.md").read_text()
    assert "| apollo " in report and "valid ppl" in report and "![loss curve](loss_curve.png)" in report
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the saved weights are the trained model: reloaded, they give the reported validation loss
    from safetensors.torch import load_file

    model = build_model(str(cfg), seed=0)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    assert any(not torch.equal(fresh[k], v) for k, v in model.state_dict().items())
    _, valid = stdlib_bytes(4 * 2 * 32, 256)
    loss = evaluator(Windows(valid, 32))(model)["loss"]
    from rankwise.utils.table import _fmt

    row = [line for line in report.splitlines() if line.startswith("| apollo")][0]
    assert f" {_fmt(round(loss, 4))} |" in row
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 32
    assert "saved to" in capsys.readouterr().out


def test_stdlib_stream_is_deterministic_and_split():
    a_train, a_valid = stdlib_bytes(5000, 1000)
    b_train, b_valid = stdlib_bytes(5000, 1000)
    assert torch.equal(a_train, b_train) and torch.equal(a_valid, b_valid)
    assert a_train.numel() == 5000 and a_valid.numel() == 1000
    # held-out files differ from the training files
    assert bytes(a_valid[:200].tolist()) not in bytes(a_train.tolist())
    w = Windows(a_train, 64)
    assert len(w) == 5000 // 64 and w[1].tolist() == a_train[64:128].tolist()


def test_named_configs_and_parameter_count():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model_config("llama-tiny")
    n = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**cfg)).parameters())
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    assert n == layers * (4 * h * h + 3 * h * i + 2 * h) + 2 * 256 * h + h  # closed form: ~10.8M
    assert 10e6 < n < 20e6


def test_every_optimizer_builds_and_steps(tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    from rankwise.cli.pretrain import OPTIMIZERS

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    import rankwise.optim as ro

    for name in OPTIMIZERS:
        if name in ("galore", "galore8bit", "qgalore", "fira", "flora") and not hasattr(
                ro, {"galore": "GaLoreAdamW", "galore8bit": "GaLoreAdamW8bit", "qgalore": "QGaLoreAdamW",
                     "fira": "Fira", "flora": "Flora"}[name]):
            continue  # optimizer not in this install
        model = build_model(str(cfg), seed=0)
        opt = make_optimizer(name, model, rank=4, update_gap=2)
        before = [p.detach().clone() for p in model.parameters()]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), name


def test_pretrain_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown optimizer 'galor'.*galore"):
        main(_args(tmp_path / "x", "--model-config", "llama-micro", "--optimizer", "galor"))
    with pytest.raises(ConfigError, match="unknown model config 'llama-tin'"):
        main(_args(tmp_path / "x", "--model-config", "llama-tin"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vocab_size": 32000}))
    with pytest.raises(ConfigError, match="vocab_size=32000"):
        model_config(str(bad))


def test_pretrain_with_a_diverging_lr_fails_and_writes_no_nan_weights(tmp_path):
    """Reliability case T2: --lr 1e20 used to exit 0 with every saved weight NaN."""
    from rankwise.errors import NonFiniteLossError

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="NaN|nan|inf"):
        main(_args(out, "--model-config", str(cfg), "--optimizer", "adamw", "--lr", "1e20", "--steps", "6"))
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("flag", ["--seq-len", "--valid-tokens", "--steps", "--batch-size"])
def test_zero_sizes_are_refused_by_the_parser(tmp_path, capsys, flag):
    """Reliability case PT1: --seq-len 0 / --valid-tokens 0 raised a raw numpy error after loading."""
    with pytest.raises(SystemExit) as e:
        main(_args(tmp_path / "run", flag, "0"))
    assert e.value.code == 2
    assert f"argument {flag}: must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- --parametrization
def _tiny(tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    return cfg


@pytest.mark.parametrize("kind, optimizer, extra", [
    ("relora", "adamw", ["--reset-every", "2"]),
    ("sltrain", "galore", ["--density", "0.1", "--refactorize-every", "3"]),  # GaLore projects the factors
    ("cola", "adamw", []),
])
def test_pretrain_with_a_parametrization(tmp_path, kind, optimizer, extra):
    from safetensors.torch import load_file

    from rankwise.pretrain import stored_parameters, trainable_parameters_count
    from rankwise.utils.table import _fmt

    cfg = _tiny(tmp_path)
    out = tmp_path / "run"
    assert main(_args(out, "--model-config", str(cfg), "--optimizer", optimizer, "--rank", "2",
                      "--parametrization", kind, "--param-rank", "4", *extra)) == 0
    report = (out / "report.md").read_text()
    header = [line for line in report.splitlines() if line.startswith("| optimizer")][0]
    row = [line for line in report.splitlines() if line.startswith(f"| {optimizer}")][0]
    cells = dict(zip([c.strip() for c in header.split("|")[1:-1]],
                     [c.strip().replace(",", "") for c in row.split("|")[1:-1]]))
    assert cells["parametrization"] == kind and float(cells["tokens/s"]) > 0 and int(cells["opt state bytes"]) > 0
    expected = build_model(str(cfg), seed=0)  # the counts of the same parametrization, built here
    from rankwise.cli.pretrain import parametrize_model

    parametrize_model(expected, kind, rank=4, **({"density": 0.1} if kind == "sltrain" else {}))
    assert int(cells["stored params"]) == stored_parameters(expected)
    assert int(cells["trainable params"]) == trainable_parameters_count(expected)
    assert f"Parametrization: {kind}" in report

    saved = load_file(str(out / "model.safetensors"))
    model = build_model(str(cfg), seed=0)
    if kind == "cola":  # no dense weight: the factorized model is saved, and reloads after parametrize
        assert any(k.endswith("lora_A") for k in saved)
        parametrize_model(model, "cola", rank=4)
    model.load_state_dict(saved)  # relora / sltrain: a plain LLaMA state dict
    _, valid = stdlib_bytes(4 * 2 * 32, 256)
    loss = evaluator(Windows(valid, 32))(model)["loss"]
    assert f" {_fmt(round(loss, 4))} |" in row


def test_parametrization_errors(tmp_path, monkeypatch):
    import rankwise.pretrain as rp

    cfg = _tiny(tmp_path)
    base = ["--model-config", str(cfg), "--optimizer", "adamw"]
    with pytest.raises(ConfigError, match="unknown parametrization 'sltrian'.*sltrain"):
        main(_args(tmp_path / "a", *base, "--parametrization", "sltrian"))
    monkeypatch.delitem(rp.PARAMETRIZATIONS, "loqt", raising=False)  # not written yet (or hidden here)
    with pytest.raises(ConfigError, match="--parametrization loqt is not available in this install"):
        main(_args(tmp_path / "b", *base, "--parametrization", "loqt"))
    with pytest.raises(ConfigError, match="--density does not apply to --parametrization relora"):
        main(_args(tmp_path / "c", *base, "--parametrization", "relora", "--density", "0.1"))
    with pytest.raises(ConfigError, match="--reset-every sets an option.*full"):
        main(_args(tmp_path / "d", *base, "--reset-every", "5"))
    with pytest.raises(ConfigError, match=r"density=1\.5 must be in \(0, 1\)"):
        main(_args(tmp_path / "e", *base, "--parametrization", "sltrain", "--density", "1.5"))
    assert not any((tmp_path / x / "model.safetensors").exists() for x in "abcde")
