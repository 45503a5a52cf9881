"""Reparameterizations on the demo task: Weight Compander on full fine-tuning, Intrinsic SAID against d, LoRA.

    python benchmarks/reparam.py              # the README run (about 10 min, one thread)
    python benchmarks/reparam.py --quick      # smoke run (< 1 min)

Task and model are ``rankwise demo``'s (``rankwise.cli.demo.demo_task``): all-MiniLM-L6-v2 classifying
Python standard-library docstrings by module family, split seed 0, with a new classification head that
every configuration trains fully (``modules_to_save`` / full fine-tuning). Rows:

* ``full`` — plain full fine-tuning (lr 2e-4, the demo's);
* ``full + WC`` — the same run with every Linear weight reparameterized by Weight Compander
  (``rw.reparam.apply(model, "weight_compander")``, defaults: ``W = α tanh(γ V / α)``, ``γ = 2``,
  ``α = 2 max|W0|`` per layer), at the same learning rate: the regularizer on top of full fine-tuning;
* ``intrinsic d=…`` — Intrinsic SAID (``rw.adapt(model, "intrinsic", dim=d)``: one ``d``-vector through a
  fixed Fastfood map into the attention query / value weights, one scale per layer) for a few ``d``;
  ``d = 0`` trains only the head (and the layer scales, which get no gradient while ``θ = 0``) — the floor
  every ``d`` should be read against, since the head alone has 3,850 trained parameters;
* ``lora`` — LoRA rank 8 on the query / value weights (``default_lr``).

``full`` and ``full + WC`` run ``--seeds`` seeds, the intrinsic and LoRA rows ``--aux-seeds`` (1 by default, to
stay within ~10 single-threaded minutes); the seed changes the head init, the adapter init and the batch
order; every run has the same steps and batch; the table gives validation accuracy (mean ± std), the trainable
parameters, and ``% of full`` (mean accuracy over full fine-tuning's). ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import rankwise as rw  # noqa: E402
from rankwise.cli.common import FULL, default_lr, run_one  # noqa: E402
from rankwise.cli.demo import demo_task  # noqa: E402
from rankwise.integrations.hf import minilm_path  # noqa: E402
from rankwise.io.atomic import write_text  # noqa: E402
from rankwise.train import TrainConfig  # noqa: E402
from rankwise.utils.table import format_table  # noqa: E402

QV = ["query", "value"]


def _configs(dims: list[int], intrinsic_lr: float) -> list[tuple[str, str, dict, float, bool]]:
    """(label, method, options, lr, weight compander?)"""
    rows = [("full", FULL, {}, default_lr(FULL), False), ("full + WC", FULL, {}, default_lr(FULL), True)]
    rows += [(f"intrinsic d={d}", "intrinsic", {"dim": d, "targets": QV}, intrinsic_lr, False) for d in dims]
    rows.append(("lora r=8", "lora", {"rank": 8, "targets": QV}, default_lr("lora"), False))
    return rows


def _ms(values, digits=3):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds of full and full + WC")
    p.add_argument("--aux-seeds", type=int, default=1, help="seeds of the intrinsic and LoRA rows (time budget)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dims", default="0,200,2000,20000", help="Intrinsic SAID's d values, comma list")
    p.add_argument("--intrinsic-lr", type=float, default=None, help="default: the method's default_lr")
    p.add_argument("--per-family", type=int, default=60)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    p.add_argument("--quick", action="store_true", help="1 seed, 6 steps, tiny data")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.aux_seeds, args.steps, args.per_family, args.dims = 1, 1, 6, 12, "0,200"
    C.setup(threads=1)  # torch.set_num_threads(1)
    dims = [int(d) for d in args.dims.split(",") if d.strip()]
    ilr = args.intrinsic_lr if args.intrinsic_lr is not None else default_lr("intrinsic")
    data, train_ds, valid_ds, task, train_enc, valid_enc, make_model = demo_task(
        minilm_path(), args.per_family, 0, args.max_length)

    def compander_model():
        return rw.reparam.apply(make_model(), "weight_compander")

    configs = _configs(dims, ilr)
    print(f"reparam: {len(data.label_names)}-way stdlib docstrings, {len(train_ds)} train / {len(valid_ds)} valid, "
          f"{args.steps} steps x batch {args.batch_size}, {args.seeds} seeds (intrinsic / LoRA: {args.aux_seeds}), 1 thread")
    runs: dict[str, list] = {c[0]: [] for c in configs}
    t_all = time.perf_counter()
    for seed in range(args.seeds):
        for label, method, opts, lr, wc in configs:
            if method != FULL and seed >= args.aux_seeds:
                continue
            cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, seed=seed)
            row, _, _ = run_one(method, compander_model if wc else make_model, opts, task, train_enc, valid_enc,
                                cfg, ["classifier"], desc=f"{label:>16} s{seed}", progress=False)
            runs[label].append(row)
            print(f"  {label:>16} seed {seed}: accuracy {row['accuracy']:.4f}  ({row['wall time (s)']} s)", flush=True)
    total = time.perf_counter() - t_all

    full_acc = statistics.mean(r["accuracy"] for r in runs["full"])
    rows = []
    for label, _method, _, lr, _ in configs:
        accs = [r["accuracy"] for r in runs[label]]
        rows.append([label, runs[label][0]["trainable params"], _ms(accs), f"{100 * statistics.mean(accs) / full_acc:.0f}",
                     lr, round(statistics.mean(r["wall time (s)"] for r in runs[label]), 1)])
    headers = ["configuration", "trainable params", "accuracy", "% of full", "lr", "s / run"]
    table = format_table(rows, headers)
    print()
    print(table)
    note = (f"\n{len(train_ds)} train / {len(valid_ds)} valid, {args.steps} steps x batch {args.batch_size}, "
            f"seeds: {args.seeds} for full / full + WC, {args.aux_seeds} for intrinsic / LoRA; 1 thread, "
            f"total {total / 60:.1f} min.\n")
    print(note)
    if args.out:
        write_text(Path(args.out), table + "\n" + note)


if __name__ == "__main__":
    main()
