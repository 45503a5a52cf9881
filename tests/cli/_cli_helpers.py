"""Shared pieces of the CLI tests: a tiny BERT classifier folder and a small labelled CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

WORDS = ["alpha", "beta", "gamma", "delta", "socket", "thread", "parse", "email", "json", "file"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"w{i}" for i in range(40)]


def tiny_classifier_dir(d: Path, num_labels: int = 2) -> Path:
    """A saved BertForSequenceClassification (hidden 32, 2 layers) and its WordPiece tokenizer.

    The tokenizer is built from a vocab dict: transformers 5 ignores ``vocab_file=`` (every word
    would become [UNK] and no task could be learned)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    from transformers.utils import logging

    logging.set_verbosity_error()
    d.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)})
    assert tok("alpha socket")["input_ids"] == [2, 5, 9, 3]
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    BertForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_csv(path: Path, n: int = 60, names=("net", "text"), text_col: str = "sentence",
              label_col: str = "topic") -> Path:
    """``n`` rows; class ``c`` draws 6 words from its own 5 (so the task is learnable); up to 9 classes."""
    g = torch.Generator().manual_seed(0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([text_col, label_col])
        for i in range(n):
            lab = i % len(names)
            words = [VOCAB[5 + int(j) + 5 * lab] for j in torch.randint(0, 5, (6,), generator=g)]
            w.writerow([" ".join(words), names[lab]])
    return path
