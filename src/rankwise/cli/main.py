"""The ``rankwise`` command line: demo, finetune, methods."""

from __future__ import annotations

import argparse
import sys


def positive_int(s: str) -> int:
    """argparse type: an integer ≥ 1 (steps, batch sizes, lengths); 0 or a negative is refused at once."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {v}")
    return v


def _targets(s: str | None):
    """'all-linear', a comma list of suffixes ('query,value'), or a regex (anything with regex chars)."""
    if s is None or s == "all-linear":
        return "all-linear"
    if any(c in s for c in "*()[]^$|\\+?"):
        return s
    return [t.strip() for t in s.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rankwise", description="Low-rank deep learning on PyTorch.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command")

    d = sub.add_parser("demo", help="fine-tune MiniLM on a built-in text task with every method; print a table")
    d.add_argument("--out", default="demo_out", help="output folder for report.md, loss_curves.png")
    d.add_argument("--methods", default=None,
                   help="comma list of methods ('full' = full fine-tuning), or 'all' for every registered "
                        "method (default: full fine-tuning and a lineup of representative methods)")
    d.add_argument("--model", default=None, help="model folder or hub id (default: bundled all-MiniLM-L6-v2)")
    d.add_argument("--steps", type=positive_int, default=80)
    d.add_argument("--batch-size", type=positive_int, default=16)
    d.add_argument("--max-length", type=positive_int, default=64)
    d.add_argument("--rank", type=int, default=None,
                   help="rank of every method that has one (default: each method's demo rank, else 8)")
    d.add_argument("--per-family", type=int, default=150, help="examples per label (train+valid)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")

    f = sub.add_parser("finetune", help="fine-tune a sequence classifier on your CSV/JSONL with one method")
    f.add_argument("--model", required=True, help="model folder or hub id")
    f.add_argument("--data", required=True, help=".csv or .jsonl file")
    f.add_argument("--text-col", default="text")
    f.add_argument("--label-col", default="label")
    f.add_argument("--valid-data", default=None, help="separate validation file (default: split --data)")
    f.add_argument("--valid-frac", type=float, default=0.2)
    f.add_argument("--method", default="lora", help="a registered method or 'full'")
    f.add_argument("--rank", type=int, default=None,
                   help="rank of every method that has one (default: each method's demo rank, else 8)")
    f.add_argument("--alpha", type=float, default=None)
    f.add_argument("--dropout", type=float, default=None)
    f.add_argument("--targets", default="all-linear", help="'all-linear', 'query,value' or a regex")
    f.add_argument("--modules-to-save", default=None, help="comma list (default: the classification head)")
    f.add_argument("--steps", type=positive_int, default=200)
    f.add_argument("--batch-size", type=positive_int, default=16)
    f.add_argument("--lr", type=float, default=None)
    f.add_argument("--max-length", type=positive_int, default=None,
                   help="tokens per text (default 128, or the model's positions if fewer)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", required=True, help="output folder: adapter/, checkpoint/, report.md")
    f.add_argument("--resume", action="store_true", help="continue from out/checkpoint")
    f.add_argument("--no-progress", action="store_true")

    sub.add_parser("methods", help="list registered methods")

    from .pretrain import add_parser as add_pretrain_parser

    add_pretrain_parser(sub)

    a = sub.add_parser("analyze", help="what fine-tuning changed per layer: spectra, ranks, intruder dimensions, "
                                       "CKA; writes report.html + report.md")
    a.add_argument("--base", required=True, help="base model folder or hub id")
    a.add_argument("--adapter", action="append", help="rankwise or PEFT adapter dir (repeat to compare several)")
    a.add_argument("--finetuned", action="append", help="fully fine-tuned model folder (repeatable)")
    a.add_argument("--data", nargs="?", const="stdlib", default=None,
                   help="CSV/JSONL for the representation measures; alone: stdlib docstrings")
    a.add_argument("--text-col", default="text")
    a.add_argument("--label-col", default="label")
    a.add_argument("--max-examples", type=positive_int, default=128)
    a.add_argument("--max-length", type=positive_int, default=64)
    a.add_argument("--batch-size", type=positive_int, default=32)
    a.add_argument("--top-k", type=int, default=10, help="intruder dimensions among the top k singular vectors")
    a.add_argument("--eps", type=float, default=0.5, help="intruder cosine-similarity threshold")
    a.add_argument("--rank", type=int, default=8, help="r of the amplification factor and subspace similarity")
    a.add_argument("--layers", default=None, help="regex: analyze only matching layer names")
    a.add_argument("--randomized", action="store_true", help="randomized SVD of the updates (error in the report)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", default="analysis_report", help="output folder for report.html, report.md, PNGs")
    a.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        from .. import __version__

        print(__version__)
        return 0
    if args.command == "methods":
        from ..core.registry import get_method, methods

        for name in methods():
            cls = get_method(name)
            print(f"{name:<14} {getattr(cls, 'summary', (cls.__doc__ or '').strip().splitlines()[0])}")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args)
        return 0
    if args.command == "analyze":
        from .analyze import run_analyze

        run_analyze(args)
        return 0
    if args.command == "pretrain":
        from .pretrain import run_pretrain

        run_pretrain(args)
        return 0
    if args.command == "finetune":
        from .finetune import run_finetune

        run_finetune(args)
        return 0
    build_parser().print_help()
    return 1


if __name__ == "__main__":
    sys.exit(main())
