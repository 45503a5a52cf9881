"""Intruder dimensions after full fine-tuning and after LoRA, at matched accuracy, on the demo task.

    python benchmarks/intruders.py                 # full FT 80 steps; LoRA r=8 80 steps, more if needed to match
    python benchmarks/intruders.py --out results.md

Reproduces, at small scale, the direction of the finding of Shuttleworth et al., "LoRA vs Full
Fine-tuning: An Illusion of Equivalence" (2024): weight matrices trained with LoRA get new
high-ranking singular vectors ("intruder dimensions": among the top ``k`` left singular vectors of
the fine-tuned ``W``, those whose best |cos| to every left singular vector of ``W0`` is below ``ε``);
full fine-tuning barely does.

Setup: the ``rankwise demo`` task (stdlib docstrings → 10 module families, 1118 train / 378 valid),
all-MiniLM-L6-v2 with a new classification head, AdamW, warmup + cosine, batch 16, seed 0; the
demo's learning rates (full 2e-4, LoRA 3e-3). Full fine-tuning runs ``--steps``; LoRA r=8 on all
linear layers runs ``--steps`` and, while its validation accuracy is more than ``--match`` below
full fine-tuning's, again with ``--steps`` more (up to ``--max-factor`` × ``--steps``), so the two
are compared at matched accuracy. Intruders are counted on the 37 layers LoRA adapts (the head,
trained by both, is left out), with ``k = 10`` and ``ε`` swept as in the paper, over all 37 layers
and over the 36 encoder layers alone: the pooler of all-MiniLM-L6-v2 (unused by sentence-transformers)
has a flat spectrum (σ_1..σ_12 all within 0.32–0.35), so any update rotates its top singular vectors
and it counts "intruders" for both methods — an artefact of near-equal singular values, not of LoRA.
A second table lists the layers that have intruders.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from rankwise.analysis import analyze  # noqa: E402
from rankwise.cli.common import FULL, default_lr, method_options, run_one  # noqa: E402
from rankwise.data import stdlib_docstrings  # noqa: E402
from rankwise.integrations.hf import ClassificationTask, load_sequence_classifier, minilm_path  # noqa: E402
from rankwise.train import TrainConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--eps", default="0.3,0.5,0.7,0.9")
    ap.add_argument("--match", type=float, default=0.01, help="accuracy gap that counts as matched")
    ap.add_argument("--max-factor", type=int, default=4, help="LoRA runs at most this many × --steps")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (1: on shared cores 2 threads ran 4x slower per step)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the tables as Markdown")
    args = ap.parse_args()
    C.setup(threads=args.threads, seed=args.seed)
    eps = [float(e) for e in args.eps.split(",")]

    data = stdlib_docstrings(max_per_family=150)
    train_ds, valid_ds = data.split(valid_frac=0.25, seed=args.seed)
    path = minilm_path()
    _, tok = load_sequence_classifier(path, num_labels=len(data.label_names), seed=args.seed)
    task = ClassificationTask(tok, max_length=64)
    train_enc, valid_enc = task.encode(train_ds), task.encode(valid_ds)

    def make_model():
        return load_sequence_classifier(path, num_labels=len(data.label_names), seed=args.seed)[0]

    info = C.env_info()
    cache: dict = {}
    results = []

    per_layer = []

    def record(label, steps, row, analysis, seconds):
        enc = {n: c for n, c in analysis.intruder_cos.items() if ".encoder." in f".{n}"}
        results.append({"run": label, "steps": steps, "accuracy": row["accuracy"],
                        "trainable params": row["trainable params"],
                        "‖ΔW‖/‖W0‖": analysis.summary["relative weight change"],
                        "median rank ΔW": analysis.summary["median rank ΔW"],
                        **{f"intruders ε={e} (37 / encoder)": f"{analysis.intruders(e)} / "
                           f"{sum(int((c < e).sum()) for c in enc.values())}" for e in eps},
                        "train s": round(seconds, 1)})
        for n, c in analysis.intruder_cos.items():
            counts = [int((c < e).sum()) for e in eps]
            if any(counts):
                per_layer.append([label + f" ({steps} steps)", n] + counts)

    # full fine-tuning
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=default_lr(FULL), seed=args.seed)
    t0 = time.perf_counter()
    row, _, model = run_one(FULL, make_model, {}, task, train_enc, valid_enc, cfg, ["classifier"], desc="full")
    t_full = time.perf_counter() - t0
    full_acc = row["accuracy"]
    base = make_model()
    lora_layers = None

    # LoRA, lengthened until its accuracy matches
    opts = method_options("lora", rank=args.rank)
    lora_runs = []
    for factor in range(1, args.max_factor + 1):
        steps = factor * args.steps
        cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=default_lr("lora"), seed=args.seed)
        t0 = time.perf_counter()
        lrow, _, lmodel = run_one("lora", make_model, opts, task, train_enc, valid_enc, cfg, ["classifier"],
                                  desc=f"lora x{factor}")
        t_lora = time.perf_counter() - t0
        la = analyze(lmodel, name=f"lora r={args.rank}", k=args.k, cache=cache)
        lora_layers = [r["layer"] for r in la.layers]
        lora_runs.append((f"LoRA r={args.rank}", steps, lrow, la, t_lora))
        del lmodel
        if lrow["accuracy"] >= full_acc - args.match:
            break

    layers = "^(?:" + "|".join(n.replace(".", r"\.") for n in lora_layers) + ")$"
    fa = analyze(base, model, name="full", k=args.k, cache=cache, layers=layers)
    record("full fine-tuning", args.steps, row, fa, t_full)
    for label, steps, lrow, la, t in lora_runs:
        record(label, steps, lrow, la, t)

    headers = list(results[0])
    table = C.table([list(r.values()) for r in results], headers)
    lh = ["run", "layer"] + [f"ε={e}" for e in eps]
    md = (C.table([list(r.values()) for r in results], headers, markdown=True) + "\n\nLayers with intruders:\n\n"
          + C.table(per_layer, lh, markdown=True))
    print("\n" + table + "\n\nLayers with intruders (counts among the top k):\n" + C.table(per_layer, lh))
    print("\n" + ", ".join(f"{k}: {v}" for k, v in info.items()) + f"; load average at end {C.load_average()}")
    if args.out:
        from rankwise.io.atomic import write_text

        write_text(args.out, md + "\n\n" + ", ".join(f"{k}: {v}" for k, v in info.items()) + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
