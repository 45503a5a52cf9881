"""Low-rank pretraining from scratch at equal tokens: full-rank AdamW (learning rate tuned) against
GaLore, APOLLO-Mini, LoQT, SLTrain, ReLoRA, SST and CoLA.

    python benchmarks/pretrain.py            # full run (~20 min, one thread)
    python benchmarks/pretrain.py --quick    # smoke run (~2 min): few steps, one seed

Setup (the recipe of ``rankwise pretrain``, :mod:`rankwise.cli.pretrain`): ``LlamaForCausalLM``
``llama-micro`` (hidden 64, 2 layers, MLP 172, 4 heads, byte vocabulary 256: 0.13M parameters, a
quarter of them embeddings/output layer) with the same random init per seed for every row;
byte-level tokens of the standard library's ``.py`` files, ``steps × batch × seq`` tokens in the
same order for every row of a seed (300 × 16 × 128 = 0.61M tokens per run); warmup 10% then cosine
(ReLoRA: its jagged cosine), gradient clipping 1.0, fp32, one thread. Validation: 32K held-out
bytes (every 20th stdlib file), loss in nats/byte and perplexity ``exp(loss)``.

Rows, all at rank 16 = hidden / 4 (the papers' ratio, e.g. 128 at width 512) on the attention and
MLP projections (embeddings, norms and the output layer stay dense and train with AdamW):

* ``full``: AdamW; its learning rate swept over ``--full-lrs`` (default 1e-3, 3e-3, 1e-2, 3e-2) on
  seed 0, the best validation loss wins, then seeds 1 and 2 at that rate (the sweep is reported).
* ``galore`` / ``apollo-mini``: the dense model, projected optimizer (scale 0.25 / 128, subspace
  refresh every ``steps / 8``).
* ``loqt`` (NF4 base, first merge gap ``steps / 8``, growth 1.2), ``sltrain`` (density 0.03),
  ``relora`` (merge every ``steps / 4``, 99% magnitude pruning of the state, jagged cosine), ``sst``
  (resample every ``steps / 8``), ``cola`` (SiLU bottleneck): parametrized model, AdamW.

The low-rank rows get a smaller sweep than full rank, two learning rates on seed 0, ``{lr*, 3·lr*}``
with ``lr*`` the tuned full-rank rate (factorized models usually want a larger step), then 3 seeds.
(``--quick``: ``lr*`` only.)

Measured per row (mean ± std over seeds): validation perplexity; stored MB (every persistent
tensor of the model: parameters and buffers such as LoQT's packed codes and SLTrain's indices);
optimizer-state MB (``rankwise.optim.state_bytes``); ``W+G+S`` MB = stored + gradients of the
trainable parameters + optimizer state (the training memory without activations); peak RSS of 5
training steps above the loaded model, in a fresh process per row; tokens/s of training (evaluation
excluded). Every number also as a ratio to full rank. Output: a table on stdout,
``benchmarks/results/pretrain.md`` and ``benchmarks/results/pretrain.png`` (validation loss against
tokens per row; perplexity against training memory).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from rankwise.cli.pretrain import (  # noqa: E402
    Windows,
    _schedule,
    build_model,
    collate,
    evaluator,
    lm_loss,
    make_optimizer,
    parametrize_model,
    stdlib_bytes,
)

MODEL = "llama-micro"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROWS = ("full", "galore", "apollo-mini", "loqt", "sltrain", "relora", "sst", "cola")


def _spec(row: str, steps: int) -> dict:
    """How row ``row`` is built: optimizer, parametrization and their options."""
    gap = max(2, steps // 8)
    if row in ("full", "galore", "apollo-mini"):
        return {"optimizer": "adamw" if row == "full" else row, "kind": "full", "options": {},
                "opt": {} if row == "full" else {"rank": 16, "update_gap": gap}}
    options = {"loqt": {"reset_every": gap}, "sltrain": {"density": 0.03},
               "relora": {"reset_every": max(2, steps // 4)}, "sst": {"reset_every": gap}, "cola": {}}[row]
    return {"optimizer": "adamw", "kind": row, "options": options, "opt": {}}


def build(row: str, steps: int, seed: int, lr: float):
    spec = _spec(row, steps)
    model = build_model(MODEL, seed=seed)
    parametrize_model(model, spec["kind"], seed=seed, **spec["options"])
    opt = make_optimizer(spec["optimizer"], model, lr=lr, **spec["opt"])
    return model, opt, spec


def stored_bytes(model) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def run_one(row: str, seed: int, lr: float, args, data) -> dict:
    from rankwise.optim import state_bytes
    from rankwise.train import TrainConfig, train

    train_w, valid_w = data
    model, opt, spec = build(row, args.steps, seed, lr)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=lr, warmup=0.1, seed=seed, max_grad_norm=1.0,
                      eval_every=max(1, args.steps // 8))
    evaluate, spent = evaluator(valid_w), [0.0]

    def timed_eval(m):
        t = time.perf_counter()
        try:
            return evaluate(m)
        finally:
            spent[0] += time.perf_counter() - t

    result = train(model, train_w, collate, lm_loss, cfg, eval_fn=timed_eval, optimizer=opt, progress=False,
                   desc=row, lr_lambda=_schedule(model, spec["kind"], cfg))
    final = result.evals[-1][1]
    state = state_bytes(opt, model)["total"]
    stored = stored_bytes(model)
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    tokens = args.steps * args.batch * args.seq
    return {"row": row, "seed": seed, "lr": lr, "loss": final["loss"], "ppl": final["perplexity"],
            "stored": stored, "state": state, "wgs": stored + grads + state,
            "tok_s": tokens / max(result.wall_time - spent[0], 1e-9),
            "curve": [(s * args.batch * args.seq, m["loss"]) for s, m in result.evals]}


def child_peak(row: str, args) -> None:
    """In a fresh process: peak RSS of 5 training steps above the loaded model and optimizer."""
    from rankwise.utils.memory import PeakRSS, release_free_memory

    torch.set_num_threads(1)
    model, opt, spec = build(row, args.steps, 0, 1e-3)
    ids = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    release_free_memory()
    with PeakRSS() as peak:
        for step in range(1, 6):
            opt.zero_grad(set_to_none=True)
            lm_loss(model, ids).backward()
            opt.step()
            from rankwise.core.rank import rank_step

            rank_step(model, step, opt, total_steps=args.steps)
    C.emit({"peak_bytes": peak.peak_bytes})


def _mean_std(xs) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 30 steps, 1 seed, 3 full-rank learning rates, "
                                                         "one for the others")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--full-lrs", default=None, help="comma-separated AdamW learning rates to sweep")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (30 if args.quick else 300)
    seeds = args.seeds or (1 if args.quick else 3)
    if args.child:
        C.setup(threads=1)
        return child_peak(args.child, args)
    C.setup(threads=1)
    rows = [r.strip() for r in args.rows.split(",")]
    full_lrs = [float(x) for x in (args.full_lrs or ("1e-3,3e-3,1e-2" if args.quick else "1e-3,3e-3,1e-2,3e-2"))
                .split(",")]
    info = C.env_info()
    t0 = time.perf_counter()
    train_s, valid_s = stdlib_bytes(args.steps * args.batch * args.seq, 8192 if args.quick else 32768)
    data = (Windows(train_s, args.seq), Windows(valid_s, args.seq))

    runs: dict[str, list[dict]] = {}
    sweeps: dict[str, list[dict]] = {}

    def log(r):
        print(f"  {r['row']:<12} seed {r['seed']} lr {r['lr']:.0e}: valid loss {r['loss']:.4f} ppl {r['ppl']:.3f} "
              f"{r['tok_s']:,.0f} tok/s  [{time.perf_counter() - t0:,.0f} s]", flush=True)

    # 1. full rank: sweep the learning rate on seed 0, then the other seeds at the best
    sweeps["full"] = []
    for lr in full_lrs:
        r = run_one("full", 0, lr, args, data)
        log(r)
        sweeps["full"].append(r)
    best_full = min(sweeps["full"], key=lambda r: r["loss"])
    lr_star = best_full["lr"]
    runs["full"] = [best_full] + [run_one("full", s, lr_star, args, data) for s in range(1, seeds)]
    for r in runs["full"][1:]:
        log(r)
    # 2. low-rank rows: {lr*, 3 lr*} (and the paper's rate for the projected optimizers) on seed 0
    for row in rows:
        if row == "full":
            continue
        cands = [lr_star] if args.quick else sorted({lr_star, 3 * lr_star})
        sweeps[row] = []
        for lr in cands:
            r = run_one(row, 0, lr, args, data)
            log(r)
            sweeps[row].append(r)
        best = min(sweeps[row], key=lambda r: r["loss"] if math.isfinite(r["loss"]) else math.inf)
        runs[row] = [best] + [run_one(row, s, best["lr"], args, data) for s in range(1, seeds)]
        for r in runs[row][1:]:
            log(r)
    train_time = time.perf_counter() - t0
    # 3. peak RSS, each row in a fresh process
    peaks = {}
    for row in ["full", *[r for r in rows if r != "full"]]:
        cmd = ["--child", row, "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
        peaks[row] = C.run_child(os.path.abspath(__file__), cmd)["peak_bytes"]
    wall = time.perf_counter() - t0
    report(runs, sweeps, peaks, info, args, seeds, wall, train_time)


def report(runs, sweeps, peaks, info, args, seeds, wall, train_time) -> None:
    base = runs["full"]
    b_ppl = statistics.fmean(r["ppl"] for r in base)
    b = {k: statistics.fmean(r[k] for r in base) for k in ("stored", "state", "wgs", "tok_s")}
    headers = ["row", "lr", f"valid ppl (mean ± std, {seeds} seeds)", "ppl / full", "stored MB", "/ full",
               "opt state MB", "/ full", "W+G+S MB", "/ full", "peak RSS +MB", "/ full", "tokens/s", "/ full"]
    table = []
    for row, rs in runs.items():
        m, s = _mean_std([r["ppl"] for r in rs])
        v = {k: statistics.fmean(r[k] for r in rs) for k in ("stored", "state", "wgs", "tok_s")}
        table.append([row, f"{rs[0]['lr']:.0e}", f"{m:.3f} ± {s:.3f}", f"{m / b_ppl:.3f}",
                      round(v["stored"] / 2**20, 3), f"{v['stored'] / b['stored']:.2f}",
                      round(v["state"] / 2**20, 3), f"{v['state'] / b['state']:.2f}",
                      round(v["wgs"] / 2**20, 3), f"{v['wgs'] / b['wgs']:.2f}",
                      round(peaks[row] / 2**20, 1), f"{peaks[row] / max(peaks['full'], 1):.2f}",
                      f"{v['tok_s']:,.0f}", f"{v['tok_s'] / b['tok_s']:.2f}"])
    sweep_rows = [[row, f"{r['lr']:.0e}", f"{r['loss']:.4f}", f"{r['ppl']:.3f}",
                   "best" if r["lr"] == runs[row][0]["lr"] else ""] for row, rs in sweeps.items() for r in rs]
    print()
    print(C.table(table, headers))
    print()
    print(C.table(sweep_rows, ["row", "lr", "valid loss (seed 0)", "valid ppl", ""]))
    tokens = args.steps * args.batch * args.seq
    env = "; ".join(f"{k} {v}" for k, v in info.items())
    md = (f"Setup: `{MODEL}`, {args.steps} steps × batch {args.batch} × {args.seq} bytes = {tokens:,} tokens per "
          f"run, {seeds} seed(s). Wall time {wall / 60:.1f} min (training {train_time / 60:.1f} min). {env}.\n\n"
          + C.table(table, headers, markdown=True) + "\n\nLearning-rate sweep (seed 0):\n\n"
          + C.table(sweep_rows, ["row", "lr", "valid loss (seed 0)", "valid ppl", "chosen"], markdown=True) + "\n")
    os.makedirs(args.out, exist_ok=True)
    name = "pretrain_quick" if args.quick else "pretrain"
    from rankwise.io.atomic import write_text

    write_text(os.path.join(args.out, f"{name}.md"), md)
    plot(runs, peaks, os.path.join(args.out, f"{name}.png"))
    print(f"\nwall time {wall / 60:.1f} min; wrote {os.path.join(args.out, name)}.md/.png")


def plot(runs, peaks, path) -> None:
    import matplotlib

    from rankwise.io.atomic import write_png

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row, rs in runs.items():
        xs = [x for x, _ in rs[0]["curve"]]
        ys = [statistics.fmean(r["curve"][i][1] for r in rs) for i in range(len(xs))]
        ax1.plot([x / 1e6 for x in xs], ys, "o-", ms=3, label=row, lw=2.5 if row == "full" else 1.2)
        m, s = _mean_std([r["ppl"] for r in rs])
        wgs = statistics.fmean(r["wgs"] for r in rs) / 2**20
        ax2.errorbar([wgs], [m], yerr=[s], fmt="o", capsize=3)
        ax2.annotate(row, (wgs, m), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax1.set_xlabel("training tokens (M)")
    ax1.set_ylabel("validation loss (nats / byte, mean over seeds)")
    ax1.set_title(f"{MODEL}: validation loss at equal tokens")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("weights + gradients + optimizer state (MB)")
    ax2.set_ylabel("final validation perplexity (mean ± std)")
    ax2.set_title("perplexity against training memory")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    write_png(path, fig, dpi=110)


if __name__ == "__main__":
    main()
