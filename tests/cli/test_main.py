"""CLI smoke tests on a tiny random BERT saved to a local folder and a tiny CSV.

Errors go through ``main`` as a user meets them: one line on stderr, exit code 2, no traceback
(:func:`fails`); ``run`` is the same command line with the errors raised."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from _cli_helpers import tiny_classifier_dir, write_csv

import rankwise as rw
from rankwise.cli.main import _targets, main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return tiny_classifier_dir(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("data") / "train.csv")


def fails(capsys, argv, pattern: str) -> str:
    """``main(argv)`` exits 2 with one line on stderr matching ``pattern``, and no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


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


def test_finetune_resume_without_a_checkpoint_is_an_error(tiny_model_dir, tiny_csv, tmp_path, capsys):
    """Reliability case R5: a typo in --out with --resume used to train silently from step 0."""
    out = tmp_path / "typo"
    fails(capsys, ["finetune", "--model", str(tiny_model_dir), "--data", str(tiny_csv), "--text-col", "sentence",
                   "--label-col", "topic", "--out", str(out), "--no-progress", "--resume"],
          r"^rankwise finetune: error: --resume: .*typo.*holds no checkpoint.*without --resume")
    assert not out.exists(), "nothing may be written before the check"


def test_finetune_on_a_single_class_is_an_error(tiny_model_dir, tmp_path, capsys):
    """Reliability case D6: one class trained a 1-output head and reported accuracy 1, loss 0."""
    p = tmp_path / "one.csv"
    p.write_text("sentence,topic\n" + "".join(f"text number {i},net\n" for i in range(10)))
    fails(capsys, ["finetune", "--model", str(tiny_model_dir), "--data", str(p), "--text-col", "sentence",
                   "--label-col", "topic", "--out", str(tmp_path / "x"), "--no-progress"],
          r"single class.*at least two.*--label-col")
    assert not (tmp_path / "x").exists()


def test_finetune_max_length_is_checked(tiny_model_dir, tiny_csv, tmp_path, capsys):
    """Reliability case T4: --max-length 0 silently disabled truncation, and a length above the
    model's positions crashed training on the first long text."""
    base = ["finetune", "--model", str(tiny_model_dir), "--data", str(tiny_csv), "--text-col", "sentence",
            "--label-col", "topic", "--out", str(tmp_path / "x"), "--no-progress"]
    with pytest.raises(SystemExit):
        main(base + ["--max-length", "0"])
    assert "argument --max-length: must be an integer >= 1, got 0" in capsys.readouterr().err
    fails(capsys, base + ["--max-length", "100000"], r"--max-length 100000 is above the 64 positions.*"
          r"Pass --max-length 64 or less")


def test_finetune_with_too_little_data_for_a_validation_split(tiny_model_dir, tmp_path, capsys):
    """Reliability case D9: one row per label gave an empty validation split and a raw IndexError."""
    p = tmp_path / "two.csv"
    p.write_text("sentence,topic\nfirst text,net\nsecond text,text\n")
    fails(capsys, ["finetune", "--model", str(tiny_model_dir), "--data", str(p), "--text-col", "sentence",
                   "--label-col", "topic", "--out", str(tmp_path / "x"), "--no-progress", "--batch-size", "1"],
          r"2 rows\) leaves an empty validation split.*--valid-data")
    assert not (tmp_path / "x").exists()


def test_finetune_bad_column_names_the_flag(tiny_model_dir, tiny_csv, tmp_path, capsys):
    """Trial item 10: the message said ``text_col=`` (a Python keyword) instead of the flag."""
    line = fails(capsys, ["finetune", "--model", str(tiny_model_dir), "--data", str(tiny_csv), "--text-col", "nope",
                          "--label-col", "topic", "--out", str(tmp_path / "x"), "--no-progress"],
                 r"has no column 'nope'; columns present: 'sentence', 'topic'\. Pass --text-col with one of them")
    assert "text_col=" not in line


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


@pytest.mark.parametrize("case", ["missing file", "unknown method", "warmup", "valid labels", "model folder",
                                  "checkpoint as model", "bad rank"])
def test_cli_errors_are_one_line_with_the_fix_and_exit_2(case, tiny_model_dir, tiny_csv, tmp_path, capsys):
    """Trial item 10: every error printed a 17-line traceback. Now: one line naming the problem and the
    fix in terms of flags, exit code 2, nothing written. Reliability case T3."""
    out = tmp_path / "out"
    ft = ["finetune", "--model", str(tiny_model_dir), "--data", str(tiny_csv), "--text-col", "sentence",
          "--label-col", "topic", "--out", str(out), "--no-progress"]
    if case == "missing file":
        argv, want = ft[:4] + [str(tmp_path / "nope.csv")] + ft[5:], r"no such file: .*nope\.csv"
    elif case == "unknown method":
        argv, want = ft + ["--method", "lorra"], r"no adapter method named 'lorra'.*Did you mean: lora"
    elif case == "warmup":
        argv, want = ft + ["--warmup", "2.5"], r"--warmup 2\.5 is >= 1, so it counts steps.*fraction < 1"
    elif case == "valid labels":
        valid = tmp_path / "valid.csv"
        valid.write_text("sentence,topic\nalpha beta,net\nsocket file,sport\n")
        argv, want = ft + ["--valid-data", str(valid)], r"--valid-data .*valid\.csv has label\(s\) 'sport' that --data"
    elif case == "model folder":
        argv = ["finetune", "--model", str(tmp_path / "no-model"), *ft[3:]]
        want = r"error: --model '.*no-model': no such folder \(it is a local path"
    elif case == "checkpoint as model":
        (tmp_path / "run" / "checkpoint").mkdir(parents=True)
        (tmp_path / "run" / "checkpoint" / "trainer_state.json").write_text("{}")
        argv = ["analyze", "--base", str(tiny_model_dir), "--finetuned", str(tmp_path / "run" / "checkpoint"),
                "--out", str(out), "--no-progress"]
        want = r"^rankwise analyze: error: --finetuned .*checkpoint is a training checkpoint .*pass the --out folder"
    else:
        argv, want = ft + ["--rank", "0"], r"argument --rank: must be an integer >= 1"
    if case == "bad rank":  # argparse's own usage error: usage line + error line, exit 2
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and re.search(want, capsys.readouterr().err)
    else:
        fails(capsys, argv, want)
    assert not out.exists()


def test_debug_shows_the_traceback(tiny_model_dir, tiny_csv, tmp_path, capsys):
    argv = ["finetune", "--model", str(tiny_model_dir), "--data", str(tiny_csv), "--text-col", "nope",
            "--label-col", "topic", "--out", str(tmp_path / "x"), "--no-progress"]
    for with_debug in (["--debug"] + argv, argv + ["--debug"]):  # before or after the command
        assert main(with_debug) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "raise ConfigError" in err
        assert err.strip().splitlines()[-1].startswith("rankwise finetune: error: read_table: ")


def test_unexpected_errors_point_to_debug(monkeypatch, tmp_path, capsys):
    import rankwise.cli.finetune as ft

    def boom(args):
        raise RuntimeError("something broke\nin two lines")

    monkeypatch.setattr(ft, "run_finetune", boom)
    argv = ["finetune", "--model", "m", "--data", "d.csv", "--out", str(tmp_path / "x")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["rankwise finetune: unexpected error: RuntimeError: something broke in two "
                                        "lines (rerun with --debug for the traceback, and please report it)"]
    from rankwise.cli.main import run

    with pytest.raises(RuntimeError, match="something broke"):  # run(): the same command line, errors raised
        run(argv)


def test_error_in_a_real_process_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "rankwise.cli.main", "finetune", "--model", str(tmp_path),
                          "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"rankwise finetune: error: read_table: no such file: "
                                               f"{tmp_path / 'missing.csv'}"]


def test_readme_links_stay_in_the_repository():
    """Trial item 14: the README linked ``../shared/DESIGN.md``, a file outside the checkout."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    text = (root / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t) and t[0] != "#"]
    assert "docs/DESIGN.md" in targets
    for t in targets:
        path = (root / t.split("#")[0]).resolve()
        assert path.is_relative_to(root) and path.exists(), t
    assert "../" not in text
