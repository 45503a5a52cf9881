"""``rankwise finetune`` as a Transformers user meets it (issue 13): every default in ``--help``, the
trainer's flags, a validation split that ``--seed`` leaves alone, label names saved and loaded, the
best checkpoint, a loadable full fine-tune, and the plot's raw loss + EMA + validation points.

Oracles: the split is recomputed with ``TextDataset.split``; a saved model is re-evaluated from
scratch (its own forward on the re-tokenized validation rows) and compared with the numbers the
run recorded; the EMA is the recursion ``m_t = 0.9 m_{t-1} + 0.1 v_t`` written out here."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from _cli_helpers import tiny_classifier_dir, write_csv

import rankwise.cli.finetune as ft
from rankwise.cli.main import build_parser, main
from rankwise.data import read_table


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_classifier_dir(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("data") / "train.csv", n=60, names=("net", "text", "zoo"))


def args(model_dir, data, out, *extra):
    return ["finetune", "--model", str(model_dir), "--data", str(data), "--text-col", "sentence", "--label-col",
            "topic", "--batch-size", "8", "--out", str(out), "--no-progress", *extra]


def valid_rows(data, split_seed=0):
    return read_table(data, "sentence", "topic").split(valid_frac=0.2, seed=split_seed)[1]


def evaluate(model, tok, ds):
    """Accuracy and mean cross-entropy of ``model`` on ``ds``, one example at a time (no padding)."""
    correct, loss = 0, 0.0
    with torch.no_grad():
        for text, label in zip(ds.texts, ds.labels):
            enc = tok(text, truncation=True, max_length=64, return_tensors="pt")
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0]
            loss += float(F.cross_entropy(logits[None], torch.tensor([label])))
            correct += int(logits.argmax()) == label
    return correct / len(ds), loss / len(ds)


def test_help_shows_every_default_and_the_new_flags():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["finetune"]
    text = sub.format_help()
    blocks = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    for action in sub._actions:
        if action.required or action.default is None or not action.option_strings or action.nargs == 0:
            continue
        block = next(b for b in blocks if b.strip().startswith(action.option_strings[0]))
        assert "default" in " ".join(block.split()), block
    for action in sub._actions:  # options without a value default say what happens without them
        if action.default is None and action.option_strings[0] not in ("-h",) and not action.required:
            block = next(b for b in blocks if b.strip().startswith(action.option_strings[0]))
            assert "default" in block, block
    flat = " ".join(text.split())
    for flag, default in (("--eval-every", "20"), ("--warmup", "0.06"), ("--weight-decay", "0.0"),
                          ("--grad-accum", "1"), ("--split-seed", "0"), ("--text-col", "text"),
                          ("--label-col", "label"), ("--steps", "200")):
        assert re.search(re.escape(flag) + r" \S+ .*?\(default: " + re.escape(default) + r"\)", flat), flag
    assert "best/" in flat and "labels.json" in flat and "model/" in flat


def test_flags_reach_the_train_config(model_dir, data, tmp_path, monkeypatch):
    import rankwise.train

    seen = {}
    real = rankwise.train.train

    def spy(*a, **k):
        seen["cfg"] = a[4]
        return real(*a, **k)

    monkeypatch.setattr(rankwise.train, "train", spy)
    assert main(args(model_dir, data, tmp_path / "o", "--steps", "4", "--grad-accum", "2", "--warmup", "1",
                     "--weight-decay", "0.05", "--eval-every", "2", "--lr", "1e-3", "--seed", "3")) == 0
    cfg = seen["cfg"]
    assert (cfg.steps, cfg.batch_size, cfg.grad_accum, cfg.warmup, cfg.weight_decay, cfg.eval_every, cfg.lr,
            cfg.seed) == (4, 8, 2, 1.0, 0.05, 2, 1e-3, 3)
    report = (tmp_path / "o" / "report.md").read_text()
    assert "| step |" in report and re.search(r"\|\s+2 \|.*\|\s+4 \|", report, re.S)  # evaluated at 2 and 4


def test_precision_flag_reaches_the_train_config(model_dir, data, tmp_path, monkeypatch):
    """``--precision`` (issue 18): fp32 by default, ``bf16`` reaches ``TrainConfig.precision``, anything else
    is refused by the parser."""
    import rankwise.train

    assert build_parser().parse_args(args(model_dir, data, tmp_path / "d")).precision == "fp32"
    seen = {}
    real = rankwise.train.train

    def spy(*a, **k):
        seen["cfg"] = a[4]
        return real(*a, **k)

    monkeypatch.setattr(rankwise.train, "train", spy)
    assert main(args(model_dir, data, tmp_path / "o", "--steps", "1", "--precision", "bf16")) == 0
    assert seen["cfg"].precision == "bf16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(args(model_dir, data, tmp_path / "x", "--precision", "fp8"))


def test_validation_split_depends_on_split_seed_only(model_dir, data, tmp_path, monkeypatch):
    """Trial item 8: ``--seed`` changed the validation rows, so seeds were scored on different data."""
    seen = []
    real = ft.evaluator
    monkeypatch.setattr(ft, "evaluator", lambda task, enc, *a: seen.append(enc) or real(task, enc, *a))
    for i, extra in enumerate((["--seed", "0"], ["--seed", "5"], ["--split-seed", "1"])):
        assert main(args(model_dir, data, tmp_path / str(i), "--steps", "1", *extra)) == 0
    from transformers import AutoTokenizer

    from rankwise.integrations.hf import ClassificationTask

    task = ClassificationTask(AutoTokenizer.from_pretrained(model_dir), max_length=64)
    assert seen[0] == seen[1] == task.encode(valid_rows(data, 0))
    assert seen[2] == task.encode(valid_rows(data, 1)) != seen[0]


@pytest.fixture(scope="module")
def lora_run(model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    assert main(args(model_dir, data, out, "--steps", "30", "--lr", "1e-2", "--eval-every", "3")) == 0
    return out


def test_labels_are_saved_and_loaded(lora_run, data):
    """Trial item 5: the reloaded adapter predicted LABEL_0..k; the user rebuilt the sorted names by hand."""
    info = json.loads((lora_run / "labels.json").read_text())
    assert info["id2label"] == {"0": "net", "1": "text", "2": "zoo"}
    assert info["label2id"] == {"net": 0, "text": 1, "zoo": 2} and info["method"] == "lora"
    model, tok = ft.load_run(lora_run)
    assert model.config.id2label == {0: "net", 1: "text", 2: "zoo"}
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    ds = valid_rows(data)
    acc, _ = evaluate(model, tok, ds)
    state = json.loads((lora_run / "checkpoint" / "trainer_state.json").read_text())
    assert acc == pytest.approx(state["history"]["evals"][-1][1]["accuracy"])  # the run's own final score
    enc = tok(ds.texts[0], return_tensors="pt")
    predicted = model.config.id2label[int(model(**enc).logits.argmax())]
    assert predicted == ds.label_names[ds.labels[0]]  # a name from the CSV (the task is learnt: accuracy 1)
    assert acc == 1.0


def test_best_checkpoint_is_the_best_validation_step(lora_run, data):
    state = json.loads((lora_run / "checkpoint" / "trainer_state.json").read_text())
    evals = [(s, m) for s, m in state["history"]["evals"]]
    best = max(m["accuracy"] for _, m in evals)
    step, metrics = next((s, m) for s, m in evals if m["accuracy"] == best)  # the earliest best
    assert step < 30, "the setting must reach its best before the end, or best/ would equal adapter/"
    model, tok = ft.load_run(lora_run, which="best")
    acc, loss = evaluate(model, tok, valid_rows(data))
    assert acc == best
    assert loss == pytest.approx(metrics["loss"], rel=1e-5)  # the state at that step, not a later one
    final, _ = ft.load_run(lora_run)
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), final.state_dict().values()))
    report = (lora_run / "report.md").read_text()
    assert f"best validation accuracy ({best:.4f}, step {step}) in best/" in report


def test_full_finetune_saves_a_loadable_model_that_analyze_accepts(model_dir, data, tmp_path, capsys):
    """Trial item 3: --method full saved no config.json; analyze crashed on its folder after minutes of work."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "full"
    assert main(args(model_dir, data, out, "--method", "full", "--steps", "6", "--eval-every", "3")) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.id2label == {0: "net", 1: "text", 2: "zoo"}
    acc, loss = evaluate(model, tok, valid_rows(data))
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    last = state["history"]["evals"][-1][1]
    assert acc == last["accuracy"] and loss == pytest.approx(last["loss"], rel=1e-5)
    assert (out / "best" / "config.json").is_file() and (out / "best" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["analyze", "--base", str(model_dir), "--finetuned", str(out), "--out", str(tmp_path / "rep"),
                 "--no-progress"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert re.search(r"\| measure +\| full/model +\|", md) and re.search(r"\| method +\| full +\|", md)


def test_resume_with_other_steps_warns(model_dir, data, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(args(model_dir, data, out, "--steps", "2")) == 0
    capsys.readouterr()
    assert main(args(model_dir, data, out, "--steps", "3", "--resume")) == 0
    err = capsys.readouterr().err
    assert "warning: --steps 3 differs from the 2 of the run" in err and "schedule" in err
    assert "resumed at step 2" in (out / "report.md").read_text()


def test_loss_plot_has_raw_loss_ema_and_validation_points(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from rankwise.cli.common import ema, write_report

    assert ema([1.0, 0.0, 0.0, 0.0]) == pytest.approx([1.0, 0.9, 0.81, 0.729])
    losses = [2.0, 1.5, 1.7, 1.0, 0.8, 0.9]
    evals = [(3, {"accuracy": 0.5, "loss": 1.2}), (6, {"accuracy": 0.75, "loss": 0.7})]
    figs = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig) or real_close(fig))
    write_report(tmp_path, "t", [{"a": 1}], {"lora": losses}, "notes", evals={"lora": evals})
    fig = figs[-1]
    lines = {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines()}
    assert list(lines["lora: loss per step"].get_ydata()) == losses
    m, want = None, []
    for v in losses:
        m = v if m is None else 0.9 * m + 0.1 * v
        want.append(m)
    assert list(lines["lora: EMA 0.9"].get_ydata()) == pytest.approx(want)
    assert list(lines["lora: validation loss"].get_xdata()) == [3, 6]
    assert list(lines["lora: validation loss"].get_ydata()) == [1.2, 0.7]
    assert list(lines["lora: validation accuracy"].get_ydata()) == [0.5, 0.75]
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
