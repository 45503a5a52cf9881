"""Load a model saved by ``rankwise pretrain`` in one call, and export it as a plain Hugging Face folder.

    import rankwise.pretrain as rp

    model = rp.load_pretrained("runs/sltrain")          # a LlamaForCausalLM, eval mode
    model.generate(torch.tensor([[105, 109]]), max_new_tokens=20, do_sample=False)
    rp.export_dense("runs/sltrain", "runs/sltrain-hf")  # AutoModelForCausalLM.from_pretrained loads it

What ``rankwise pretrain --out`` holds (see :mod:`rankwise.cli.pretrain`): ``config.json`` (the
model config, ``model.config.to_dict()``), ``model.safetensors`` (the final weights) and
``run.json`` (the run's settings: parametrization and its options, seed, targets). Every
parametrization with a dense weight is saved dense (:func:`rankwise.pretrain.to_dense`), so the
folder is a plain model; CoLA (``W x ↦ B σ(A x)``, no dense weight for a nonlinear ``σ``) is saved
factorized and :func:`load_pretrained` rebuilds it with :func:`rankwise.pretrain.parametrize` from
``run.json`` before loading the weights. :func:`export_dense` refuses CoLA with a nonlinear
bottleneck (a plain model cannot hold it).

Reads go through :mod:`rankwise.io.atomic` (a missing or damaged file is a
:class:`~rankwise.errors.CorruptFileError` naming the fix) and the export is one
:func:`~rankwise.io.atomic.atomic_dir` swap: the folder is complete or not there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, CorruptFileError, ShapeMismatchError

__all__ = ["HF_NAMES", "export_dense", "is_hf_dir", "load_pretrained"]

#: What an exported folder holds (a folder with only these may be replaced).
HF_NAMES = ("config.json", "model.safetensors", "generation_config.json")


def is_hf_dir(path: Path) -> bool:
    """A Hugging Face model folder: ``config.json`` is a JSON object with a ``model_type``."""
    try:
        return "model_type" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _read(out: Path) -> tuple[dict, dict | None, dict]:
    from ..io.atomic import read_dir, read_json, read_tensors

    fix = "pass the --out folder of a finished `rankwise pretrain` run (it holds config.json and model.safetensors)."

    def read(d: Path):
        if not d.is_dir():
            raise CorruptFileError(f"load_pretrained: {d} is not a folder; {fix}")
        config = read_json(d / "config.json", fix)
        record = read_json(d / "run.json", fix) if (d / "run.json").is_file() else None
        return config, record, read_tensors(d / "model.safetensors", fix)

    config, record, tensors = read_dir(out, read)
    if not isinstance(config, dict) or "model_type" not in config:
        raise CorruptFileError(f"load_pretrained: {out / 'config.json'} has no model_type; {fix}")
    return config, record, tensors


def _build(config: dict):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    fields = dict(config)
    model_type = fields.pop("model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **fields)
    except ValueError as e:
        raise ConfigError(f"load_pretrained: config.json has model_type {model_type!r}, which this transformers "
                          f"install does not know ({e}).") from None
    return AutoModelForCausalLM.from_config(cfg)


def load_pretrained(out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None) -> nn.Module:
    """The model a ``rankwise pretrain`` run saved in ``out_dir``, ready for evaluation and
    ``generate()`` (eval mode): a dense causal LM (``LlamaForCausalLM`` for the built-in configs),
    or, for CoLA, the same model with its CoLA layers rebuilt from ``run.json``. ``dtype`` /
    ``device``: cast / move after loading (default: as saved, on the CPU).

    Every weight must match: a missing, extra or differently shaped tensor is a
    :class:`~rankwise.errors.ShapeMismatchError` (the folder is not this model's)."""
    out = Path(out_dir)
    config, record, tensors = _read(out)
    model = _build(config)
    expected = model.state_dict()
    if set(tensors) != set(expected):
        name = (record or {}).get("parametrization")
        if name in (None, "full"):
            extra = sorted(set(tensors) - set(expected))[:3]
            raise ShapeMismatchError(f"load_pretrained: {out / 'model.safetensors'} holds tensors the model of "
                                     f"config.json has not ({', '.join(extra) or 'none'}; missing "
                                     f"{', '.join(sorted(set(expected) - set(tensors))[:3]) or 'none'}) and "
                                     f"{out / 'run.json'} names no parametrization; the folder is damaged or mixed.")
        from . import parametrize

        parametrize(model, name, targets=record.get("targets"), seed=int(record.get("seed", 0)),
                    **record.get("parametrization options", {}))
        expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    bad = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or extra or bad:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra else
                f"{bad[0]} has shape {tuple(tensors[bad[0]].shape)}, the model {tuple(expected[bad[0]].shape)}")
        raise ShapeMismatchError(f"load_pretrained: {out / 'model.safetensors'} does not fit the model of "
                                 f"config.json / run.json ({what}); the folder is damaged or mixed.")
    model.load_state_dict(tensors, strict=True)
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def export_dense(out_dir: str | os.PathLike, hf_dir: str | os.PathLike) -> Path:
    """Write the model of ``out_dir`` (a ``rankwise pretrain`` folder) to ``hf_dir`` as a plain Hugging
    Face folder (``config.json`` with ``architectures``, ``model.safetensors``,
    ``generation_config.json``) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads
    without rankwise. Atomic: ``hf_dir`` appears complete or not at all; an existing folder is
    replaced only if it is an export (nothing else in it). CoLA with a nonlinear bottleneck has no
    dense form: a :class:`~rankwise.errors.ConfigError`, nothing written. Returns ``hf_dir``."""
    from ..io.atomic import atomic_dir, check_output_dir, save_tensors, write_json

    hf = Path(hf_dir)
    check_output_dir(hf, HF_NAMES, "export_dense hf_dir", is_hf_dir)  # before the (slower) load
    model = load_pretrained(out_dir)
    if getattr(model, "_rankwise_pretrain", None) is not None:
        from . import to_dense

        try:
            to_dense(model)
        except ConfigError as e:
            raise ConfigError(f"export_dense: the model in {out_dir} has no dense form ({e}); load it with "
                              "rankwise.pretrain.load_pretrained instead. Nothing was written.") from None
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    gen = model.generation_config.to_dict() if getattr(model, "generation_config", None) is not None else {}
    with atomic_dir(hf, HF_NAMES, "export_dense hf_dir", is_hf_dir) as tmp:
        save_tensors(tmp / "model.safetensors", dict(model.state_dict()), metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", gen)
    return hf
