"""``rankwise finetune``: one method on the user's own CSV/JSONL and model."""

from __future__ import annotations

from pathlib import Path


def run_finetune(args) -> dict:
    from ..data import read_table
    from ..errors import ConfigError
    from ..integrations.hf import ClassificationTask, load_sequence_classifier
    from ..io.files import save
    from ..train import TrainConfig, train
    from . import common
    from ..train import has_checkpoint
    from .common import FULL, check_out, default_lr, method_options, prepare, print_table, write_report
    from .main import _targets

    out = check_out(args.out, "finetune", ("adapter", "checkpoint", "report.md", "loss_curves.png"), ("adapter",))
    if args.resume and not has_checkpoint(out / "checkpoint"):
        raise ConfigError(f"rankwise finetune --resume: {out / 'checkpoint'} holds no checkpoint (no trainer_state.json); "
                          "check --out, or run without --resume to start from step 0.")
    data = read_table(args.data, args.text_col, args.label_col)
    if len(set(data.labels)) < 2:
        raise ConfigError(f"rankwise finetune: {args.data} has a single class ({len(data)} rows, column "
                          f"{args.label_col!r}); classification needs at least two. Check --label-col and the file.")
    if args.valid_data:
        train_ds, valid_ds = data, read_table(args.valid_data, args.text_col, args.label_col)
    else:
        train_ds, valid_ds = data.split(valid_frac=args.valid_frac, seed=args.seed)
    if not len(train_ds) or not len(valid_ds):
        raise ConfigError(f"rankwise finetune: {args.data} ({len(data)} rows) leaves an empty "
                          f"{'validation' if len(train_ds) else 'training'} split; a label needs at least 2 examples "
                          "to be split. Add examples, or pass --valid-data with a separate file.")
    model, tok = load_sequence_classifier(args.model, num_labels=len(data.label_names), seed=args.seed)
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    positions = positions if isinstance(positions, int) else None
    max_length = args.max_length or (min(128, positions) if positions else 128)
    if positions and max_length > positions:
        raise ConfigError(f"rankwise finetune: --max-length {max_length} is above the {positions} positions of "
                          f"{args.model}; longer texts would crash training. Pass --max-length {positions} or less.")
    head = ([m.strip() for m in args.modules_to_save.split(",")] if args.modules_to_save
            else _head_names(model))
    opts = {} if args.method == FULL else method_options(
        args.method, rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=_targets(args.targets))
    task = ClassificationTask(tok, max_length=max_length)
    train_enc, valid_enc = task.encode(train_ds), task.encode(valid_ds)
    model = prepare(model, args.method, opts, head, args.seed,
                    **common.calibration_for(args.method, task, train_enc, args.batch_size))
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr or default_lr(args.method),
                      seed=args.seed, checkpoint_every=max(1, args.steps // 4))
    result = train(model, train_enc, task.collate, task.loss, cfg, eval_fn=task.evaluator(valid_enc),
                   checkpoint_dir=out / "checkpoint", resume=args.resume, progress=not args.no_progress,
                   desc=args.method)
    from ..core.api import trainable_parameters

    row = {"method": args.method, "trainable params": trainable_parameters(model),
           "accuracy": round(result.evals[-1][1]["accuracy"], 4) if result.evals else float("nan"),
           "final loss": round(result.losses[-1], 4) if result.losses else float("nan"),
           "wall time (s)": round(result.wall_time, 1)}
    if args.method != FULL:
        save(model, out / "adapter")
    print_table([row])
    write_report(out, f"rankwise finetune: {args.method} on {Path(args.data).name}", [row],
                 {args.method: result.losses},
                 f"Model {args.model}; {len(train_ds)} train / {len(valid_ds)} valid; labels {data.label_names}.")
    print(f"saved to {out}")
    return row


def _head_names(model) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for cand in ("classifier", "score", "head"):
        if cand in names:
            return [cand]
    return []
