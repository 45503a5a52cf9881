"""The ``rankwise`` command line: demo, finetune, pretrain, analyze, methods.

Errors: a mistake of the user (a :class:`~rankwise.errors.RankwiseError`, a missing file, a
package not installed) prints one line on stderr, ``rankwise <command>: error: <problem>; <fix>``,
and exits with code 2 (argparse's own usage errors exit 2 as well). Python keyword names in a
message (``text_col=``) are shown as the command's flags (``--text-col``). Anything else is
reported in one line as unexpected (exit code 1) with a hint to rerun with ``--debug``, which
prints the full traceback in every case. :func:`run` is the same command line without this
handling: it returns the command's result or raises, for Python callers and tests.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import traceback

#: exit codes: a user error (bad flag value, missing file, …) and an unexpected exception
EXIT_USER_ERROR = 2
EXIT_UNEXPECTED = 1


def _arg_type(cast, ok, what: str, doc: str):
    """An argparse type: ``cast`` the string, then refuse values for which ``ok`` is false, with a
    message saying what is expected (``what``)."""
    noun = "an integer" if cast is int else "a number"

    def check(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {noun}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s}")
        return v

    check.__doc__ = doc
    return check


positive_int = _arg_type(int, lambda v: v >= 1, "an integer >= 1",
                         "argparse type: an integer ≥ 1 (steps, batch sizes, lengths); 0 or a negative is refused at once.")
nonneg_int = _arg_type(int, lambda v: v >= 0, "an integer >= 0", "argparse type: an integer ≥ 0.")
nonneg_float = _arg_type(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0",
                         "argparse type: a finite number ≥ 0.")
fraction = _arg_type(float, lambda v: 0 < v < 1, "a fraction strictly between 0 and 1",
                     "argparse type: a number strictly between 0 and 1.")


def add_run_options(p) -> None:
    """``--precision``, ``--nproc`` and ``--device``: how ``rankwise finetune`` / ``pretrain`` run."""
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp32, or bf16 / fp16 mixed precision: the forward under torch.autocast, float32 weights and "
                        "optimizer (fp16 with a loss scaler; rankwise.train.TrainConfig.precision) (default: fp32)")
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="processes on this machine: re-runs the command through torchrun (DDP; gloo on CPU, nccl on "
                        "CUDA); --batch-size is the global batch, split evenly; rank 0 writes the outputs")
    p.add_argument("--device", default="auto",
                   help="auto (default: cuda:LOCAL_RANK when CUDA is available, one GPU per process, else cpu), cpu, "
                        "cuda, cuda:N")


def _targets(s: str | None):
    """'all-linear', a comma list of suffixes ('query,value'), or a regex (anything with regex chars)."""
    if s is None or s == "all-linear":
        return "all-linear"
    if any(c in s for c in "*()[]^$|\\+?"):
        return s
    return [t.strip() for t in s.split(",") if t.strip()]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: …)`` to every option whose help does not state its default already.

    Options defaulting to ``None`` say in their help what happens without them, and on/off flags
    are off unless given, so neither gets the ``(default: None)`` / ``(default: False)`` tail."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or action.required):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _sub(sub, name: str, **kw) -> argparse.ArgumentParser:
    p = sub.add_parser(name, formatter_class=HelpFormatter, **kw)
    _add_debug(p)
    return p


def _add_debug(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: given after the command it sets args.debug; absent, the global flag's value stays
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, print the full Python traceback (also accepted before the command)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rankwise", description="Low-rank deep learning on PyTorch.",
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--debug", action="store_true",
                   help="on an error, print the full Python traceback instead of one line")
    sub = p.add_subparsers(dest="command")

    d = _sub(sub, "demo", help="fine-tune MiniLM on a built-in text task with every method; print a table")
    d.add_argument("--out", default="demo_out", help="output folder for report.md, loss_curves.png")
    d.add_argument("--methods", default=None,
                   help="comma list of methods ('full' = full fine-tuning), or 'all' for every registered "
                        "method (default: full fine-tuning and a lineup of representative methods)")
    d.add_argument("--model", default=None, help="model folder or hub id (default: bundled all-MiniLM-L6-v2)")
    d.add_argument("--steps", type=positive_int, default=80, help="optimizer steps per method")
    d.add_argument("--batch-size", type=positive_int, default=16, help="examples per step")
    d.add_argument("--max-length", type=positive_int, default=64, help="tokens per text")
    d.add_argument("--rank", type=positive_int, default=None,
                   help="rank of every method that has one (default: each method's demo rank, else 8)")
    d.add_argument("--per-family", type=positive_int, default=150, help="examples per label (train+valid)")
    d.add_argument("--seed", type=nonneg_int, default=0, help="seed of the split, the inits and the batch order")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")

    f = _sub(sub, "finetune", help="fine-tune a sequence classifier on your CSV/JSONL with one method",
             description="Fine-tune a sequence classifier on a CSV/JSONL file with one method (or 'full'). "
                         "Writes into --out: adapter/ (the final adapter; --method full: model/, a "
                         "save_pretrained folder with the tokenizer), best/ (the same at the step with the best "
                         "validation accuracy), labels.json (id2label / label2id and the base model), "
                         "checkpoint/ (for --resume), report.md and loss_curves.png.")
    f.add_argument("--model", required=True, help="model folder or hub id")
    f.add_argument("--data", required=True, help=".csv (with a header row) or .jsonl file")
    f.add_argument("--text-col", default="text", help="column (CSV) or key (JSONL) holding the text")
    f.add_argument("--label-col", default="label",
                   help="column or key holding the label (names, or integers 0..k-1)")
    f.add_argument("--valid-data", default=None,
                   help="separate validation file (default: a stratified split of --data, see --valid-frac)")
    f.add_argument("--valid-frac", type=fraction, default=0.2, help="share of --data held out for validation")
    f.add_argument("--split-seed", type=nonneg_int, default=0,
                   help="seed of the train/validation split; independent of --seed, so runs with different "
                        "--seed are scored on the same validation rows")
    f.add_argument("--method", default="lora", help="a registered method (`rankwise methods`) or 'full'")
    f.add_argument("--rank", type=positive_int, default=None,
                   help="rank of every method that has one (default: each method's demo rank, else 8)")
    f.add_argument("--alpha", type=float, default=None, help="scaling alpha (default: the method's own)")
    f.add_argument("--dropout", type=float, default=None, help="adapter dropout (default: the method's own)")
    f.add_argument("--targets", default="all-linear", help="'all-linear', a comma list like 'query,value', or a regex")
    f.add_argument("--modules-to-save", default=None,
                   help="comma list of modules trained fully and saved with the adapter (default: the "
                        "classification head, 'classifier' / 'score' / 'head')")
    f.add_argument("--steps", type=positive_int, default=200, help="optimizer steps")
    f.add_argument("--batch-size", type=positive_int, default=16, help="examples per micro-batch")
    f.add_argument("--grad-accum", type=positive_int, default=1,
                   help="micro-batches per optimizer step (one step sees batch-size x grad-accum examples)")
    f.add_argument("--lr", type=nonneg_float, default=None,
                   help="peak learning rate (default: the method's default_lr; 2e-4 for full)")
    f.add_argument("--warmup", type=nonneg_float, default=0.06,
                   help="linear warmup, then cosine decay to 0: a fraction of --steps if < 1, else a number of steps")
    f.add_argument("--weight-decay", type=nonneg_float, default=0.0,
                   help="AdamW decoupled weight decay on matrices (not on biases and norms)")
    f.add_argument("--eval-every", type=nonneg_int, default=20,
                   help="evaluate on the validation set every N steps and at the end (0: only at the end); "
                        "the best accuracy so far is kept in best/")
    f.add_argument("--max-length", type=positive_int, default=None,
                   help="tokens per text (default 128, or the model's positions if fewer)")
    f.add_argument("--seed", type=nonneg_int, default=0,
                   help="seed of the head and adapter inits, the batch order and dropout (not of the split)")
    f.add_argument("--out", required=True, help="output folder (see above)")
    f.add_argument("--resume", action="store_true", help="continue from out/checkpoint")
    add_run_options(f)
    f.add_argument("--no-progress", action="store_true", help="no progress bar")

    m = sub.add_parser("methods", help="list registered methods")
    _add_debug(m)

    from .pretrain import add_parser as add_pretrain_parser

    add_pretrain_parser(sub)
    _add_debug(sub.choices["pretrain"])
    for command, module in COMMANDS.items():  # each module: add_parser(sub) and run(args)
        importlib.import_module(module).add_parser(sub)
        _add_debug(sub.choices[command])

    a = _sub(sub, "analyze", help="what fine-tuning changed per layer: spectra, ranks, intruder dimensions, "
                                  "CKA; writes report.html + report.md")
    a.add_argument("--base", required=True, help="base model folder or hub id")
    a.add_argument("--adapter", action="append",
                   help="rankwise or PEFT adapter folder, or a `rankwise finetune` --out folder (repeat to "
                        "compare several; none by default)")
    a.add_argument("--finetuned", action="append",
                   help="fully fine-tuned model folder: a save_pretrained folder, or the --out folder of "
                        "`rankwise finetune --method full` (repeatable; none by default)")
    a.add_argument("--data", nargs="?", const="stdlib", default=None,
                   help="CSV/JSONL for the representation measures; alone: stdlib docstrings "
                        "(default: none, weight measures only)")
    a.add_argument("--text-col", default="text", help="text column of --data")
    a.add_argument("--label-col", default="label", help="label column of --data")
    a.add_argument("--max-examples", type=positive_int, default=128, help="examples of --data used")
    a.add_argument("--max-length", type=positive_int, default=64, help="tokens per text")
    a.add_argument("--batch-size", type=positive_int, default=32, help="examples per forward pass")
    a.add_argument("--top-k", type=positive_int, default=10, help="intruder dimensions among the top k singular vectors")
    a.add_argument("--eps", type=float, default=0.5, help="intruder cosine-similarity threshold")
    a.add_argument("--rank", type=positive_int, default=8, help="r of the amplification factor and subspace similarity")
    a.add_argument("--layers", default=None, help="regex: analyze only matching layer names (default: all)")
    a.add_argument("--randomized", action="store_true", help="randomized SVD of the updates (error in the report)")
    a.add_argument("--seed", type=nonneg_int, default=0, help="seed of the example sample and random probes")
    a.add_argument("--out", default="analysis_report", help="output folder for report.html, report.md, PNGs")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


#: Sub-commands that live in their own module: ``name -> module`` with ``add_parser(sub)`` (adds the
#: ``name`` sub-parser) and ``run(args)``. A new command adds one line here.
COMMANDS: dict[str, str] = {"merge": "rankwise.cli.merge", "compress": "rankwise.cli.compress",
                            "serve": "rankwise.cli.serve"}


def run(argv=None):
    """Parse ``argv`` and run the command; return its result (or an exit code) and let errors raise."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # --nproc re-runs the same command under torchrun
    return _dispatch(parser, args)


def _dispatch(parser, args):
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

        return run_demo(args)
    if args.command == "analyze":
        from .analyze import run_analyze

        return run_analyze(args)
    if args.command == "pretrain":
        from .pretrain import run_pretrain

        return run_pretrain(args)
    if args.command == "finetune":
        from .finetune import run_finetune

        return run_finetune(args)
    if args.command in COMMANDS:
        return importlib.import_module(COMMANDS[args.command]).run(args)
    parser.print_help()
    return 1


def main(argv=None) -> int:
    """The ``rankwise`` entry point: run the command; an error is one line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints them and exits 2
    args._argv = list(sys.argv[1:] if argv is None else argv)  # --nproc re-runs the same command under torchrun
    try:
        result = _dispatch(parser, args)
    except KeyboardInterrupt:
        print(f"{_prog(args)}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure ends in one line (or the traceback with --debug)
        if getattr(args, "debug", False):
            traceback.print_exc()
        line, code = error_line(e, parser, args)
        print(line, file=sys.stderr)
        return code
    from ..core.distributed import shutdown

    shutdown()  # a run on several processes (--nproc, torchrun): every rank done, then the group destroyed
    return result if isinstance(result, int) else 0


def _prog(args) -> str:
    return f"rankwise {args.command}" if getattr(args, "command", None) else "rankwise"


def _is_user_error(e: BaseException) -> bool:
    import pickle

    from ..errors import RankwiseError

    return isinstance(e, (RankwiseError, OSError, ImportError, pickle.UnpicklingError))


def error_line(e: BaseException, parser: argparse.ArgumentParser, args) -> tuple[str, int]:
    """``(one line for stderr, exit code)`` for an exception raised by a command."""
    prog = _prog(args)
    msg = _message(e)
    if msg.startswith(prog + ":") or msg.startswith(prog + " "):  # "rankwise finetune" would be said twice
        msg = msg[len(prog):].lstrip(":").strip()
    msg = flag_names(msg, _command_parser(parser, args))
    if _is_user_error(e):
        return f"{prog}: error: {msg}", EXIT_USER_ERROR
    return (f"{prog}: unexpected error: {type(e).__name__}: {msg} (rerun with --debug for the traceback, and "
            "please report it)"), EXIT_UNEXPECTED


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None and e.strerror and e.filename is not None:
        what = {FileNotFoundError: "check the path", PermissionError: "check its permissions or pass another path",
                IsADirectoryError: "pass a file, not a folder", NotADirectoryError: "pass a folder"}
        fix = next((v for k, v in what.items() if isinstance(e, k)), "check the path")
        return f"{e.strerror}: {e.filename}; {fix}."
    import pickle

    if isinstance(e, pickle.UnpicklingError):  # torch.load(weights_only=True) refused a pickled .bin file
        return ("the model folder holds pickled weights that would run code to load (torch refused them: "
                f"{' '.join(str(e).split())[:160]}); rankwise never unpickles: use a folder with "
                "model.safetensors (save_pretrained(..., safe_serialization=True)).")
    if isinstance(e, ImportError) and e.name and str(e).startswith("No module named"):
        return f"{e}; install it (pip install {e.name.split('.')[0]}) or use a feature that does not need it."
    text = " ".join(str(e).split()) or type(e).__name__
    return text.strip("'\"") if isinstance(e, KeyError) else text


def _command_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, "command", None) in action.choices:
            return action.choices[args.command]
    return parser


def flag_names(msg: str, parser: argparse.ArgumentParser) -> str:
    """Show Python keyword names of ``parser``'s options as its flags: ``"Pass text_col= with one"``
    becomes ``"Pass --text-col with one"`` and ``"warmup=2.5 is"`` becomes ``"--warmup 2.5 is"``."""
    flags = {a.dest: a.option_strings[-1] for a in parser._actions
             if a.option_strings and a.option_strings[-1].startswith("--")}

    def repl(m):
        flag = flags.get(m.group(1))
        if flag is None:
            return m.group(0)
        nxt = msg[m.end():m.end() + 1]
        return flag if not nxt or nxt.isspace() or nxt in ",;)" else flag + " "

    return re.sub(r"(?<![\w.-])([a-z][a-z0-9_]*)=", repl, msg)


if __name__ == "__main__":
    sys.exit(main())
