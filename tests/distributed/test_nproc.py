"""``rankwise pretrain --nproc 2``: the command re-runs itself through torchrun on 2 CPU processes
(gloo), ``rankwise.train.train`` wraps the model in DDP and gives each rank half of every global
batch, rank 0 writes the outputs. Oracle: the same command with ``--nproc 1`` (same global batch of
4 windows, same data order). Tolerance: the 2-process gradient is the mean of two half-batch means,
summed in another order than the whole-batch mean, so the weights after 3 AdamW steps agree to float
rounding amplified by Adam's normalisation: atol 1e-5 on weights of scale ~0.02-1 (measured: ~1e-7)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from rankwise.cli.main import run

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
    init = load_file(tmp_path / "one" / "model.safetensors")
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-5, worst
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5, msg=k)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    del init
