"""Shared pieces of the ``demo`` and ``finetune`` commands: one fine-tuning run per method."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..core.api import adapt, parameter_count
from ..core.registry import get_method
from ..utils.memory import PeakRSS, release_free_memory, saved_activation_bytes
from ..utils.table import format_table

FULL = "full"
DEMO_RANK = 8  # rank of methods that have one and no demo default of their own


def trainable_count(model) -> int:
    """Number of trainable parameter values (each shared tensor once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        if p.requires_grad:
            seen[id(p)] = p.numel()
    return sum(seen.values())


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
        "trainable params": parameter_count(model).trainable,
        "accuracy": round(acc, 4),
        "final loss": round(sum(result.losses[-10:]) / max(1, len(result.losses[-10:])), 4),
        "wall time (s)": round(wall, 1),
        "peak RSS +MB": round(peak.peak_bytes / 2**20, 1),
        "train mem (MB)": round(sum(mem.values()) / 2**20, 1),
        "activations (MB)": round(mem["activations"] / 2**20, 1),
    }
    return row, result, model


#: What a save_pretrained model folder (weights, config, tokenizer files) may hold before it is replaced.
MODEL_NAMES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")


def is_model_dir(path: Path) -> bool:
    """A Hugging Face model folder: ``config.json`` holds a JSON object."""
    import json

    try:
        return isinstance(json.loads((Path(path) / "config.json").read_text()), dict)
    except (OSError, ValueError):
        return False


def has_rankwise_report(folder: Path) -> bool:
    """``folder/report.md`` opens with a rankwise title: the folder is an earlier rankwise output."""
    try:
        with open(Path(folder) / "report.md", encoding="utf-8", errors="replace") as f:
            return f.readline().startswith("# rankwise")
    except OSError:
        return False


def check_out(out, command: str, names: tuple[str, ...], adapters: tuple[str, ...] = (),
              models: tuple[str, ...] = ()) -> Path:
    """Check ``--out`` before any work: a folder that is new, empty, or an earlier output of a rankwise
    command holding only what ``command`` writes (``names``, fnmatch patterns); the adapter folders
    ``adapters`` and model folders ``models`` (``save_pretrained``) under it and its ``checkpoint/``
    must be replaceable too. A folder named in both ``adapters`` and ``models`` (``best/``) may be
    either. Raises :class:`~rankwise.errors.OutputPathError` (nothing written) otherwise."""
    from ..io.atomic import ADAPTER_NAMES, check_output_dir, is_adapter_dir
    from ..train import CHECKPOINT_NAMES, has_checkpoint

    def ours(folder: Path) -> bool:
        return (has_rankwise_report(folder) or has_checkpoint(folder / "checkpoint")
                or any(is_adapter_dir(folder / a) for a in adapters) or any(is_model_dir(folder / m) for m in models))

    for sub in dict.fromkeys(adapters + models):  # the folders first: their message names the user's file
        kinds = [(ADAPTER_NAMES, is_adapter_dir, "adapter")] if sub in adapters else []
        kinds += [(MODEL_NAMES, is_model_dir, "model")] if sub in models else []
        allowed = tuple(n for k in kinds for n in k[0])
        what = f"rankwise {command} --out: {' or '.join(k[2] for k in kinds)} folder"
        check_output_dir(Path(out) / sub, allowed, what, lambda d, ks=kinds: any(k[1](d) for k in ks))
    if "checkpoint" in names:
        check_output_dir(Path(out) / "checkpoint", CHECKPOINT_NAMES, f"rankwise {command} --out: checkpoint folder",
                         lambda d: (d / "trainer_state.json").is_file())
    check_output_dir(out, names, f"rankwise {command} --out", ours)
    return Path(out)


EMA_DECAY = 0.9


def ema(values: list[float], decay: float = EMA_DECAY) -> list[float]:
    """Exponential moving average ``m_1 = v_1``, ``m_t = decay · m_{t-1} + (1 - decay) · v_t``."""
    out, m = [], None
    for v in values:
        m = v if m is None else decay * m + (1 - decay) * v
        out.append(m)
    return out


def write_report(out: Path, title: str, rows: list[dict], curves: dict[str, list[float]], notes: str,
                 md_name: str = "report.md", png_name: str = "loss_curves.png",
                 evals: dict[str, list[tuple[int, dict]]] | None = None) -> Path:
    """``md_name`` (a table, the plot, notes) + ``png_name`` (loss curves) in ``out`` (atomic writes).

    Each curve is drawn as its EMA (:func:`ema`, decay 0.9); with at most 3 curves the per-step loss
    is drawn too, faint, in the same color. ``evals`` (``{name: [(step, {"loss": …, "accuracy": …})]}``,
    as :class:`~rankwise.train.TrainResult` holds them) adds the validation points: the loss on the
    loss axis, the accuracy on a second axis at the right."""
    from ..io.atomic import write_png, write_text

    out.mkdir(parents=True, exist_ok=True)
    png = out / png_name
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = evals or {}
    many = len(curves) > 10  # 20 colors x 2 line styles, legend beside the axes
    raw = len(curves) <= 3
    cols = 1 + (len(curves) - 1) // 24 if many else 1
    fig, ax = plt.subplots(figsize=(7 + 1.6 * cols if many else 7, 4.5 if many else 4))
    colors = plt.get_cmap("tab20").colors if many else [f"C{i % 10}" for i in range(len(curves))]
    acc_ax = None
    for i, (name, losses) in enumerate(curves.items()):
        style = {"color": colors[i % 20], "linestyle": ("-", "--")[(i // 20) % 2]} if many else {"color": colors[i]}
        steps = range(1, len(losses) + 1)
        if raw:
            ax.plot(steps, losses, lw=0.7, alpha=0.35, label=f"{name}: loss per step", **style)
        ax.plot(steps, ema(losses), label=f"{name}: EMA {EMA_DECAY}" if raw else name, linewidth=1.3, **style)
        points = [(s, m) for s, m in evals.get(name, []) if m]
        vl = [(s, m["loss"]) for s, m in points if "loss" in m]
        if vl:
            ax.plot(*zip(*vl), marker="o", ms=5, ls="none", label=f"{name}: validation loss", **style)
        va = [(s, m["accuracy"]) for s, m in points if "accuracy" in m]
        if va:
            acc_ax = acc_ax or ax.twinx()
            acc_ax.plot(*zip(*va), marker="s", ms=4, ls=":", lw=0.9, label=f"{name}: validation accuracy", **style)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (training: per step and EMA 0.9)" if raw else "training loss (EMA 0.9)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if acc_ax is not None:
        acc_ax.set_ylabel("validation accuracy")
        acc_ax.set_ylim(0, 1.02)
        h2, l2 = acc_ax.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if many:
        ax.legend(fontsize=7, ncol=cols, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(handles, labels, fontsize=7, loc="upper right")
    fig.tight_layout()
    write_png(png, fig)
    headers = list(rows[0]) if rows else []
    table = format_table([[r[h] for h in headers] for r in rows], headers, markdown=True)
    md = f"# {title}\n\n{table}\n\n![loss curves]({png_name})\n\n{notes}\n"
    write_text(out / md_name, md)
    return out / md_name


def print_table(rows: list[dict]) -> None:
    headers = list(rows[0])
    print(format_table([[r[h] for h in headers] for r in rows], headers))


