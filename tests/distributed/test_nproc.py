"""``rankwise pretrain --nproc 2`` and ``rankwise finetune --nproc 2``: the command re-runs itself through
torchrun on 2 CPU processes (gloo), ``rankwise.train.train`` wraps the model in DDP and gives each rank
half of every global batch, rank 0 writes the outputs. Oracle: the same command with ``--nproc 1`` (same
global batch of 4 windows / 8 sentences, same data order). The fine-tuned BERT has its dropout off
(each rank draws its masks from the same seed, so with dropout the two runs would differ by design).
Tolerance: the 2-process gradient is the mean of two half-batch means, summed in another order than the
whole-batch mean (and each rank pads its sentences to its own longest; padded keys get weight exactly 0),
so the weights after 3 AdamW steps agree to float rounding amplified by Adam's normalisation: atol 1e-5 on
weights of scale ~0.02-1 (measured: ~1e-7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from rankwise.cli.main import run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))  # the CLI tests' tiny BERT and CSV
from _cli_helpers import tiny_classifier_dir, write_csv  # noqa: E402

ARGS = ["pretrain", "--model-config", "llama-micro", "--parametrization", "full", "--optimizer", "adamw",
        "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--valid-tokens", "256", "--no-progress"]


def test_pretrain_on_two_processes_matches_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "rankwise.cli.main", *ARGS, "--nproc", "2",
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("saved to") == 1  # rank 0 alone writes and prints the summary
    run([*ARGS, "--nproc", "1", "--out", str(tmp_path / "one")])
    got, want = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert set(got) == set(want)
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-5, worst
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5, msg=k)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_finetune_on_two_processes_matches_one(tmp_path):
    model = tiny_classifier_dir(tmp_path / "bert")
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    data = write_csv(tmp_path / "train.csv", n=40, names=("net", "text", "zoo"))
    args = ["finetune", "--model", str(model), "--data", str(data), "--text-col", "sentence", "--label-col", "topic",
            "--method", "lora", "--rank", "4", "--dropout", "0", "--steps", "3", "--batch-size", "8",
            "--lr", "1e-2", "--eval-every", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "rankwise.cli.main", *args, "--nproc", "2",
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("saved to") == 1  # rank 0 alone writes and prints the summary
    assert run([*args, "--nproc", "1", "--out", str(tmp_path / "one")])["method"] == "lora"
    for name in ("adapter", "best"):
        got = load_file(tmp_path / "two" / name / "adapter_model.safetensors")
        want = load_file(tmp_path / "one" / name / "adapter_model.safetensors")
        assert set(got) == set(want) and any("classifier" in k for k in want)
        lora_b = [k for k in want if k.endswith("lora_B")]
        assert lora_b and all(want[k].abs().max() > 1e-3 for k in lora_b)  # B starts at 0: it trained
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5, msg=f"{name}/{k}")
    a = json.loads((tmp_path / "two" / "checkpoint" / "trainer_state.json").read_text())
    b = json.loads((tmp_path / "one" / "checkpoint" / "trainer_state.json").read_text())
    assert a["world_size"] == 2 and b["world_size"] == 1
    torch.testing.assert_close(torch.tensor(a["history"]["losses"]), torch.tensor(b["history"]["losses"]),
                               rtol=0, atol=1e-5)  # the logged loss is the mean over the ranks
    assert [s for s, _ in a["history"]["evals"]] == [s for s, _ in b["history"]["evals"]] == [3]
    for (_, ma), (_, mb) in zip(a["history"]["evals"], b["history"]["evals"]):  # every rank evaluates the same
        assert ma.keys() == mb.keys() and all(abs(ma[k] - mb[k]) < 1e-5 for k in mb), (ma, mb)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
