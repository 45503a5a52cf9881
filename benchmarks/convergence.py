"""Convergence on the demo task: every method at equal steps, several seeds, one table.

    python benchmarks/convergence.py                         # default lineup, 3 seeds
    python benchmarks/convergence.py --methods all --seeds 1
    python benchmarks/convergence.py --methods lora,pissa,eva --steps 120 --out conv/
    python benchmarks/convergence.py --quick                 # smoke run (< 1 min)
    python benchmarks/convergence.py --methods lora,lora_ga,lora_ga+variant=peft  # a method with options

Task and model are ``rankwise demo``'s: all-MiniLM-L6-v2 classifying standard-library
docstrings by module family (10 classes), the classification head trained fully with every
method. Each (method, seed) run gets the same steps, batch, learning-rate schedule and data
split (split seed 0); the seed changes the adapter init and the batch order. Learning rates
are each method's ``default_lr`` (full fine-tuning 2e-4), so the comparison is "each method
at its usual learning rate", not a tuned sweep. ``--lr`` gives every adapter method one learning
rate instead: the init papers (PiSSA, MiLoRA, LoRA-GA, EVA, CorDA) compare against LoRA at
LoRA's learning rate, which ``--lr 3e-3`` reproduces here.

Columns: training loss averaged over the 10 steps ending at 25%, 50% and 100% of training
(mean ± std over seeds), validation accuracy at the end, trainable parameters, wall time per
run, and ``steps to LoRA's final loss``: the first step where the method's smoothed training
loss reaches LoRA's smoothed final loss (the papers' convergence-speed claims are about this;
'-' if never). Writes ``convergence.md`` and ``convergence.png`` (mean loss curves).
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rankwise.cli.common import FULL, default_lr, method_options, run_one, write_report  # noqa: E402
from rankwise.cli.demo import demo_methods, demo_task  # noqa: E402
from rankwise.integrations.hf import minilm_path  # noqa: E402
from rankwise.train import TrainConfig  # noqa: E402
from rankwise.utils.table import format_table  # noqa: E402

DEFAULT = "full,lora,pissa,milora,eva,corda,lora_ga,lora_sb,adalora,dylora"


def _ema(values, beta=0.9):
    out, s = [], None
    for v in values:
        s = v if s is None else beta * s + (1 - beta) * v
        out.append(s)
    return out


def _window(losses, frac, width=10):
    end = max(1, round(len(losses) * frac))
    part = losses[max(0, end - width):end]
    return sum(part) / len(part)


def _lr(name: str, args) -> float:
    return args.lr if args.lr is not None and name != FULL else default_lr(name)


def _split(label: str) -> tuple[str, dict]:
    """``"lora_ga+variant=peft+gamma=8"`` → ``("lora_ga", {"variant": "peft", "gamma": 8})``: one row
    per setting of a method; values are Python literals, else strings."""
    name, *pairs = label.split("+")
    opts = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--methods {label!r}: write options as method+key=value")
        try:
            opts[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            opts[key] = value
    return name, opts


def _ms(values, digits=3):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None, help=f"comma list or 'all' (default: those of {DEFAULT} registered)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rank", type=int, default=None,
                   help="rank of every method that has one (default: each method's demo rank, else 8)")
    p.add_argument("--lr", type=float, default=None,
                   help="one learning rate for every method but full fine-tuning (default: each method's "
                        "default_lr). The init papers compare at LoRA's learning rate: --lr 3e-3")
    p.add_argument("--per-family", type=int, default=150)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--out", default="convergence_out")
    p.add_argument("--quick", action="store_true", help="2 methods, 1 seed, 12 steps, small data")
    args = p.parse_args(argv)
    if args.quick:
        args.methods = args.methods or "full,lora"
        args.seeds, args.steps, args.per_family = 1, 12, 30
    if args.methods is None:
        from rankwise.core.registry import methods

        registered = set(methods()) | {FULL}
        names = [m for m in DEFAULT.split(",") if m in registered]
    else:
        names = (demo_methods("all") if args.methods.strip() == "all"
                 else [m.strip() for m in args.methods.split(",") if m.strip()])
        demo_methods(",".join(_split(n)[0] for n in names))  # a clear error for an unknown method
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data, train_ds, valid_ds, task, train_enc, valid_enc, make_model = demo_task(
        minilm_path(), args.per_family, 0, args.max_length)
    print(f"convergence: {len(names)} methods x {args.seeds} seeds, {args.steps} steps x batch {args.batch_size}, "
          f"{len(train_ds)} train / {len(valid_ds)} valid; methods: {', '.join(names)}")

    runs: dict[str, list] = {m: [] for m in names}
    t_all = time.perf_counter()
    for seed in range(args.seeds):
        for label in names:
            name, extra = _split(label)
            cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=_lr(name, args), seed=seed)
            opts = {} if name == FULL else {**method_options(name, rank=args.rank), **extra}
            row, result, _ = run_one(name, make_model, opts, task, train_enc, valid_enc, cfg, ["classifier"],
                                     desc=f"{label:>10} s{seed}")
            runs[label].append((row, result.losses))
    total = time.perf_counter() - t_all

    ref = None
    if "lora" in runs:
        ref = statistics.mean(_ema(losses)[-1] for _, losses in runs["lora"])
    rows, curves = [], {}
    for name, rs in runs.items():
        losses = [lo for _, lo in rs]
        mean_curve = [statistics.mean(v) for v in zip(*losses)]
        curves[name] = mean_curve
        reach = "-"
        if ref is not None:
            hit = [i + 1 for i, v in enumerate(_ema(mean_curve)) if v <= ref]
            reach = hit[0] if hit else "-"
        rows.append({
            "method": name,
            "trainable params": rs[0][0]["trainable params"],
            "loss @25%": _ms([_window(lo, 0.25) for lo in losses]),
            "loss @50%": _ms([_window(lo, 0.5) for lo in losses]),
            "loss @100%": _ms([_window(lo, 1.0) for lo in losses]),
            "accuracy": _ms([r["accuracy"] for r, _ in rs]),
            "steps to LoRA's final loss": reach,
            "lr": _lr(_split(name)[0], args),
            "s / run": round(statistics.mean(r["wall time (s)"] for r, _ in rs), 1),
        })
    headers = list(rows[0])
    print()
    print(format_table([[r[h] for h in headers] for r in rows], headers))
    rank_note = args.rank if args.rank is not None else "each method's demo rank (else 8)"
    notes = (f"{args.seeds} seeds x {args.steps} steps x batch {args.batch_size}, rank {rank_note} where a method "
             f"has one, {torch.get_num_threads()} threads, total {total / 60:.1f} min. Loss columns: mean training "
             "loss of the 10 steps ending there, mean ± std over seeds. 'steps to LoRA's final loss': first step "
             "where the seed-averaged EMA(0.9) loss is at or below LoRA's final EMA loss.")
    out = Path(args.out)
    report = write_report(out, "Convergence on the demo task (mean over seeds)", rows, curves, notes,
                          md_name="convergence.md", png_name="convergence.png")
    print(f"\n{report}  {out / 'convergence.png'}")


if __name__ == "__main__":
    main()
