"""``rankwise finetune``: one method on the user's own CSV/JSONL and model.

What it writes into ``--out`` (every file atomically):

- ``adapter/``: the final adapter (``rw.save`` format) and the trained head (``modules_to_save``);
  with ``--method full`` instead ``model/``: a ``save_pretrained`` folder with the tokenizer, which
  ``AutoModelForSequenceClassification.from_pretrained`` and ``rankwise analyze --finetuned`` load.
- ``best/``: the same kind of folder at the evaluation (every ``--eval-every`` steps and at the end)
  with the highest validation accuracy, the earliest on ties: the Trainer's
  ``load_best_model_at_end`` with ``metric_for_best_model="accuracy"``, kept beside the final one.
- ``labels.json``: ``id2label`` / ``label2id`` (the model's head order), the base model, the
  method and the columns; :func:`load_run` reads it, so predictions carry label names. A full
  fine-tune's ``config.json`` holds the same ``id2label``.
- ``checkpoint/`` (for ``--resume``), ``report.md`` and ``loss_curves.png`` (per-step loss, its EMA and
  the validation points).

The validation split is drawn with ``--split-seed`` (default 0), not ``--seed``, so runs that differ
only in ``--seed`` are scored on the same rows.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError

OUT_NAMES = ("adapter", "model", "best", "checkpoint", "labels.json", "report.md", "loss_curves.png")
LABELS_FILE = "labels.json"
LABELS_FORMAT = "rankwise-finetune-labels/1"


def run_finetune(args) -> dict:
    from ..core import distributed as rd
    from ..data import read_table
    from ..integrations.hf import ClassificationTask, check_model_path, load_sequence_classifier
    from ..io.atomic import write_json
    from ..train import TrainConfig, has_checkpoint, train
    from . import common
    from .common import (
        FULL,
        check_out,
        default_lr,
        method_options,
        prepare,
        print_table,
        trainable_count,
        write_report,
    )
    from .main import _targets

    full = args.method == FULL
    device = rd.device_for(getattr(args, "device", "auto"))  # checked before any process starts
    if getattr(args, "nproc", 1) > 1 and not rd.launched():  # re-run this command on N processes (torchrun)
        check_out(args.out, "finetune", OUT_NAMES, adapters=("adapter", "best"), models=("model", "best"))
        return rd.relaunch(args.nproc, args._argv)
    rd.init_from_env(rd.backend_for(device))  # under torchrun / accelerate launch: join the group (train() wraps in DDP)
    main = rd.is_main()  # only rank 0 writes
    out = check_out(args.out, "finetune", OUT_NAMES, adapters=("adapter", "best"), models=("model", "best"))
    check_model_path(args.model, "--model")
    ckpt = out / "checkpoint"
    if args.resume and not has_checkpoint(ckpt):
        raise ConfigError(f"rankwise finetune --resume: {ckpt} holds no checkpoint (no trainer_state.json); "
                          "check --out, or run without --resume to start from step 0.")
    if not full:
        from ..core.registry import get_method

        get_method(args.method)  # an unknown name fails now, naming the registered ones
    cfg = _train_config(args, default_lr(args.method), TrainConfig)
    data = read_table(args.data, args.text_col, args.label_col)
    if len(set(data.labels)) < 2:
        raise ConfigError(f"rankwise finetune: {args.data} has a single class ({len(data)} rows, column "
                          f"{args.label_col!r}); classification needs at least two. Check --label-col and the file.")
    if args.valid_data:
        train_ds = data
        valid_ds = _same_labels(read_table(args.valid_data, args.text_col, args.label_col), data.label_names,
                                args.valid_data)
    else:
        train_ds, valid_ds = data.split(valid_frac=args.valid_frac, seed=args.split_seed)
    if not len(train_ds) or not len(valid_ds):
        raise ConfigError(f"rankwise finetune: {args.data} ({len(data)} rows) leaves an empty "
                          f"{'validation' if len(train_ds) else 'training'} split; a label needs at least 2 examples "
                          "to be split. Add examples, or pass --valid-data with a separate file.")
    if len(train_ds) < args.batch_size:
        raise ConfigError(f"rankwise finetune: {len(train_ds)} training rows are fewer than --batch-size "
                          f"{args.batch_size}; pass --batch-size {len(train_ds)} or less, or add data.")
    start, prior = (_resume_point(ckpt, args.steps) if args.resume else (0, []))
    model, tok = load_sequence_classifier(args.model, num_labels=len(data.label_names), seed=args.seed)
    model.to(device)  # before adapting: adapters are created on their layer's device
    id2label = dict(enumerate(data.label_names))
    model.config.id2label, model.config.label2id = id2label, {v: k for k, v in id2label.items()}
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    positions = positions if isinstance(positions, int) else None
    max_length = args.max_length or (min(128, positions) if positions else 128)
    if positions and max_length > positions:
        raise ConfigError(f"rankwise finetune: --max-length {max_length} is above the {positions} positions of "
                          f"{args.model}; longer texts would crash training. Pass --max-length {positions} or less.")
    head = ([m.strip() for m in args.modules_to_save.split(",")] if args.modules_to_save
            else _head_names(model))
    opts = {} if full else method_options(
        args.method, rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=_targets(args.targets))
    task = ClassificationTask(tok, max_length=max_length, device=device)  # batches on the model's device
    train_enc, valid_enc = task.encode(train_ds), task.encode(valid_ds)
    model = prepare(model, args.method, opts, head, args.seed,
                    **common.calibration_for(args.method, task, train_enc, args.batch_size))
    labels = {"format": LABELS_FORMAT, "id2label": {str(k): v for k, v in id2label.items()},
              "label2id": {v: k for k, v in id2label.items()}, "base_model": str(args.model), "method": args.method,
              "final": "model" if full else "adapter", "text_col": args.text_col, "label_col": args.label_col}
    if main and args.resume and (out / LABELS_FILE).is_file():  # the run being resumed: must match, stays as it is
        _check_resumed_labels(out, labels)
    elif main:
        write_json(out / LABELS_FILE, labels)

    def save_best(m):
        if not main:
            return
        if full:
            save_model(m, tok, out / "best", best=True)
        else:
            save_adapter(m, out / "best")

    best_dir_ok = (out / "best").is_dir() and any((out / "best" / f).is_file()
                                                  for f in ("adapter_config.json", "config.json"))
    keeper = KeepBest(evaluator(task, valid_enc), save_best,
                      best=max((m.get("accuracy", -math.inf) for _, m in prior), default=-math.inf)
                      if best_dir_ok else -math.inf)
    result = train(model, train_enc, task.collate, task.loss, cfg, eval_fn=keeper, checkpoint_dir=ckpt,
                   resume=args.resume, progress=main and not args.no_progress, desc=args.method)
    if not main:  # the other ranks hold the same weights; rank 0 writes them
        return {"method": args.method, "rank": rd.rank()}
    if full:
        save_model(model, tok, out / "model")
    else:
        from ..io.files import save

        save(model, out / "adapter")

    best_step = next((s for s, m in result.evals if m.get("accuracy") == keeper.best
                      and (s > start or not keeper.saved)), None)
    row = {"method": args.method, "trainable params": trainable_count(model),
           "accuracy": round(result.evals[-1][1]["accuracy"], 4) if result.evals else float("nan"),
           "best accuracy": round(keeper.best, 4) if best_step is not None else float("nan"),
           "best step": best_step if best_step is not None else "-",
           "final loss": round(result.losses[-1], 4) if result.losses else float("nan"),
           "wall time (s)": round(result.wall_time, 1)}
    print_table([row])
    final = "model/ (save_pretrained + tokenizer)" if full else "adapter/"
    notes = [f"Model {args.model}; {len(train_ds)} train / {len(valid_ds)} valid rows "
             + (f"(validation from {Path(args.valid_data).name})" if args.valid_data
                else f"(stratified split, --valid-frac {args.valid_frac}, --split-seed {args.split_seed})")
             + f"; --seed {args.seed}; max {max_length} tokens.",
             f"{cfg.steps} steps x batch {cfg.batch_size} x grad-accum {cfg.grad_accum}, lr {cfg.lr:g}, "
             f"warmup {cfg.warmup_steps} steps then cosine, weight decay {cfg.weight_decay:g}, evaluation every "
             f"{cfg.eval_every or cfg.steps} steps.",
             f"Labels (head order, in labels.json): {', '.join(data.label_names)}.",
             f"Final weights in {final}; the best validation accuracy"
             + (f" ({keeper.best:.4f}, step {best_step}) in best/." if best_step is not None else " in best/."),
             ("Wall time: this call only (resumed at step " + str(start) + ")." if args.resume and start else
              "Wall time: the whole run, evaluation included.")]
    if result.evals:
        from ..utils.table import format_table

        notes.append("Validation:\n\n" + format_table(
            [[s, round(m.get("loss", float("nan")), 4), round(m.get("accuracy", float("nan")), 4)]
             for s, m in result.evals], ["step", "loss", "accuracy"], markdown=True))
    write_report(out, f"rankwise finetune: {args.method} on {Path(args.data).name}", [row],
                 {args.method: result.losses}, "\n\n".join(notes), evals={args.method: result.evals})
    print(f"saved to {out}: {final}, best/, labels.json, report.md")
    return row


def _train_config(args, default_lr: float, TrainConfig):
    """The ``TrainConfig`` of the flags, built (so checked) before any work; ``TrainConfig`` validates
    every field and the command line shows its keyword names as flags (``warmup=`` → ``--warmup``)."""
    lr = args.lr if args.lr is not None else default_lr
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, seed=args.seed,
                       weight_decay=args.weight_decay, warmup=args.warmup, grad_accum=args.grad_accum,
                       eval_every=args.eval_every, checkpoint_every=max(1, args.steps // 4),
                       precision=getattr(args, "precision", "fp32"))


def _same_labels(valid, names: list[str], path):
    """``valid`` with its labels renumbered to the training file's ``names`` (each file numbers its
    own names in sorted order, so a validation file lacking a class would be shifted)."""
    from ..data import TextDataset

    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({valid.label_names[y] for y in valid.labels} - set(index))
    if unknown:
        raise ConfigError(f"rankwise finetune: --valid-data {path} has label(s) {', '.join(map(repr, unknown[:5]))} "
                          f"that --data lacks (it has {', '.join(map(repr, names[:10]))}); the head cannot predict "
                          "them. Fix the labels or add examples of them to --data.")
    return TextDataset(valid.texts, [index[valid.label_names[y]] for y in valid.labels], names)


def _resume_point(ckpt: Path, steps: int) -> tuple[int, list]:
    """(step of the checkpoint, its evaluation history); warns when ``--steps`` changed."""
    from ..io.atomic import read_json

    state = read_json(ckpt / "trainer_state.json", "the checkpoint is damaged; run without --resume.")
    saved = (state.get("config") or {}).get("steps")
    if saved is not None and saved != steps:
        print(f"rankwise finetune: warning: --steps {steps} differs from the {saved} of the run in {ckpt}; the "
              f"learning-rate schedule (warmup + cosine over --steps) changes from step {state.get('step')} on, so "
              f"the result will not match an uninterrupted {steps}-step run.", file=sys.stderr)
    evals = [(int(s), dict(m)) for s, m in (state.get("history") or {}).get("evals", [])]
    return int(state.get("step", 0)), evals


class KeepBest:
    """An ``eval_fn`` for :func:`rankwise.train.train` that saves the model whenever the validation
    accuracy beats the best so far (strictly: the earliest of equal scores is kept)."""

    def __init__(self, evaluate, save, best: float = -math.inf, metric: str = "accuracy"):
        self.evaluate, self.save, self.best, self.metric, self.saved = evaluate, save, best, metric, False

    def __call__(self, model) -> dict:
        metrics = self.evaluate(model)
        if metrics[self.metric] > self.best:
            self.best, self.saved = metrics[self.metric], True
            self.save(model)
        return metrics


def evaluator(task, encoded, batch_size: int = 64):
    """``model -> {"accuracy", "loss"}`` on ``encoded`` (mean cross-entropy over the examples)."""

    @torch.no_grad()
    def evaluate(model) -> dict:
        correct, total = 0, 0.0
        for i in range(0, len(encoded), batch_size):
            b = task.collate(encoded[i:i + batch_size])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            total += float(F.cross_entropy(logits.float(), b["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == b["labels"]).sum())
        n = max(1, len(encoded))
        return {"accuracy": correct / n, "loss": total / n}

    return evaluate


def save_adapter(model, path: Path) -> None:
    """``rw.save`` into ``path``, which may hold an adapter or a model folder of an earlier run
    (``best/`` of ``--method full``): the folder is built complete and swapped in."""
    from ..io.atomic import ADAPTER_NAMES, atomic_dir, is_adapter_dir
    from ..io.files import save
    from .common import MODEL_NAMES, is_model_dir

    with atomic_dir(path, ADAPTER_NAMES + MODEL_NAMES, "rankwise finetune --out: best folder",
                    lambda d: is_adapter_dir(d) or is_model_dir(d)) as tmp:
        save(model, tmp)


def save_model(model, tokenizer, path: Path, best: bool = False) -> None:
    """``save_pretrained`` of the model (its config holds ``id2label``) and the tokenizer, atomically."""
    from ..io.atomic import ADAPTER_NAMES, atomic_dir, is_adapter_dir
    from .common import MODEL_NAMES, is_model_dir

    names = ADAPTER_NAMES + MODEL_NAMES if best else MODEL_NAMES
    with atomic_dir(path, names, f"rankwise finetune --out: {path.name} folder",
                    lambda d: is_model_dir(d) or (best and is_adapter_dir(d))) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def read_labels(folder) -> dict[int, str] | None:
    """``id2label`` from the ``labels.json`` of a ``rankwise finetune`` --out folder (or of the folder
    above an adapter folder in it); ``None`` when there is none."""
    from ..io.atomic import read_json

    folder = Path(folder)
    for d in (folder, folder.parent):
        f = d / LABELS_FILE
        if f.is_file():
            info = read_json(f, "the file is damaged; run rankwise finetune again or delete it.")
            try:
                return {int(k): str(v) for k, v in info["id2label"].items()}
            except (KeyError, TypeError, ValueError, AttributeError):
                from ..errors import CorruptFileError

                raise CorruptFileError(f"{f} has no valid 'id2label' object of index -> label name; "
                                       "run rankwise finetune again or fix the file.") from None
    return None


def load_run(out, which: str = "final", base: str | None = None):
    """``(model, tokenizer)`` of a ``rankwise finetune`` --out folder, in eval mode with every parameter
    frozen, its ``config.id2label`` holding the label names: ``which="final"`` (``adapter/`` or
    ``model/``) or ``"best"`` (``best/``). An adapter is loaded onto ``base`` (default: the model the run
    started from, as ``labels.json`` records it)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..io.atomic import read_json
    from .common import is_model_dir

    out = Path(out)
    if which not in ("final", "best"):
        raise ConfigError(f"load_run: which={which!r}; use 'final' or 'best'.")
    info = read_json(out / LABELS_FILE, f"is {out} the --out folder of rankwise finetune?")
    id2label = read_labels(out)
    folder = out / ("best" if which == "best" else info.get("final", "adapter"))
    if is_model_dir(folder):
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
    else:
        import rankwise as rw

        base = base or info.get("base_model")
        model = AutoModelForSequenceClassification.from_pretrained(
            base, id2label=id2label, label2id={v: k for k, v in id2label.items()}, ignore_mismatched_sizes=True)
        rw.load(model, folder)
        tok = AutoTokenizer.from_pretrained(base)
    model.config.id2label, model.config.label2id = id2label, {v: k for k, v in id2label.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tok


def _check_resumed_labels(out: Path, labels: dict) -> None:
    """``--resume`` with other labels, method or base model than the run in ``out``: refuse before any
    file changes (``labels.json`` and the checkpoint keep describing the earlier run)."""
    from ..errors import ConfigError
    from ..io.atomic import read_json

    prev = read_json(out / LABELS_FILE, f"is {out} the --out folder of rankwise finetune?")
    for key, flag in (("method", "--method"), ("base_model", "--model"), ("id2label", "--data / --label-col")):
        if prev.get(key) != labels[key]:
            raise ConfigError(f"rankwise finetune --resume: {out} was trained with {key} = {prev.get(key)!r}, this run "
                              f"has {labels[key]!r}; pass the same {flag} as that run, or another --out to start anew.")


def _head_names(model) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n in dict(model.named_modules())}
    for cand in ("classifier", "score", "head"):
        if cand in names:
            return [cand]
    return []
