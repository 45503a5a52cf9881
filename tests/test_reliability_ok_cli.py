"""Reliability cases the review found OK (``/work/shared/reviews/reliability.md``) that need the command
line (``rankwise finetune`` / ``rankwise analyze`` on a tiny saved BERT folder) or a resumed training
run, re-run as tests.

Each test reproduces one row's input and asserts the row's expectation: refused with an error that
names the problem and the fix, the model folders, adapter folders and ``--out`` left as they were and
no code from a file run; or, where the row expects it to work, the result checked against an
independent one (the same run into a fresh folder, an uninterrupted run, the base model itself).
``rankwise.cli.main.run`` is the command line without its one-line error printing: errors raise.
``benchmarks/reliability.py`` collects the tests by the case id in their docstrings.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import rankwise as rw
from rankwise.cli.main import run
from rankwise.core.api import adapter_state
from rankwise.errors import ConfigError, CorruptFileError, ShapeMismatchError, TargetError
from rankwise.train import TrainConfig, load_checkpoint, train

sys.path.insert(0, str(Path(__file__).parent / "cli"))
from _cli_helpers import tiny_classifier_dir, write_csv  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------ helpers
def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class _Payload:
    """A pickle that creates ``marker`` when unpickled: it must never be."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny BertForSequenceClassification (hidden 32, 2 layers, 2 labels) with its tokenizer."""
    return tiny_classifier_dir(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("data") / "train.csv", n=24)


def _finetune(model, data, out, *extra):
    return ["finetune", "--model", str(model), "--data", str(data), "--text-col", "sentence", "--label-col", "topic",
            "--steps", "2", "--batch-size", "4", "--rank", "2", "--out", str(out), "--no-progress", *extra]


def _analyze(base, out, *extra):
    return ["analyze", "--base", str(base), "--out", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def run_dir(model_dir, data, tmp_path_factory):
    """The --out folder of a 2-step ``rankwise finetune`` lora run (adapter/, labels.json, checkpoint/ …)."""
    out = tmp_path_factory.mktemp("run") / "lora"
    run(_finetune(model_dir, data, out))
    return out


def _refused(argv, error, match: str, out: Path, *folders: Path) -> str:
    """``run(argv)`` raises ``error`` matching ``match``; ``out`` is not created and ``folders`` are unchanged."""
    before = [_files(f) for f in folders]
    with pytest.raises(error, match=match) as e:
        run(argv)
    assert not out.exists(), f"{out} was written"
    assert [_files(f) for f in folders] == before, "an input folder was changed"
    return str(e.value)


# ------------------------------------------------------------------------------------ pickles / code
def test_pickled_model_weights_are_refused_unread(model_dir, data, tmp_path):
    """Reliability case P7: a model folder whose weights are a ``pytorch_model.bin`` holding a pickle
    payload, given to ``finetune --model`` and ``analyze --finetuned``: refused (torch's
    ``weights_only`` unpickler), the payload never runs, nothing is written."""
    import pickle

    evil = tmp_path / "evil"
    shutil.copytree(model_dir, evil)
    weights = load_file(str(evil / "model.safetensors"))
    (evil / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    torch.save({**weights, "payload": _Payload(marker)}, evil / "pytorch_model.bin")
    _refused(_finetune(evil, data, tmp_path / "out"), pickle.UnpicklingError, r"weights_only", tmp_path / "out", evil)
    assert not marker.exists()
    _refused(_analyze(model_dir, tmp_path / "rep", "--finetuned", str(evil)), pickle.UnpicklingError,
             r"weights_only", tmp_path / "rep", evil, model_dir)
    assert not marker.exists()


def test_pickled_model_weights_are_a_user_error_on_the_command_line(model_dir, data, tmp_path, capsys):
    """Reliability case P7 through ``main``: one line naming the fix, exit 2 (not "unexpected error")."""
    from rankwise.cli.main import main

    evil = tmp_path / "evil"
    shutil.copytree(model_dir, evil)
    weights = load_file(str(evil / "model.safetensors"))
    (evil / "model.safetensors").unlink()
    torch.save({**weights, "payload": _Payload(tmp_path / "MARKER")}, evil / "pytorch_model.bin")
    assert main(_finetune(evil, data, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "never unpickles" in err and "model.safetensors" in err
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "out").exists()


def test_auto_map_code_in_the_model_folder_is_never_imported(model_dir, data, tmp_path):
    """Reliability case P8: a model folder whose ``config.json`` has an ``auto_map`` to a local .py
    that creates a marker file when imported: ``finetune`` and ``analyze`` run it as the plain BERT it
    declares (no ``trust_remote_code``), the .py is never imported. Oracles: the run loads back as a
    ``BertForSequenceClassification``, and ``analyze --finetuned`` of the folder against the original
    BERT finds no weight changed."""
    from rankwise.cli.finetune import load_run

    code = tmp_path / "code"
    shutil.copytree(model_dir, code)
    marker = tmp_path / "MARKER"
    (code / "evil_model.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n"
                                        "from transformers import BertConfig as EvilConfig\n"
                                        "from transformers import BertForSequenceClassification as EvilModel\n")
    cfg = json.loads((code / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModel": "evil_model.EvilModel",
                       "AutoModelForSequenceClassification": "evil_model.EvilModel"}
    (code / "config.json").write_text(json.dumps(cfg))

    run(_finetune(code, data, tmp_path / "out"))
    assert not marker.exists()
    model, _ = load_run(tmp_path / "out")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert list(adapter_state(model)) == ["default"]  # the adapter loaded onto the plain BERT's modules
    summary = run(_analyze(model_dir, tmp_path / "rep", "--finetuned", str(code)))
    assert not marker.exists()
    assert summary["code"]["relative weight change"] == 0.0 and summary["code"]["layers"] > 0
    assert not any("evil_model" in name for name in sys.modules)


# --------------------------------------------------------------------------------- analyze inputs
@pytest.mark.parametrize("kind", ["missing", "file", "empty", "model folder"])
def test_analyze_adapter_that_is_not_an_adapter_folder(model_dir, tmp_path, kind):
    """Reliability case AN1: ``--adapter`` a non-existent folder, a file, an empty folder, a plain
    model folder: refused naming the path and what to pass, before any analysis; nothing written."""
    path = {"missing": tmp_path / "nope", "file": tmp_path / "notes.txt", "empty": tmp_path / "empty",
            "model folder": model_dir}[kind]
    if kind == "file":
        path.write_text("my notes")
    if kind == "empty":
        path.mkdir()
    error, match = {
        "missing": (FileNotFoundError, r"--adapter .*nope: no such folder; check the path"),
        "file": (CorruptFileError, r"notes\.txt has no adapter_config\.json; pass a folder written by rw\.save"),
        "empty": (CorruptFileError, r"empty has no adapter_config\.json; pass a folder written by rw\.save"),
        "model folder": (ConfigError, r"is a full model folder, not an adapter; pass it with --finetuned"),
    }[kind]
    _refused(_analyze(model_dir, tmp_path / "rep", "--adapter", str(path)), error, match, tmp_path / "rep", model_dir)
    if kind == "file":
        assert path.read_text() == "my notes"


@pytest.mark.parametrize("damage", ["truncated weights", "broken JSON"])
def test_analyze_damaged_adapter_is_refused(model_dir, run_dir, tmp_path, damage):
    """Reliability case AN2: ``--adapter`` with truncated weights (SHA-256 mismatch) or a broken
    ``adapter_config.json``: a CorruptFileError naming the file, before any analysis; nothing written."""
    ad = tmp_path / "ad"
    shutil.copytree(run_dir / "adapter", ad)
    if damage == "truncated weights":
        w = ad / "adapter_model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        match = r"adapter_model\.safetensors is corrupted or truncated: SHA-256 .*Restore the file or save it again"
    else:
        c = ad / "adapter_config.json"
        c.write_text(c.read_text()[:40])
        match = r"adapter_config\.json is not valid JSON"
    _refused(_analyze(model_dir, tmp_path / "rep", "--adapter", str(ad)), CorruptFileError, match,
             tmp_path / "rep", ad, model_dir)


def test_analyze_needs_a_model_and_base_against_itself_is_zero(model_dir, tmp_path):
    """Reliability case AN3: no ``--adapter`` / ``--finetuned`` is refused naming both flags; the base
    given as ``--finetuned`` gives a report in which nothing changed (oracle: ΔW = W - W = 0)."""
    _refused(_analyze(model_dir, tmp_path / "rep"), ConfigError,
             r"pass --adapter <dir> \(one or more\) or --finetuned <model folder>", tmp_path / "rep", model_dir)
    before = _files(model_dir)
    summary = run(_analyze(model_dir, tmp_path / "rep", "--finetuned", str(model_dir)))
    (name, s), = summary.items()
    assert s["layers"] > 0
    assert s["relative weight change"] == 0.0 and s["median rank ΔW"] == 0 and s["intruders (total)"] == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.startswith("# rankwise analyze") and name in md
    assert (tmp_path / "rep" / "report.html").is_file()
    assert _files(model_dir) == before


def test_analyze_adapter_of_another_architecture_is_refused(model_dir, run_dir, llama, tmp_path):
    """Reliability case AN4: an adapter trained on a Llama given with a BERT base (no model class has
    its modules), and a BERT adapter / fine-tuned BERT with a base of other dimensions (hidden 48):
    refused naming the module and the shapes, before any analysis; nothing written."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    llama_ad = tmp_path / "llama_ad"
    rw.save(rw.adapt(llama(0), "lora", rank=2, targets=["q_proj", "v_proj"], seed=0), llama_ad)
    _refused(_analyze(model_dir, tmp_path / "rep", "--adapter", str(llama_ad)), ConfigError,
             r"none of AutoModel, .* has the modules the adapter names \(e\.g\. 'model\.layers\.0\.self_attn\..*'\); "
             r"pass the base model the adapter was trained on", tmp_path / "rep", llama_ad, model_dir)

    wide = tmp_path / "bert48"
    cfg = BertConfig.from_pretrained(model_dir)
    cfg.hidden_size, cfg.intermediate_size = 48, 96
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(wide)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(wide)
    _refused(_analyze(wide, tmp_path / "rep", "--adapter", str(run_dir)), ShapeMismatchError,
             r"module 'bert\..*': the saved adapter 'default' was made for weight shape \(32, 32\), but this "
             r"model's weight is \(48, 48\)\. Load it onto the same architecture", tmp_path / "rep", run_dir, wide)
    _refused(_analyze(wide, tmp_path / "rep", "--finetuned", str(model_dir)), ShapeMismatchError,
             r"base weight \(48, 48\), fine-tuned \(32, 32\); compare models of the same architecture",
             tmp_path / "rep", model_dir, wide)


@pytest.mark.parametrize("case", ["layers match nothing", "invalid regex", "empty data", "header-only data"])
def test_analyze_bad_option_values_are_refused(model_dir, run_dir, tmp_path, case):
    """Reliability case AN7: ``--layers`` matching nothing or not a regex, an empty ``--data`` file or
    one with a header only: a TargetError / ConfigError naming the value; nothing written."""
    extra, error, match = {
        "layers match nothing": (["--layers", "zzz"], TargetError, r"no layers to analyze \(layers='zzz'"),
        "invalid regex": (["--layers", "(["], ConfigError, r"layers='\(\[' is not a valid regular expression"),
        "empty data": (["--data", "empty.csv"], ConfigError, r"empty\.csv is empty; it needs a header row"),
        "header-only data": (["--data", "header.csv"], ConfigError, r"header\.csv has no data rows"),
    }[case]
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("text,label\n")
    extra = [str(tmp_path / e) if e.endswith(".csv") else e for e in extra]
    _refused(_analyze(model_dir, tmp_path / "rep", "--adapter", str(run_dir), *extra), error, match,
             tmp_path / "rep", run_dir, model_dir)


@pytest.mark.parametrize("flag,value", [("--rank", "0"), ("--top-k", "-1")])
def test_analyze_non_positive_counts_are_usage_errors(model_dir, run_dir, tmp_path, capsys, flag, value):
    """Reliability case AN7: ``--rank 0`` and ``--top-k -1`` are refused by the argument parser (exit
    code 2) naming the flag and the allowed range; nothing written."""
    with pytest.raises(SystemExit) as e:
        run(_analyze(model_dir, tmp_path / "rep", "--adapter", str(run_dir), flag, value))
    assert e.value.code == 2
    assert f"argument {flag}: must be an integer >= 1, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()


# ----------------------------------------------------------------------------------------- resume
def test_second_run_into_the_same_out_starts_anew(model_dir, data, tmp_path):
    """Reliability case R6: a second ``finetune`` into the same ``--out`` without ``--resume`` (by
    design) replaces the adapter and the checkpoint with those of a run from step 0. Oracle: the same
    second command into a fresh folder gives bitwise the same adapter and checkpoint history."""
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    run(_finetune(model_dir, data, out, "--seed", "0"))
    first = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    second = ["--seed", "1", "--steps", "3"]
    run(_finetune(model_dir, data, out, *second))
    run(_finetune(model_dir, data, fresh, *second))
    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(fresh / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(got[k], first[k]) for k in first)
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    fresh_state = json.loads((fresh / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3 and len(state["history"]["losses"]) == 3
    assert state["history"]["losses"] == fresh_state["history"]["losses"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh))  # no stray temporaries or old copies


def _xy(n: int = 32, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return [(x[i], int(y)) for i, y in enumerate(torch.randint(0, classes, (n,), generator=g))]


def _collate(items):
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _adapted(method: str = "lora", rank: int = 4, targets=("0",), classes: int = 3):
    """A 6→16→16→classes net with an adapter on ``targets`` and the head ``4`` trained fully; ``method``
    "full": no adapter, every parameter trainable."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, classes))
    if method == "full":
        return net
    return rw.adapt(net, method, rank=rank, targets=list(targets), modules_to_save=["4"], seed=0)


@pytest.mark.parametrize("change,match", [
    (dict(rank=2), r"parameter '0\.adapters\.default\.lora_A' has shape \(4, 6\) in .* but shape \(2, 6\) in "
                   r"the model; build the model \(and adapters, rank\) as in the run that wrote the checkpoint"),
    (dict(method="dora"), r"has no value for trainable parameter\(s\) '0\.adapters\.default\.magnitude'.*adapt "
                          r"the model the same way as the run that wrote the checkpoint"),
    (dict(method="full"), r"holds parameter\(s\) '0\.adapters\.default\.lora_A' \(4, 6\).* that are not trainable "
                          r"parameters of the model.*Adapt \(or unfreeze\) the model the same way"),
    (dict(targets=("2",)), r"holds parameter\(s\) '0\.adapters\.default\.lora_A'.* that are not trainable "
                           r"parameters of the model.*Adapt \(or unfreeze\) the model the same way"),
    (dict(classes=4), r"parameter '4\..*weight' has shape \(3, 16\) in .* but shape \(4, 16\) in the model"),
])
def test_resume_with_another_model_is_refused(tmp_path, change, match):
    """Reliability case R1: resuming a checkpoint with another rank, another method (DoRA, full
    fine-tuning), other target modules, or a head for 4 labels instead of 3: a ShapeMismatchError
    naming the parameter, both shapes and the fix, raised by ``train(resume=True)`` (and by
    ``load_checkpoint``) before the model or the checkpoint changes."""
    ck = tmp_path / "ck"
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-2, checkpoint_every=2)
    train(_adapted(), _xy(), _collate, _ce, cfg, checkpoint_dir=ck, progress=False)
    files = _files(ck)
    other = _adapted(**change)
    data = _xy(classes=change.get("classes", 3))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ShapeMismatchError, match=r"load_checkpoint: .*" + match):
        train(other, data, _collate, _ce, TrainConfig(steps=4, batch_size=8, lr=1e-2, checkpoint_every=2),
              checkpoint_dir=ck, resume=True, progress=False)
    opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
    with pytest.raises(ShapeMismatchError, match=match):
        load_checkpoint(ck, other, opt)
    after = other.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "the model was changed"
    assert not opt.state
    assert _files(ck) == files and sorted(os.listdir(tmp_path)) == ["ck"]


@pytest.mark.parametrize("field,new", [("lr", 0.003), ("seed", 5), ("batch_size", 4)])
def test_resume_with_another_training_config_warns(tmp_path, field, new):
    """Reliability case R2: resuming with another learning rate, seed or batch size warns, naming the
    field with its old and new values; the run continues to the requested step. The same config
    resumes silently (control)."""
    old = dict(steps=2, batch_size=8, lr=1e-2, seed=0, checkpoint_every=2)
    train(_adapted(), _xy(), _collate, _ce, TrainConfig(**old), checkpoint_dir=tmp_path / "ck", progress=False)
    shutil.copytree(tmp_path / "ck", tmp_path / "same")
    with pytest.warns(UserWarning, match=rf"resuming from .*ck with a different config \({field}: "
                                         rf"{old[field]!r} -> {new!r}\); the run will not match an uninterrupted"):
        result = train(_adapted(), _xy(), _collate, _ce, TrainConfig(**{**old, "steps": 4, field: new}),
                       checkpoint_dir=tmp_path / "ck", resume=True, progress=False)
    assert result.steps == 4 and len(result.losses) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = train(_adapted(), _xy(), _collate, _ce, TrainConfig(**{**old, "steps": 4}),
                       checkpoint_dir=tmp_path / "same", resume=True, progress=False)
    assert result.steps == 4


# --------------------------------------------------------------------------------------- disk full
def _disk_full(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.safetensors", "trainer_state.json"])
def test_disk_full_during_a_resumed_run_keeps_the_last_checkpoint(tmp_path, monkeypatch, victim):
    """Reliability case DF2: ``train(..., resume=True)`` whose next checkpoint write runs out of disk
    space (ENOSPC while writing ``victim``, after half of its bytes): the OSError says "No space left on
    device", the previous checkpoint is intact (same bytes, no temporaries left), and once space is
    free the same resume finishes with exactly the losses of an uninterrupted run (the oracle)."""
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, checkpoint_every=2)
    want = train(_adapted(), _xy(), _collate, _ce, cfg, progress=False).losses

    calls = {"n": 0}

    def crashing(model, batch):  # the first run dies at step 3, after the step-2 checkpoint
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return _ce(model, batch)

    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        train(_adapted(), _xy(), _collate, crashing, cfg, checkpoint_dir=ck, progress=False)
    files = _files(ck)
    assert json.loads(files["trainer_state.json"])["step"] == 2

    real_save, real_write = safetensors.torch.save_file, pathlib.Path.write_text

    def half_then_full(data: bytes, path):
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise _disk_full(path)

    def save_file(tensors, filename, metadata=None):
        if Path(filename).name.startswith(f".{victim}."):
            half_then_full(safetensors.torch.save(tensors, metadata=metadata), filename)
        return real_save(tensors, filename, metadata=metadata)

    def write_text(self, text, *a, **k):
        if self.name.startswith(f".{victim}."):
            half_then_full(text.encode(), self)
        return real_write(self, text, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    with pytest.raises(OSError, match="No space left on device") as e:
        train(_adapted(), _xy(), _collate, _ce, cfg, checkpoint_dir=ck, resume=True, progress=False)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert _files(ck) == files, "the last checkpoint was changed"
    assert sorted(os.listdir(tmp_path)) == ["ck"], "a temporary was left behind"

    resumed = train(_adapted(), _xy(), _collate, _ce, cfg, checkpoint_dir=ck, resume=True, progress=False)
    assert resumed.losses == want


@pytest.mark.parametrize("change, field", [(["--method", "dora"], "method"), (["--method", "full"], "method"),
                                           ("other labels", "id2label")])
def test_resume_with_another_method_or_labels_leaves_the_run_loadable(model_dir, data, tmp_path, change, field):
    """Reliability case R1 through the CLI: ``finetune --resume`` with another method or other labels is
    refused before any file changes — ``labels.json`` was rewritten first, so the earlier run no
    longer loaded. Oracle: every file of ``--out`` byte-identical, and ``load_run`` still works."""
    from rankwise.cli.finetune import load_run

    out = tmp_path / "out"
    run(_finetune(model_dir, data, out))
    before = _files(out)
    if change == "other labels":
        argv = _finetune(model_dir, write_csv(tmp_path / "other.csv", n=24, names=("a", "b", "c")), out)
    else:
        argv = [*_finetune(model_dir, data, out), *change]
    with pytest.raises(ConfigError, match=rf"--resume: .* was trained with {field} = .*pass the same"):
        run([*argv, "--resume"])
    assert _files(out) == before
    model, _ = load_run(out)
    assert list(model.config.id2label.values()) == ["net", "text"]
