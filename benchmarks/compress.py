"""Quality vs compression for rankwise.compress, on one CPU thread.

    python benchmarks/compress.py [--quick] [--out benchmarks/results/compress]

(a) all-MiniLM-L6-v2 fully fine-tuned briefly on the demo task (stdlib docstrings → module family),
    then compressed without retraining: validation accuracy.
(b) a small LLaMA (byte-level, ``rankwise pretrain`` recipe: stdlib source, AdamW, warmup-cosine)
    trained a few hundred steps, then compressed: held-out perplexity (stdlib validation files).

Methods: svd, asvd, svd_llm, fwsvd, cur, welore at kept-parameter ratios 0.8 / 0.6 / 0.4 of the
compressed layers (the papers' 20 / 40 / 60 % compression), svd_llm with the heterogeneous allocation,
and eora (rank 8) on top of int4 against int4 alone. Calibration: 16 training texts / 16 windows of
128 bytes. Writes results.json, report.md and quality_vs_compression.png into --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import rankwise.compress as rc  # noqa: E402
from rankwise.io.atomic import write_json, write_png, write_text  # noqa: E402

METHODS = ("svd", "asvd", "svd_llm", "fwsvd", "cur", "welore")
RATIOS = (0.8, 0.6, 0.4)


def run_grid(name, model, metric, calib, loss_fn, methods, ratios, progress=False):
    rows = []
    base_bytes = rc.model_bytes(model)
    base_params = sum(p.numel() for p in model.parameters())
    t = time.perf_counter()
    m0 = metric(model)
    rows.append({"task": name, "method": "dense", "ratio": 1.0, "params": base_params, "bytes": base_bytes,
                 "metric": m0, "seconds": 0.0, "eval s": time.perf_counter() - t})
    print(f"[{name}] dense: {m0:.4f}", flush=True)
    plans = [(m, r, "uniform") for m in methods for r in ratios] + [("svd_llm", r, "heterogeneous") for r in ratios]
    for method, ratio, alloc in plans:
        mdl = copy.deepcopy(model)
        rep = rc.compress(mdl, method, ratio=ratio, allocation=alloc, calibration=calib, loss_fn=loss_fn,
                          progress=progress)
        t = time.perf_counter()
        val = metric(mdl)
        label = method if alloc == "uniform" else f"{method}+hetero"
        rows.append({"task": name, "method": label, "ratio": ratio, "params": rep.params_after, "bytes": rep.bytes_after,
                     "metric": val, "seconds": rep.seconds, "eval s": time.perf_counter() - t})
        print(f"[{name}] {label} ratio {ratio}: {val:.4f} ({rep.seconds:.1f} s)", flush=True)
    for method in ("int4", "eora"):
        mdl = copy.deepcopy(model)
        rep = rc.compress(mdl, "eora", rank=8, calibration=calib, quant="int4", progress=progress)
        if method == "int4":  # the quantized base alone: switch the compensation off
            import rankwise as rw

            rw.set_active(mdl, None)
            nbytes = rep.bytes_after - sum(4 * 8 * sum(r["shape"]) for r in rep)
        else:
            nbytes = rep.bytes_after
        t = time.perf_counter()
        val = metric(mdl)
        rows.append({"task": name, "method": method if method == "int4" else "eora r8 + int4", "ratio": None,
                     "params": rep.params_after, "bytes": nbytes, "metric": val, "seconds": rep.seconds,
                     "eval s": time.perf_counter() - t})
        print(f"[{name}] {rows[-1]['method']}: {val:.4f}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- (a)
def minilm(args):
    import torch.nn.functional as F

    from rankwise.cli.demo import demo_task
    from rankwise.integrations.hf import minilm_path
    from rankwise.train import TrainConfig, train

    data, train_ds, valid_ds, task, train_enc, valid_enc, make_model = demo_task(minilm_path(), 60 if args.quick else 100,
                                                                                0, 64)
    model = make_model()
    t = time.perf_counter()
    train(model, train_enc, task.collate, task.loss,
          TrainConfig(steps=20 if args.quick else 60, batch_size=16, lr=1e-4, seed=0), progress=False)
    ft_s = time.perf_counter() - t
    model.eval()
    calib_items = train_enc[:16]
    calib = [task.collate(calib_items[i:i + 4]) for i in range(0, 16, 4)]
    calib = [{k: v for k, v in b.items()} for b in calib]

    def loss_fn(m, b):
        return F.cross_entropy(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])

    from rankwise.core.calibrate import Batches

    def fwd(m, b):
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    src = Batches(calib, loss_fn=loss_fn, forward=fwd, progress=False)
    rows = run_grid("MiniLM demo (accuracy)", model, lambda m: task.accuracy(m, valid_enc), src, loss_fn,
                    METHODS, RATIOS)
    return rows, {"finetune s": ft_s, "train": len(train_ds), "valid": len(valid_ds), "labels": len(data.label_names)}


# ---------------------------------------------------------------------------------------------- (b)
def llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankwise.cli.pretrain import Windows, collate, lm_loss, model_config, stdlib_bytes
    from rankwise.train import TrainConfig, train

    steps = 60 if args.quick else 300
    cfg = LlamaConfig(**model_config("llama-tiny", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=4))
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    train_s, valid_s = stdlib_bytes(steps * 8 * 128, 64 * 128)
    t = time.perf_counter()
    train(model, Windows(train_s, 128), collate, lm_loss,
          TrainConfig(steps=steps, batch_size=8, lr=2e-3, warmup=0.1, seed=0), progress=False)
    train_time = time.perf_counter() - t
    model.eval()
    valid = Windows(valid_s, 128)
    train_w = Windows(train_s, 128)

    @torch.no_grad()
    def ppl(m):
        total = 0.0
        for i in range(0, len(valid), 16):
            ids = collate([valid[j] for j in range(i, min(i + 16, len(valid)))])
            total += float(lm_loss(m, ids)) * ids.shape[0]
        return math.exp(total / len(valid))

    calib = [collate([train_w[j] for j in range(i, i + 4)]) for i in range(0, 16, 4)]
    calib = [{"input_ids": c} for c in calib]

    def loss_fn(m, b):
        return lm_loss(m, b["input_ids"])

    params = sum(p.numel() for p in model.parameters())
    rows = run_grid("LLaMA stdlib (perplexity)", model, ppl, calib, loss_fn, METHODS, RATIOS)
    return rows, {"train s": train_time, "steps": steps, "params": params}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4))
    axes = [axes] if len(tasks) == 1 else axes
    for ax, task in zip(axes, tasks):
        rs = [r for r in rows if r["task"] == task]
        dense = next(r for r in rs if r["method"] == "dense")
        for m in dict.fromkeys(r["method"] for r in rs):
            pts = sorted((r["bytes"] / dense["bytes"], r["metric"]) for r in rs if r["method"] == m)
            ax.plot(*zip(*pts), "o-" if len(pts) > 1 else "s", label=m)
        ax.set_xlabel("bytes stored / dense")
        ax.set_ylabel(task.split("(")[-1].rstrip(")"))
        if "perplexity" in task:
            ax.set_yscale("log")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_png(path, fig, dpi=110)


def markdown(rows) -> str:
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        dense = next(r for r in rs if r["method"] == "dense")
        out.append(f"**{task}** (dense: {dense['metric']:.4f}, {dense['params']:,} params, {dense['bytes']:,} bytes)\n")
        ratios = sorted({r["ratio"] for r in rs if r["ratio"] not in (None, 1.0)}, reverse=True)
        out.append("| method | " + " | ".join(f"kept {p:.0%} of layer params" for p in ratios) + " | compress s |")
        out.append("|---|" + "---:|" * (len(ratios) + 1))
        for m in dict.fromkeys(r["method"] for r in rs if r["ratio"] not in (None, 1.0)):
            cells = []
            for p in ratios:
                r = next((x for x in rs if x["method"] == m and x["ratio"] == p), None)
                cells.append("–" if r is None else f"{r['metric']:.4f} ({r['bytes'] / dense['bytes']:.2f}× bytes)")
            secs = sum(x["seconds"] for x in rs if x["method"] == m) / max(1, len(cells))
            out.append(f"| {m} | " + " | ".join(cells) + f" | {secs:.1f} |")
        for r in rs:
            if r["ratio"] is None:
                out.append(f"| {r['method']} | {r['metric']:.4f} ({r['bytes'] / dense['bytes']:.2f}× bytes) |"
                           + " |" * len(ratios) + f" {r['seconds']:.1f} |")
        out.append("")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer training steps (a smoke run)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "compress"))
    p.add_argument("--only", choices=("minilm", "llama"), default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows, info = [], {}
    if args.only in (None, "llama"):
        r, i = llama(args)
        rows += r
        info["llama"] = i
    if args.only in (None, "minilm"):
        r, i = minilm(args)
        rows += r
        info["minilm"] = i
    info["wall s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {"rows": rows, "info": info})
    md = markdown(rows)
    write_text(out / "report.md", f"# rankwise compress benchmark\n\n{md}\n\n{json.dumps(info)}\n")
    plot(rows, out / "quality_vs_compression.png")
    print(md)
    print(info)


if __name__ == "__main__":
    main()
