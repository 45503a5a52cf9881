"""Data- and weight-driven adapter inits on all-MiniLM-L6-v2: rankwise against PEFT's own implementation.

    python benchmarks/init.py              # full run (a few minutes on 2 cores)
    python benchmarks/init.py --quick      # smoke run: 1 repeat, 2 calibration batches
    python benchmarks/init.py --out init.md

Setup: ``BertModel`` all-MiniLM-L6-v2 (22.7M parameters, no pooler), fp32, all 36 linear layers
(rankwise ``targets="all-linear"``, PEFT ``target_modules="all-linear"``), r = 16, α = 16.
Calibration: ``--batches`` batches of 1 × 64 random token ids (batch size 1 because PEFT's CorDA
hook assumes it); gradient inits use the loss MSE(mean-pooled last hidden state, fixed random target).

Measured per row, each in a fresh subprocess (``rankwise.utils.memory.PeakRSS``: the kernel's VmHWM):

* init wall time: everything from the plain model to the adapted one — for rankwise one
  ``rw.adapt`` call (it runs the calibration itself); for PEFT the preprocessing it needs
  (``preprocess_corda``, ``preprocess_loraga``, ``initialize_lora_eva_weights``) plus
  ``get_peft_model``. Median of ``--repeats`` runs on fresh copies of the model;
* peak RSS above the loaded model during the first run.

"x PEFT" is rankwise's time / PEFT's time for the same init from the same process pair. PEFT's
LoftQ (``init_lora_weights="loftq"``) moves weights to cuda/xpu and cannot run on a CPU-only
machine; MiLoRA, NLoRA and LoRA-SB are not in PEFT.

Second table: randomized SVD (:func:`rankwise.linalg.randomized_svd`, 8 oversamples, ``niter``
power iterations) against the full SVD (``torch.linalg.svd``) on MiniLM's weight shapes, all
layers of a shape batched in one call: time, and the spectral error ``‖W − U S Vh‖₂`` relative to
the optimum ``σ_{r+1}``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import rankwise as rw  # noqa: E402
from rankwise.core.calibrate import Batches  # noqa: E402
from rankwise.utils.memory import PeakRSS  # noqa: E402

RANK = ALPHA = 16
# method → (rankwise options, PEFT init or None)
ROWS = {
    "pissa": ({}, "pissa"),
    "pissa niter=4": ({"niter": 4}, "pissa_niter_4"),
    "milora": ({}, None),
    "olora": ({}, "olora"),
    "nlora": ({}, None),
    "corda": ({}, "corda"),
    "eva": ({}, "eva"),
    "lora_ga": ({}, "lora_ga"),
    "lora_sb": ({}, None),
    "loftq": ({}, "loftq (needs CUDA)"),
}


def batches(n: int) -> list[dict]:
    return [C.token_batch(30522, 1, 64, seed=100 + i) for i in range(n)]


def make_loss():
    target = torch.randn(1, 384, generator=torch.Generator().manual_seed(7))

    def loss_fn(model, batch):
        return (model(**batch).last_hidden_state.mean(1) - target).square().mean()

    return loss_fn


def rankwise_init(model, row: str, data):
    opts, _ = ROWS[row]
    method = row.split()[0]
    kw = {}
    if method in ("corda", "eva", "lora_ga", "lora_sb"):
        kw["calibration"] = Batches(data, progress=False, loss_fn=make_loss())
    rw.adapt(model, method, rank=RANK, alpha=ALPHA, targets="all-linear", seed=0, **opts, **kw)
    return model


def peft_init(model, row: str, data):
    from peft import LoraConfig, get_peft_model

    init = ROWS[row][1]
    cfg = dict(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=init)
    # preprocess_corda / preprocess_loraga do not expand "all-linear": name MiniLM's linear layers (no pooler)
    named = {**cfg, "target_modules": ["query", "key", "value", "dense"]}
    if init == "corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        lc = LoraConfig(**named, corda_config=CordaConfig(corda_method="ipm"))
        preprocess_corda(model, lc, run_model=lambda: [model(**b) for b in data])
        return get_peft_model(model, lc)
    if init == "eva":
        from peft.tuners.lora.config import EvaConfig
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        pm = get_peft_model(model, LoraConfig(**cfg, eva_config=EvaConfig(rho=2.0)))
        initialize_lora_eva_weights(pm, data, show_progress_bar=False)
        return pm
    if init == "lora_ga":
        import warnings

        from peft.tuners.lora import LoraGAConfig, preprocess_loraga

        lc = LoraConfig(**named, lora_ga_config=LoraGAConfig())
        loss_fn = make_loss()

        def train_step():
            for b in data:
                loss_fn(model, b).backward()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            preprocess_loraga(model, lc, train_step)
        return get_peft_model(model, lc)
    return get_peft_model(model, LoraConfig(**cfg))


def child(impl: str, row: str, n_batches: int, repeats: int) -> dict:
    base = C.load_minilm()
    data = batches(n_batches)
    fn = rankwise_init if impl == "rankwise" else peft_init
    times, peak = [], None
    for i in range(repeats):
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        with PeakRSS() as m:
            t0 = time.perf_counter()
            fn(model, row, data)
            times.append(time.perf_counter() - t0)
        if i == 0:
            peak = m.peak_bytes
        del model
    return {"time": C.median(times), "peak": peak}


def svd_table(ranks=(16,), niters=(0, 2, 4)) -> list[list]:
    from rankwise.linalg import randomized_svd

    base = C.load_minilm()
    shapes: dict[tuple, list] = {}
    for mod in base.modules():
        if isinstance(mod, torch.nn.Linear):
            shapes.setdefault(tuple(mod.weight.shape), []).append(mod.weight.detach())
    rows = []
    for shape, ws in shapes.items():
        stack = torch.stack(ws)
        t0 = time.perf_counter()
        sv_all = torch.linalg.svd(stack, full_matrices=False)
        t_full = time.perf_counter() - t0
        for r in ranks:
            opt = sv_all.S[:, r]  # σ_{r+1}: the optimal spectral error
            rows.append([f"{len(ws)} x {shape[0]}x{shape[1]}", r, "full SVD", C.ms(t_full), "1.000"])
            for q in niters:
                t0 = time.perf_counter()
                u, s, vh = randomized_svd(stack, r, oversample=8, niter=q, generator=torch.Generator().manual_seed(0))
                t = time.perf_counter() - t0
                err = torch.linalg.matrix_norm(stack - (u * s.unsqueeze(-2)) @ vh, ord=2)
                rows.append(["", "", f"randomized niter={q}", C.ms(t), f"{float((err / opt).max()):.3f}"])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, help="calibration batches (default 8, quick 2)")
    ap.add_argument("--repeats", type=int, help="timed runs per row (default 3, quick 1)")
    ap.add_argument("--rows", help="comma list of rows (default: all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batches = args.batches or (2 if args.quick else 8)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.child:
        C.setup(args.threads)
        impl, row = args.child.split(":", 1)
        C.emit(child(impl, row, args.batches, args.repeats))
        return
    C.setup(args.threads)
    rows_sel = args.rows.split(",") if args.rows else list(ROWS)
    out = []
    script = os.path.abspath(__file__)
    common = ["--batches", str(args.batches), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    for row in rows_sel:
        mine = C.run_child(script, ["--child", f"rankwise:{row}", *common])
        peft_name = ROWS[row][1]
        theirs = None
        if peft_name is not None and "CUDA" not in peft_name:
            try:
                theirs = C.run_child(script, ["--child", f"peft:{row}", *common])
            except RuntimeError as e:  # report PEFT's failure in the row, keep going
                print(f"PEFT {row} failed: {str(e).splitlines()[-1]}", flush=True)
                peft_name += " (failed)"
        out.append([row, C.ms(mine["time"]), C.mib(mine["peak"]), peft_name or "-",
                    C.ms(theirs["time"]) if theirs else "-", C.mib(theirs["peak"]) if theirs else "-",
                    C.ratio(mine["time"] / theirs["time"]) if theirs else "-",
                    C.ratio(mine["peak"] / theirs["peak"]) if theirs and theirs["peak"] else "-"])
        print(" | ".join(str(x) for x in out[-1]), flush=True)
    headers = ["method", "rankwise ms", "rankwise peak MiB", "PEFT init", "PEFT ms", "PEFT peak MiB",
               "time x PEFT", "memory x PEFT"]
    md = [f"# Init benchmark (MiniLM, all-linear, r={RANK}, {args.batches} calibration batches 1x64, "
          f"{args.repeats} repeats)\n", str(C.env_info()), "", C.table(out, headers, markdown=True), ""]
    svd_rows = svd_table()
    md += ["## Randomized vs full SVD on MiniLM's weight shapes (batched per shape)", "",
           C.table(svd_rows, ["layers x shape", "r", "method", "ms", "‖W − USVh‖₂ / σ_{r+1} (max)"], markdown=True)]
    text = "\n".join(md)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
