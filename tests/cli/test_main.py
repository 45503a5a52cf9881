"""CLI smoke tests on a tiny random BERT saved to a local folder and a tiny CSV."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

import rankwise as rw
from rankwise.cli.main import _targets, main

WORDS = ["alpha", "beta", "gamma", "delta", "socket", "thread", "parse", "email", "json", "file"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"w{i}" for i in range(40)]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "train.csv"
    g = torch.Generator().manual_seed(0)
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "topic"])
        for i in range(60):
            lab = i % 2
            words = [WORDS[int(j)] for j in torch.randint(0, 5, (6,), generator=g) + 5 * lab]
            w.writerow([" ".join(words), ["net", "text"][lab]])
    return p


def test_targets_parsing():
    assert _targets("all-linear") == "all-linear"
    assert _targets("query,value") == ["query", "value"]
    assert _targets(r".*attn.*") == r".*attn.*"


def test_methods_command_lists_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in rw.methods():
        assert name in out


def test_finetune_lora_saves_loadable_adapter(tiny_model_dir, tiny_csv, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--model", str(tiny_model_dir), "--data", str(tiny_csv), "--text-col", "sentence",
            "--label-col", "topic", "--method", "lora", "--rank", "4", "--targets", "query,value",
            "--steps", "30", "--batch-size", "8", "--lr", "3e-3", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed
    for f in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "report.md",
              "loss_curves.png", "checkpoint/trainer_state.json"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    assert cfg["adapters"]["default"]["method"] == "lora"
    assert cfg["adapters"]["default"]["modules_to_save"] == ["classifier"]
    # the saved adapter loads onto the base model and the task is learnable: accuracy above chance
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    rw.load(base, out / "adapter")
    assert len(rw.summary(base)) == 4  # query and value in 2 layers


def test_finetune_resume_continues(tiny_model_dir, tiny_csv, tmp_path):
    out = tmp_path / "run"
    base = ["finetune", "--model", str(tiny_model_dir), "--data", str(tiny_csv), "--text-col", "sentence",
            "--label-col", "topic", "--rank", "2", "--batch-size", "8", "--out", str(out), "--no-progress"]
    assert main(base + ["--steps", "4"]) == 0
    state = json.loads((out / "checkpoint/trainer_state.json").read_text())
    assert state["step"] == 4
    assert main(base + ["--steps", "6", "--resume"]) == 0
    assert json.loads((out / "checkpoint/trainer_state.json").read_text())["step"] == 6


def test_finetune_resume_without_a_checkpoint_is_an_error(tiny_model_dir, tiny_csv, tmp_path):
    """A typo in --out with --resume used to train silently from step 0."""
    out = tmp_path / "typo"
    with pytest.raises(rw.errors.ConfigError, match=r"--resume: .*typo.*holds no checkpoint.*without --resume"):
        main(["finetune", "--model", str(tiny_model_dir), "--data", str(tiny_csv), "--text-col", "sentence",
              "--label-col", "topic", "--out", str(out), "--no-progress", "--resume"])
    assert not out.exists(), "nothing may be written before the check"


def test_finetune_on_a_single_class_is_an_error(tiny_model_dir, tmp_path):
    """Reliability case D6: one class trained a 1-output head and reported accuracy 1, loss 0."""
    p = tmp_path / "one.csv"
    p.write_text("sentence,topic\n" + "".join(f"text number {i},net\n" for i in range(10)))
    with pytest.raises(rw.errors.ConfigError, match=r"single class.*at least two"):
        main(["finetune", "--model", str(tiny_model_dir), "--data", str(p), "--text-col", "sentence",
              "--label-col", "topic", "--out", str(tmp_path / "x"), "--no-progress"])
    assert not (tmp_path / "x").exists()


def test_finetune_max_length_is_checked(tiny_model_dir, tiny_csv, tmp_path, capsys):
    """Reliability case T4: --max-length 0 silently disabled truncation, and a length above the
    model's positions crashed training on the first long text."""
    base = ["finetune", "--model", str(tiny_model_dir), "--data", str(tiny_csv), "--text-col", "sentence",
            "--label-col", "topic", "--out", str(tmp_path / "x"), "--no-progress"]
    with pytest.raises(SystemExit):
        main(base + ["--max-length", "0"])
    assert "argument --max-length: must be an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(rw.errors.ConfigError, match=r"--max-length 100000 is above the \d+ positions"):
        main(base + ["--max-length", "100000"])


def test_finetune_with_too_little_data_for_a_validation_split(tiny_model_dir, tmp_path):
    """Reliability case D9: one row per label gave an empty validation split and a raw IndexError."""
    p = tmp_path / "two.csv"
    p.write_text("sentence,topic\nfirst text,net\nsecond text,text\n")
    with pytest.raises(rw.errors.ConfigError, match=r"2 rows\) leaves an empty validation split.*--valid-data"):
        main(["finetune", "--model", str(tiny_model_dir), "--data", str(p), "--text-col", "sentence",
              "--label-col", "topic", "--out", str(tmp_path / "x"), "--no-progress", "--batch-size", "1"])
    assert not (tmp_path / "x").exists()


def test_finetune_bad_column_is_clear(tiny_model_dir, tiny_csv, tmp_path):
    with pytest.raises(ValueError, match="nope"):
        main(["finetune", "--model", str(tiny_model_dir), "--data", str(tiny_csv), "--text-col", "nope",
              "--label-col", "topic", "--out", str(tmp_path / "x"), "--no-progress"])


def test_demo_runs_on_tiny_model(tiny_model_dir, tmp_path):
    """The demo's default lineup (what `make demo` runs), end to end on a tiny model."""
    from rankwise.cli.demo import demo_methods

    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "rankwise.cli.main", "demo", "--model", str(tiny_model_dir),
           "--steps", "2", "--per-family", "12", "--batch-size", "8", "--rank", "2", "--out", str(out),
           "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trainable params" in res.stdout and "lora" in res.stdout
    report = (out / "report.md").read_text()
    for name in demo_methods(None):
        assert f"| {name} " in report, name
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert (out / "lora_adapter" / "adapter_model.safetensors").is_file()


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    """A hub id goes to transformers' hub loader; offline, the user is told to pass a folder."""
    from rankwise.integrations.hf import load_sequence_classifier

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        load_sequence_classifier("someone/some-model", num_labels=2)


def test_demo_method_lineup():
    from rankwise.cli.demo import DEFAULT, demo_methods
    from rankwise.errors import MethodNotFoundError

    registered = set(rw.methods())
    assert demo_methods(None) == [m for m in DEFAULT if m == "full" or m in registered]
    assert demo_methods(None)[:2] == ["full", "lora"]
    assert demo_methods("all") == ["full"] + rw.methods()
    assert demo_methods(" lora , full ") == ["lora", "full"]
    with pytest.raises(MethodNotFoundError, match="no adapter method named 'lorra'"):
        demo_methods("lora,lorra")


@pytest.mark.parametrize("method", ["eva", "lora_ga"])
def test_finetune_data_driven_init_sees_training_batches(method, tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    """Methods that declare calibration needs get the first training batches (and the task loss)
    from the CLI, and what they build is saved and loads back with the same outputs."""
    import rankwise.cli.common as common

    seen = {}
    real = common.calibration_for

    def spy(*a, **k):
        seen["kw"] = real(*a, **k)
        return seen["kw"]

    monkeypatch.setattr(common, "calibration_for", spy)
    out = tmp_path / method
    args = ["finetune", "--model", str(tiny_model_dir), "--data", str(tiny_csv), "--text-col", "sentence",
            "--label-col", "topic", "--method", method, "--rank", "2", "--targets", "query,value",
            "--steps", "2", "--batch-size", "8", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    kw = seen["kw"]
    assert len(kw["calibration"].data) == common.CALIBRATION_BATCHES and kw["loss_fn"] is not None
    assert real("lora", None, [], 8) == {}  # plain methods get nothing
    from transformers import AutoModelForSequenceClassification

    a = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    rw.load(a, out / "adapter")
    from rankwise.core.api import adapter_state

    assert adapter_state(a)["default"]["config"].method == method


def test_method_options_keep_each_methods_demo_rank_unless_a_rank_is_given():
    from rankwise.cli.common import DEMO_RANK, method_options

    assert method_options("vera")["rank"] == rw.get_method("vera").demo_options["rank"] == 256
    assert method_options("loldu")["rank"] is None  # all components: LoLDU's own setting
    assert method_options("lora")["rank"] == DEMO_RANK
    assert method_options("vera", rank=4)["rank"] == 4 and method_options("lora", rank=4)["rank"] == 4
    assert "rank" not in method_options("fourierft")  # no rank field: nothing added
    assert method_options("lora", rank=4, alpha=8.0, nonsense=1) == {"rank": 4, "alpha": 8.0}
