"""Shared pieces of the ``demo`` and ``finetune`` commands: one fine-tuning run per method."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..core.api import adapt, trainable_parameters
from ..core.registry import get_method
from ..utils.memory import PeakRSS, release_free_memory, saved_activation_bytes
from ..utils.table import format_table

FULL = "full"
DEMO_RANK = 8  # rank of methods that have one and no demo default of their own


def method_options(method: str, rank: int | None = None, **overrides) -> dict:
    """Options for ``rw.adapt``: the method's ``demo_options`` (its usual setting: VeRA's rank 256,
    Bone's 64, LoLDU's full rank …), then ``rank`` if given (it overrides the demo rank), else
    :data:`DEMO_RANK` for a method with a rank and no demo rank; then the other ``overrides``."""
    cls = get_method(method)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    opts = dict(cls.demo_options)
    if "rank" in fields:
        if rank is not None:
            opts["rank"] = rank
        else:
            opts.setdefault("rank", DEMO_RANK)
    opts.update({k: v for k, v in overrides.items() if v is not None and k in fields})
    return opts


def default_lr(method: str) -> float:
    return 2e-4 if method == FULL else get_method(method).default_lr


def train_memory_bytes(model, batch, loss_fn) -> dict[str, int]:
    """Training memory by part: weights, gradients, AdamW state, saved activations (one batch).

    Activations are measured exactly with autograd's saved-tensor hooks; the rest is counted
    from the parameters, so the figure is deterministic (unlike sampled RSS).
    """
    params = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    with saved_activation_bytes(model) as s:
        loss = loss_fn(model, batch)
    del loss
    return {"weights": weights, "grads": trainable, "optimizer": 2 * trainable, "activations": s.bytes}


CALIBRATION_BATCHES = 4


def calibration_for(method: str, task, train_enc, batch_size: int, n: int = CALIBRATION_BATCHES) -> dict:
    """``adapt`` keywords for a data-driven init (the method declares ``calibration_needs``): the
    first ``n`` training batches and the task's loss; ``{}`` for every other method."""
    if method == FULL or not get_method(method).calibration_needs:
        return {}
    from ..core.calibrate import Batches

    batches = [task.collate(train_enc[i:i + batch_size]) for i in range(0, min(len(train_enc), n * batch_size),
                                                                         batch_size)]
    return {"calibration": Batches(batches, loss_fn=task.loss, progress=False), "loss_fn": task.loss}


def prepare(model, method: str, options: dict, head: list[str], seed: int, **calibration):
    if method == FULL:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    return adapt(model, method, seed=seed, modules_to_save=head, **calibration, **options)


def run_one(method, make_model, options, task, train_enc, valid_enc, cfg, head, desc, progress=True):
    """Fine-tune one method on a fresh model; return (row dict, TrainResult, model). A data-driven
    init sees the first training batches (:func:`calibration_for`); its time counts as training."""
    from ..train import train

    model = make_model()
    t_init = time.perf_counter()
    model = prepare(model, method, options, head, cfg.seed,
                    **calibration_for(method, task, train_enc, cfg.batch_size))
    t_init = time.perf_counter() - t_init
    model.train()
    mem = train_memory_bytes(model, task.collate(train_enc[: cfg.batch_size]), task.loss)
    release_free_memory()  # so memory freed by the previous method does not hide this one's peak
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        result = train(model, train_enc, task.collate, task.loss, cfg, eval_fn=task.evaluator(valid_enc),
                       progress=progress, desc=desc)
    wall = time.perf_counter() - t0 + t_init
    acc = result.evals[-1][1]["accuracy"] if result.evals else float("nan")
    row = {
        "method": method,
        "rank": options.get("rank", "-") if method != FULL else "-",
        "trainable params": trainable_parameters(model),
        "accuracy": round(acc, 4),
        "final loss": round(sum(result.losses[-10:]) / max(1, len(result.losses[-10:])), 4),
        "wall time (s)": round(wall, 1),
        "peak RSS +MB": round(peak.peak_bytes / 2**20, 1),
        "train mem (MB)": round(sum(mem.values()) / 2**20, 1),
        "activations (MB)": round(mem["activations"] / 2**20, 1),
    }
    return row, result, model


def check_out(out, command: str, names: tuple[str, ...], adapters: tuple[str, ...] = ()) -> Path:
    """Check ``--out`` before any work: a folder that is new, empty, or an earlier output of a rankwise
    command holding only what ``command`` writes (``names``, fnmatch patterns); the adapter folders
    ``adapters`` under it and its ``checkpoint/`` must be replaceable too. Raises
    :class:`~rankwise.errors.OutputPathError` (nothing written) otherwise."""
    from ..io.atomic import ADAPTER_NAMES, check_output_dir, is_adapter_dir
    from ..train import CHECKPOINT_NAMES, has_checkpoint

    def ours(folder: Path) -> bool:
        try:
            with open(folder / "report.md", encoding="utf-8", errors="replace") as f:
                if f.readline().startswith("# rankwise"):
                    return True
        except OSError:
            pass
        return has_checkpoint(folder / "checkpoint") or any(is_adapter_dir(folder / a) for a in adapters)

    for sub in adapters:  # the folders first: their message names the user's file
        check_output_dir(Path(out) / sub, ADAPTER_NAMES, f"rankwise {command} --out: adapter folder", is_adapter_dir)
    if "checkpoint" in names:
        check_output_dir(Path(out) / "checkpoint", CHECKPOINT_NAMES, f"rankwise {command} --out: checkpoint folder",
                         lambda d: (d / "trainer_state.json").is_file())
    check_output_dir(out, names, f"rankwise {command} --out", ours)
    return Path(out)


def write_report(out: Path, title: str, rows: list[dict], curves: dict[str, list[float]], notes: str,
                 md_name: str = "report.md", png_name: str = "loss_curves.png") -> Path:
    """``md_name`` (a table, the plot, notes) + ``png_name`` (loss curves) in ``out`` (atomic writes)."""
    from ..io.atomic import atomic_path, write_text

    out.mkdir(parents=True, exist_ok=True)
    png = out / png_name
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(curves) > 10  # 20 colors x 2 line styles, legend beside the axes
    cols = 1 + (len(curves) - 1) // 24 if many else 1
    fig, ax = plt.subplots(figsize=(7 + 1.6 * cols if many else 7, 4.5 if many else 4))
    colors = plt.get_cmap("tab20").colors if many else [None] * len(curves)
    for i, (name, losses) in enumerate(curves.items()):
        ema, sm = [], None
        for v in losses:
            sm = v if sm is None else 0.9 * sm + 0.1 * v
            ema.append(sm)
        style = {"color": colors[i % 20], "linestyle": ("-", "--")[(i // 20) % 2]} if many else {}
        ax.plot(range(1, len(ema) + 1), ema, label=name, linewidth=1.3, **style)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (EMA 0.9)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, ncol=cols, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    headers = list(rows[0]) if rows else []
    table = format_table([[r[h] for h in headers] for r in rows], headers, markdown=True)
    md = f"# {title}\n\n{table}\n\n![loss curves]({png_name})\n\n{notes}\n"
    write_text(out / md_name, md)
    return out / md_name


def print_table(rows: list[dict]) -> None:
    headers = list(rows[0])
    print(format_table([[r[h] for h in headers] for r in rows], headers))


