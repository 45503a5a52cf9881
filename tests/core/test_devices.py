"""Which device and backend a process of a run uses (``rankwise.core.distributed.device_for`` /
``backend_for``), and the ``--device`` option of ``rankwise pretrain`` / ``finetune``.

CI has no GPU: the CUDA answers are checked with ``torch.cuda.is_available`` patched (no CUDA call is
made: only ``torch.device`` objects are built); the CPU path runs for real, on the same tiny LLaMA as
``tests/cli/test_pretrain_cli.py``, and is compared with the default (``auto``: the CPU here).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rankwise.cli.main import main
from rankwise.core.distributed import backend_for, device_for
from rankwise.errors import ConfigError
from rankwise.integrations.hf import ClassificationTask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))  # the CLI tests' tiny BERT and CSV
from _cli_helpers import tiny_classifier_dir, write_csv  # noqa: E402


@pytest.fixture
def gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")


def test_auto_is_this_process_gpu_under_a_launcher(gpus):
    assert device_for("auto") == torch.device("cuda", 3)  # torchrun's LOCAL_RANK: one GPU per process
    assert device_for("cuda") == torch.device("cuda", 3)
    assert device_for("cuda:1") == torch.device("cuda", 1)  # as written
    assert device_for("cpu") == torch.device("cpu")
    assert backend_for(device_for("auto")) == "nccl" and backend_for(torch.device("cpu")) == "gloo"


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_for("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"device 'cuda': CUDA is not available.*--device cpu"):
        device_for("cuda")
    with pytest.raises(ConfigError, match=r"device 'gpu0' is not a torch device.*auto, cpu, cuda"):
        device_for("gpu0")


def test_classification_batches_are_made_on_the_task_device():
    class Tok:
        pad_token_id = 0

    batch = ClassificationTask(Tok(), device="meta").collate([([5, 6, 7], 1), ([8], 0)])
    assert {k: v.device.type for k, v in batch.items()} == dict.fromkeys(("input_ids", "attention_mask", "labels"),
                                                                          "meta")
    plain = ClassificationTask(Tok()).collate([([5, 6, 7], 1), ([8], 0)])  # default: where torch makes them
    assert plain["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]] and plain["labels"].device.type == "cpu"


def test_pretrain_device_option(tmp_path, monkeypatch):
    """--device cpu trains exactly as the default here; --device cuda without CUDA stops before any file."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "num_key_value_heads": 2}))

    def args(out, *extra):
        return ["pretrain", "--model-config", str(cfg), "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                "--valid-tokens", "128", "--no-progress", "--threads", "1", "--out", str(out), *extra]

    assert main(args(tmp_path / "auto")) == 0
    assert main(args(tmp_path / "cpu", "--device", "cpu")) == 0
    a, b = load_file(tmp_path / "auto" / "model.safetensors"), load_file(tmp_path / "cpu" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert main(args(tmp_path / "gpu", "--device", "cuda")) == 2
    assert not (tmp_path / "gpu").exists()


def test_finetune_device_option(tmp_path, monkeypatch):
    """The same for rankwise finetune: its model, adapters and batches on --device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, data = tiny_classifier_dir(tmp_path / "bert"), write_csv(tmp_path / "d.csv")

    def args(out, *extra):
        return ["finetune", "--model", str(model), "--data", str(data), "--method", "lora", "--steps", "3",
                "--batch-size", "8", "--text-col", "sentence", "--label-col", "topic", "--no-progress", "--out", str(out),
                *extra]

    assert main(args(tmp_path / "auto")) == 0
    assert main(args(tmp_path / "cpu", "--device", "cpu")) == 0
    a = load_file(tmp_path / "auto" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cpu" / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert main(args(tmp_path / "gpu", "--device", "cuda:0")) == 2
    assert not (tmp_path / "gpu").exists()
