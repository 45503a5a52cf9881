"""``rankwise compress``: low-rank compression of a trained model, with the task metric before and after.

    rankwise compress --model runs/llama --method svd_llm --ratio 0.6 --calib demo --out runs/llama-svdllm

``--model``: a ``rankwise pretrain --out`` folder (byte-level LLaMA), a ``rankwise finetune --out`` folder
(its ``model/``, ``--method full``), or any Hugging Face causal-LM / sequence-classifier folder.

``--calib``: ``demo`` (causal LMs: the standard library's source as bytes or tokens; classifiers: the
demo task's training docstrings, :func:`rankwise.data.stdlib_docstrings`) or a UTF-8 text file, cut into
``--calib-samples`` windows of ``--max-length`` tokens (a shorter text is refused). Without ``--calib``
only the data-free methods run (``svd``, ``cur``, ``welore``, ``lorc``).

Metric: held-out perplexity for causal LMs (validation files of the standard library, never in the
calibration windows), accuracy on the demo task's validation docstrings for a classifier with the demo
task's labels (``rankwise finetune`` on the demo data, or ``benchmarks/compress.py``); otherwise none.

Writes into ``--out``: the compressed model (:func:`rankwise.compress.save`: ``compress_config.json``,
``model.safetensors``, ``config.json``, ``adapter/`` for eora / lorc), ``report.md`` (per-layer table and
totals), and with ``--export-hf`` a plain Hugging Face folder ``hf/``; eora / lorc also write
``adapter_peft/`` (PEFT format).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from ..errors import CalibrationError, ConfigError

OUT_NAMES = ("compress_config.json", "model.safetensors", "config.json", "adapter", "adapter_peft", "report.md", "hf",
             "tokenizer*", "vocab*", "special_tokens_map.json", "merges.txt", "generation_config.json", "README.md")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "tokenizer.model")


# ---------------------------------------------------------------------------------------------- model
def load_model(path: str):
    """``(model, tokenizer or None, kind)`` with kind ``"lm"`` or ``"classifier"``."""
    from ..integrations.hf import check_model_path

    p = Path(check_model_path(path))
    if (p / "labels.json").is_file() and (p / "model").is_dir():
        p = p / "model"  # a `rankwise finetune --method full` output folder
    if (p / "run.json").is_file() and (p / "model.safetensors").is_file() and not (p / "tokenizer_config.json").exists():
        from ..pretrain import load_pretrained

        return load_pretrained(p), None, "lm"
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"compress --model {path}: no config.json there; give a Hugging Face model folder, a "
                          "`rankwise pretrain --out` folder or a `rankwise finetune --out` folder.")
    arch = (json.loads(cfg_file.read_text()).get("architectures") or [""])[0]
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = None
    if any((p / f).exists() for f in TOKENIZER_FILES):
        tok = AutoTokenizer.from_pretrained(p)
    if arch.endswith("ForSequenceClassification"):
        return AutoModelForSequenceClassification.from_pretrained(p), tok, "classifier"
    return AutoModelForCausalLM.from_pretrained(p), tok, "lm"


# ---------------------------------------------------------------------------------------------- data
def _encode(tok, text: str) -> torch.Tensor:
    if tok is None:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def windows(ids: torch.Tensor, n: int, length: int, what: str) -> list[torch.Tensor]:
    need = n * length
    if ids.numel() < need:
        raise CalibrationError(f"compress: {what} is too short: {ids.numel()} tokens, and --calib-samples {n} × "
                               f"--max-length {length} needs {need}. Give a longer text or lower --calib-samples / "
                               "--max-length.")
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def calibration_batches(spec: str | None, model, tok, kind: str, n: int, length: int, batch_size: int = 4):
    """``(batches, loss_fn)`` for ``--calib`` (``None`` → no calibration)."""
    import torch.nn.functional as F

    if spec is None:
        return None, None
    if kind == "classifier" and spec == "demo":
        from ..data import stdlib_docstrings

        data = stdlib_docstrings(max_per_family=150)
        train, _ = data.split(valid_frac=0.25, seed=0)
        texts, labels = list(train.texts)[:n], list(train.labels)[:n]
        if len(texts) < n:
            raise CalibrationError(f"compress: the demo task has {len(texts)} training texts, fewer than --calib-samples {n}.")
        batches = []
        for i in range(0, n, batch_size):
            enc = tok(texts[i:i + batch_size], truncation=True, max_length=length, padding=True, return_tensors="pt")
            batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                            "labels": torch.tensor(labels[i:i + batch_size])})
    else:
        if spec == "demo":
            from .pretrain import stdlib_bytes

            stream = stdlib_bytes(n * length * 4, 1)[0]
            text = bytes(stream.tolist()).decode("utf-8", errors="replace")
            what = "the standard-library calibration text"
        else:
            path = Path(spec)
            if not path.is_file():
                raise FileNotFoundError(2, "No such file", spec)
            text = path.read_text(encoding="utf-8", errors="replace")
            what = f"calibration text {spec}"
        ws = windows(_encode(tok, text), n, length, what)
        batches = []
        for i in range(0, n, batch_size):
            ids = torch.stack(ws[i:i + batch_size])
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    if kind == "lm":
        def loss_fn(model, batch):
            return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    else:
        def loss_fn(model, batch):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch.get("labels")
            if labels is None:  # unlabeled text: the uncompressed model's own predictions as targets
                labels = out.detach().argmax(-1)
            return F.cross_entropy(out, labels)

    calib = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    return calib, (loss_fn, batches)


# ---------------------------------------------------------------------------------------------- metric
def metric_fn(model, tok, kind: str, eval_windows: int, length: int):
    """``(name, fn(model) -> float)`` or ``(None, None)``."""
    if kind == "lm":
        from .pretrain import stdlib_bytes

        valid = stdlib_bytes(1, eval_windows * length * 4)[1]
        ids = _encode(tok, bytes(valid.tolist()).decode("utf-8", errors="replace"))
        ws = windows(ids, eval_windows, length, "the held-out text")

        @torch.no_grad()
        def ppl(m) -> float:
            m.eval()
            total = 0.0
            for i in range(0, len(ws), 8):
                b = torch.stack(ws[i:i + 8])
                total += float(m(input_ids=b, labels=b).loss) * b.shape[0]
            return math.exp(min(total / len(ws), 50.0))

        return "perplexity", ppl
    from ..data import stdlib_docstrings

    data = stdlib_docstrings(max_per_family=150)
    if tok is None or getattr(model.config, "num_labels", None) != len(data.label_names):
        return None, None
    from ..integrations.hf import ClassificationTask

    _, valid = data.split(valid_frac=0.25, seed=0)
    task = ClassificationTask(tok, max_length=length)
    enc = task.encode(valid)
    return "accuracy", lambda m: task.accuracy(m, enc)


# ---------------------------------------------------------------------------------------------- run
def run(args):
    import rankwise as rw

    from .. import compress as rc
    from ..io.atomic import atomic_path, check_output_dir, write_text
    from ..utils.table import format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    check_output_dir(out, OUT_NAMES, "rankwise compress --out",
                     lambda d: (d / "compress_config.json").is_file() or (d / "report.md").is_file())
    t0 = time.perf_counter()
    model, tok, kind = load_model(args.model)
    if kind == "classifier" and args.calib not in (None, "demo") and tok is None:
        raise ConfigError("compress: the classifier folder has no tokenizer files; calibration text cannot be tokenized.")
    calib, extra = calibration_batches(args.calib, model, tok, kind, args.calib_samples, args.max_length)
    loss_fn = None
    if extra is not None:
        loss_fn = extra[0]
        if kind == "classifier" and args.calib == "demo":
            labelled = extra[1]
            calib = labelled  # keep labels for the loss; the forward ignores them
    name, metric = metric_fn(model, tok, kind, args.eval_windows, args.max_length)
    before = metric(model) if metric else None
    options = {}
    if args.method in ("eora", "lorc"):
        options["quant"] = args.quant
    if args.method == "cur":
        options["select"] = args.select
    ranks = json.loads(Path(args.ranks).read_text()) if args.ranks else None
    forward = None
    if calib is not None:
        from ..core.calibrate import Batches

        def forward(m, b):
            return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

        calib = Batches(calib, loss_fn=loss_fn, forward=forward, progress=not args.no_progress)
    report = rc.compress(model, args.method, ratio=args.ratio, rank=args.rank, energy=args.energy,
                         target_bytes=args.target_bytes, ranks=ranks, allocation=args.allocation, calibration=calib,
                         loss_fn=loss_fn, targets=_targets(args.targets), progress=not args.no_progress, **options)
    after = metric(model) if metric else None
    rc.save(model, out, report)
    src = Path(args.model)
    src = src / "model" if (src / "labels.json").is_file() and (src / "model").is_dir() else src
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            with atomic_path(out / f) as tmp:
                shutil.copyfile(src / f, tmp)
    if args.method in ("eora", "lorc"):
        rw.export_peft(model, out / "adapter_peft", name=report.adapter)
    if args.export_hf:
        rc.export(model, out / "hf")
    total = time.perf_counter() - t0
    summary = {"method": args.method, "layers": len(report), "params before": report.params_before,
               "params after": report.params_after, "bytes before": report.bytes_before,
               "bytes after": report.bytes_after,
               f"{name or 'metric'} before": _r(before), f"{name or 'metric'} after": _r(after),
               "compress s": round(report.seconds, 2), "total s": round(total, 1)}
    print(report.table())
    print()
    print(format_table([list(summary.values())], list(summary)))
    md = (f"# rankwise compress: {args.method} on {args.model}\n\n"
          + format_table([list(summary.values())], list(summary), markdown=True)
          + "\n\n## Per layer\n\n" + report.table(markdown=True) + "\n\n"
          + ("".join(f"- {n}\n" for n in report.notes) + "\n" if report.notes else "")
          + f"Rank rule: ratio={args.ratio}, rank={args.rank}, energy={args.energy}, target_bytes={args.target_bytes}, "
            f"allocation={args.allocation}; calibration: {args.calib or 'none'} ({args.calib_samples} × "
            f"{args.max_length} tokens). Metric: {name or 'none (not a demo-task classifier)'}.\n"
          + "\nLoad: `rankwise.compress.load(\"<this folder>\")`.\n")
    write_text(out / "report.md", md)
    print(f"saved to {out}")
    return {**summary, "report": report}


def _r(v):
    return None if v is None else round(v, 4)


def _targets(s: str):
    from .main import _targets as parse

    return parse(s)


def add_parser(sub) -> None:
    """Register ``rankwise compress``."""
    from ..compress import ALLOCATIONS, METHODS
    from .main import HelpFormatter, nonneg_int, positive_int

    p = sub.add_parser("compress", formatter_class=HelpFormatter,
                       help="low-rank compression of a trained model (svd, asvd, svd_llm, fwsvd, cur, welore, eora …); "
                            "metric and bytes before/after")
    p.add_argument("--model", required=True, help="model folder: rankwise pretrain / finetune output or a HF folder")
    p.add_argument("--method", default="svd_llm", help=f"one of {', '.join(m for m in METHODS if m not in ('extract', 'compeft'))}")
    p.add_argument("--ratio", type=float, default=None,
                   help="fraction of each compressed layer's parameters kept, in (0, 1] (0.6 = 40%% compression)")
    p.add_argument("--rank", type=positive_int, default=None, help="one rank for every layer (eora / lorc: required)")
    p.add_argument("--energy", type=float, default=None, help="keep this fraction of each layer's spectral energy")
    p.add_argument("--target-bytes", type=positive_int, default=None, help="bytes the whole compressed model stores")
    p.add_argument("--ranks", default=None, help="JSON file {module name, suffix or regex: rank}")
    p.add_argument("--allocation", default="uniform", choices=ALLOCATIONS, help="how a ratio / bytes budget is spread")
    p.add_argument("--calib", default=None, help="calibration: 'demo' or a UTF-8 text file (default: none)")
    p.add_argument("--calib-samples", type=positive_int, default=16, help="calibration windows (or texts)")
    p.add_argument("--max-length", type=positive_int, default=128, help="tokens per calibration / evaluation window")
    p.add_argument("--eval-windows", type=positive_int, default=32, help="held-out windows for the perplexity")
    p.add_argument("--targets", default="all-linear", help="'all-linear', a comma list of suffixes, or a regex")
    p.add_argument("--quant", default="int4", help="eora / lorc: nf4, int4 or int8")
    p.add_argument("--select", default="deim", help="cur: deim or leverage")
    p.add_argument("--export-hf", action="store_true", help="also write out/hf, a plain Hugging Face folder")
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
