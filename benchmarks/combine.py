"""Combining adapters and mixtures of LoRA experts on the demo task (issue 16's evidence).

    python benchmarks/combine.py --out combine.json            # about 8 minutes on one thread
    python benchmarks/combine.py --steps 6 --per-family 12     # smoke run

Task: ``rankwise.cli.demo.demo_task`` — all-MiniLM-L6-v2 classifying Python standard-library docstrings by
module family — split into 3 sub-tasks by label groups (labels ``i`` with ``i mod 3 = t`` form task
``t``). Each sub-task gets a LoRA (rank 4 on query/value, its own copy of the classifier head) trained
for ``--steps`` steps on its examples only. A sub-task's accuracy is measured on its own validation
examples with the prediction restricted to its labels (a per-task head, as in the merging literature).

Part 1 — combining: the three adapters merged by each ``rw.combine`` method (weights 1 each, the
heads by task arithmetic), each task's accuracy divided by its own single-task adapter's ("normalized
accuracy", 1 = no loss from merging); time of ``rw.combine`` and the peak RSS above the start during it
(the kernel's high-water mark).

Part 2 — mixtures trained on the union of the three sub-tasks for ``--steps`` steps, against one LoRA
with about as many parameters (rank 10 on query/value): accuracy on the whole validation set, and the
time of a forward pass (eval, no gradients, batch of 32) over LoRA's, all configurations interleaved
(median of the per-round ratios). MoLE and the per-token variant route over the three trained
sub-task LoRAs (only the router and the head train); MixLoRA, HydraLoRA and SMoRA start from fresh
experts. Everything runs on one thread (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import env_info, interleaved, median, paired_ratio, setup, table  # noqa: E402

import rankwise as rw  # noqa: E402
from rankwise import compose  # noqa: E402
from rankwise.analysis.routing import routing_table  # noqa: E402
from rankwise.utils.memory import PeakRSS, release_free_memory  # noqa: E402

TASKS = 3
HEAD = ["classifier"]
TARGETS = ["query", "value"]

COMBINE = [  # (label, method, options)
    ("linear (task arithmetic)", "linear", {}),
    ("cat", "cat", {}),
    ("svd r=8", "svd", {"rank": 8}),
    ("ties d=0.5", "ties", {"density": 0.5}),
    ("ties_svd d=0.5 r=8", "ties_svd", {"density": 0.5, "rank": 8}),
    ("dare_linear d=0.5", "dare_linear", {"density": 0.5, "seed": 0}),
    ("dare_ties d=0.5", "dare_ties", {"density": 0.5, "seed": 0}),
    ("magnitude_prune d=0.5", "magnitude_prune", {"density": 0.5}),
    ("iso_c", "iso_c", {}),
    ("iso_cts", "iso_cts", {}),
    ("knots (ties)", "knots", {"density": 0.5}),
    ("lora_lego r=4", "lora_lego", {"rank": 4, "seed": 0}),
    ("soup (uniform)", "soup", {}),
]


def groups(n_labels: int) -> list[list[int]]:
    return [[i for i in range(n_labels) if i % TASKS == t] for t in range(TASKS)]


@torch.no_grad()
def accuracy(model, task, encoded, labels=None, batch_size=32) -> float:
    """Accuracy on ``encoded``; with ``labels``, the arg-max over those labels only."""
    model.eval()
    right = 0
    for i in range(0, len(encoded), batch_size):
        batch = task.collate(encoded[i:i + batch_size])
        target = batch.pop("labels")
        logits = model(**batch).logits
        if labels is not None:
            idx = torch.tensor(labels)
            pred = idx[logits[:, idx].argmax(-1)]
        else:
            pred = logits.argmax(-1)
        right += int((pred == target).sum())
    return right / max(1, len(encoded))


def train(model, name, task, encoded, steps, batch_size, lr, seed):
    from rankwise.train import TrainConfig
    from rankwise.train import train as run

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    model.train()
    t0 = time.perf_counter()
    result = run(model, encoded, task.collate, task.loss, cfg, progress=False, desc=name)
    return time.perf_counter() - t0, result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--per-family", type=int, default=60)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    setup(threads=1, seed=args.seed)
    torch.set_num_threads(1)
    from rankwise.cli.demo import demo_task
    from rankwise.integrations.hf import minilm_path

    t_start = time.perf_counter()
    data, train_ds, valid_ds, task, train_enc, valid_enc, make_model = demo_task(
        minilm_path(), args.per_family, args.seed, args.max_length)
    label_groups = groups(len(data.label_names))
    tr = [[e for e in train_enc if e[1] in g] for g in label_groups]
    va = [[e for e in valid_enc if e[1] in g] for g in label_groups]
    print(f"demo task: {len(data.label_names)} labels in {TASKS} sub-tasks "
          f"{[[data.label_names[i] for i in g] for g in label_groups]}; train {[len(t) for t in tr]}, "
          f"valid {[len(v) for v in va]}; {args.steps} steps × batch {args.batch_size}", flush=True)

    # ---- single-task adapters ---------------------------------------------------------------------
    model = make_model()
    names = [f"task{t}" for t in range(TASKS)]
    single, train_s = [], 0.0
    for t, name in enumerate(names):
        rw.adapt(model, "lora", name=name, rank=4, targets=TARGETS, modules_to_save=HEAD, seed=args.seed + t)
        secs, _ = train(model, name, task, tr[t], args.steps, args.batch_size, args.lr, args.seed)
        train_s += secs
        single.append(accuracy(model, task, va[t], label_groups[t]))
    rw.set_active(model, None)
    base_acc = [accuracy(model, task, va[t], label_groups[t]) for t in range(TASKS)]
    print(f"single-task adapters: {[round(a, 3) for a in single]} (untrained head: "
          f"{[round(a, 3) for a in base_acc]}), {train_s:.0f} s", flush=True)

    # ---- part 1: combine ----------------------------------------------------------------------------
    combine_rows = []
    for label, method, opts in COMBINE:
        release_free_memory()
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            rw.combine(model, names, None if method == "soup" else [1.0] * TASKS, "merged", method=method, **opts)
        secs = time.perf_counter() - t0
        accs = [accuracy(model, task, va[t], label_groups[t]) for t in range(TASKS)]
        norm = [a / s if s else float("nan") for a, s in zip(accs, single)]
        rank = max(layer.adapters["merged"].lora_A.shape[0] for _, layer in rw.core.api.adapted_layers(model)
                   if "merged" in layer.adapters)
        combine_rows.append({"method": label, "rank": rank, **{f"task{t} norm": round(n, 3) for t, n in enumerate(norm)},
                             "mean norm": round(sum(norm) / TASKS, 3), "combine ms": round(secs * 1e3, 1),
                             "peak RSS +MB": round(peak.peak_bytes / 2**20, 1)})
        print(f"  {label:<24} mean normalized accuracy {combine_rows[-1]['mean norm']:.3f} "
              f"({secs * 1e3:.0f} ms)", flush=True)
        rw.delete(model, "merged")

    # ---- part 2: mixtures on the union ----------------------------------------------------------------
    union = [e for t in tr for e in t]
    lora_cfg = {"rank": 10}
    fresh = {
        "MixLoRA (4 experts r=2, top-2)": compose.preset("mixlora", rank=2, experts=4),
        "HydraLoRA (shared A r=3, 4 heads)": compose.preset("hydralora", rank=3, experts=4),
        "SMoRA (6 rank-1 experts, top-2)": compose.preset("smora", rank=1, experts=6, top_k=2),
    }
    models, mix_rows = {}, []

    def finish(label, m, secs, name="default"):
        acc = accuracy(m, task, valid_enc)
        row = {"setup": label, "trainable params": rw.parameter_count(m).trainable, "accuracy": round(acc, 4),
               "train s": round(secs, 1)}
        mix_rows.append(row)
        models[label] = m
        print(f"  {label:<36} accuracy {acc:.3f} ({row['trainable params']:,} params, {secs:.0f} s)", flush=True)

    m = make_model()
    rw.adapt(m, "lora", targets=TARGETS, modules_to_save=HEAD, seed=args.seed, **lora_cfg)
    finish("LoRA r=10 (reference)", m, train(m, "lora", task, union, args.steps, args.batch_size, args.lr,
                                             args.seed)[0])
    for label, router in (("MoLE: layer gates over the 3 LoRAs", "layer"),
                          ("per-token router over the 3 LoRAs", "token")):
        m = copy.deepcopy(model)  # the trained sub-task adapters stay on `model`; build on a copy
        compose.mixture(m, names, "mix", router=router, modules_to_save=HEAD, seed=args.seed)
        finish(label, m, train(m, "mix", task, union, args.steps, args.batch_size, args.lr, args.seed)[0], "mix")
    for label, opts in fresh.items():
        m = make_model()
        rw.adapt(m, "mole", targets=TARGETS, modules_to_save=HEAD, seed=args.seed, **opts)
        finish(label, m, train(m, "mole", task, union, args.steps, args.batch_size, args.lr, args.seed)[0])

    # forward time of each against LoRA's, interleaved
    batch = task.collate(valid_enc[:32])
    batch.pop("labels")
    for m in models.values():
        m.eval()

    def fwd(m):
        def call():
            with torch.no_grad():
                return m(**batch)
        return call

    times = interleaved({k: fwd(m) for k, m in models.items()}, rounds=args.rounds, warmup=1, seed=args.seed)
    ref = "LoRA r=10 (reference)"
    for row in mix_rows:
        row["forward ms"] = round(median(times[row["setup"]]) * 1e3, 1)
        row["forward vs LoRA"] = round(paired_ratio(times[row["setup"]], times[ref]), 3)
    routing = {}
    for label, m in models.items():
        if label == ref:
            continue
        tab = routing_table(m, [task.collate(valid_enc[i:i + 32]) for i in range(0, min(64, len(valid_enc)), 32)])
        rows = [r for r in tab]
        routing[label] = {"mean norm_entropy": round(sum(r["norm_entropy"] for r in rows) / len(rows), 3),
                          "mean imbalance": round(sum(r["imbalance"] for r in rows) / len(rows), 3)}
    for row in mix_rows:
        row.update(routing.get(row["setup"], {"mean norm_entropy": "-", "mean imbalance": "-"}))

    total = time.perf_counter() - t_start
    result = {"env": env_info(), "args": {k: str(v) for k, v in vars(args).items()}, "single": single,
              "untrained": base_acc, "combine": combine_rows, "mixtures": mix_rows, "seconds": round(total, 1)}
    c_head = list(combine_rows[0])
    m_head = list(mix_rows[0])
    print()
    print(table([[r[h] for h in c_head] for r in combine_rows], c_head, markdown=True))
    print()
    print(table([[r[h] for h in m_head] for r in mix_rows], m_head, markdown=True))
    print(f"\ntotal {total:.0f} s")
    if args.out is not None:
        from rankwise.io.atomic import write_json

        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
