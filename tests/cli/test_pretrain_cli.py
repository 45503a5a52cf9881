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
