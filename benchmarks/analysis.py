"""Time to analyze every linear layer of all-MiniLM-L6-v2 (37 matrices) with rankwise.analysis.

    python benchmarks/analysis.py             # 3 rounds of every configuration (minutes; longer on busy cores)
    python benchmarks/analysis.py --quick     # 1 round, no representation measures
    python benchmarks/analysis.py --out results.md

Setup: ``BertModel`` all-MiniLM-L6-v2 with its pooler: 37 linear layers (25 of 384×384, 6 of
1536×384, 6 of 384×1536). "LoRA" = rank-8 LoRA on all 37 with seeded random factors
(``ΔW/W0`` ≈ 2 %), analysed through the adapters' weight view; "full FT" = a copy whose 37 weights
got a dense seeded perturbation of the same relative size (full-rank ``ΔW``), analysed as two
checkpoints. Every configuration computes all weight measures of :func:`rankwise.analysis.analyze`
(SVDs of ``W0``, ``W`` and ``ΔW``; ranks, effective/stable ranks, intruder dimensions,
amplification, alignment); they differ in how:

* ``auto`` (default): full SVD of ``W0`` and ``W``, randomized top-32 SVD of ``ΔW`` accepted where
  it misses ≤ 1e-5 of ``‖ΔW‖_F²`` (every low-rank update), else recomputed exactly;
* ``full``: LAPACK SVD of ``ΔW`` too;
* ``cached base``: ``W0``'s SVD reused from an earlier call (several fine-tunes of one base);
* ``2 LAPACK threads``: the same as ``auto`` with ``rankwise.analysis.spectra.LINALG_THREADS = 2``;
* ``per-matrix measures``: :func:`matrix_measures` of the 37 ``W`` alone — full ``svdvals`` vs a
  randomized top-32 (spectral norm, energy at rank 8 and the stable-rank bound; error reported);
* ``unbatched loop``: one ``torch.linalg.svd`` per matrix, wide ones not transposed — what the
  batched, transposing implementation replaces;
* ``+ representations``: ``auto`` plus the data measures on 64 docstrings (≤ 64 tokens): two
  forward passes for per-layer CKA and RankMe, and the tangent kernels on 8 examples (4 probes).

Wall and CPU seconds are medians over rounds, configurations interleaved in a seeded random order
per round. The machine is shared, so CPU seconds are the steadier figure.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import rankwise as rw  # noqa: E402
from rankwise.analysis import analyze, matrix_measures  # noqa: E402
from rankwise.analysis import spectra as S  # noqa: E402
from rankwise.analysis.updates import layer_modules  # noqa: E402
from rankwise.core.api import adapted_layers  # noqa: E402


def build(seed: int = 0):
    base, lora = _minilm(), _minilm()
    rw.adapt(lora, "lora", rank=8, targets="all-linear")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(lora):
            ad = layer.adapters["default"]
            ad.lora_A.copy_(torch.randn(ad.lora_A.shape, generator=g) / ad.lora_A.shape[1] ** 0.5)
            ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.02)
    full = _minilm()
    with torch.no_grad():
        for m in layer_modules(full).values():
            w = m.weight
            w += torch.randn(w.shape, generator=g) * 0.02 * float(w.norm()) / w.numel() ** 0.5
    return base, lora, full


def _minilm():
    from transformers import AutoModel

    from rankwise.integrations.hf import minilm_path

    torch.manual_seed(0)
    return AutoModel.from_pretrained(minilm_path()).eval()


def docstring_batches(n: int = 64, max_length: int = 64, batch: int = 32):
    from transformers import AutoTokenizer

    from rankwise.data import stdlib_docstrings
    from rankwise.integrations.hf import ClassificationTask, minilm_path

    ds = stdlib_docstrings(max_per_family=n // 10 + 1)
    ds = ds.subset(list(range(0, len(ds), max(1, len(ds) // n)))[:n])
    task = ClassificationTask(AutoTokenizer.from_pretrained(minilm_path()), max_length=max_length)
    enc = task.encode(ds)
    return [task.collate(enc[i: i + batch]) for i in range(0, len(enc), batch)]


def unbatched(mats):
    """One LAPACK call per matrix, wide matrices as they are (on the same single thread)."""
    with S.linalg_threads():
        return {n: torch.linalg.svd(a, full_matrices=False) for n, a in mats.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    C.setup(threads=args.threads)
    rounds = 1 if args.quick else args.rounds
    info = C.env_info()
    base, lora, full = build()
    ws = {n: m.weight.detach() for n, m in layer_modules(base).items()}
    assert len(ws) == 37, len(ws)
    cache: dict = {}
    analyze(lora, cache=cache)  # fills the cache for "cached base"

    def with_threads(n, fn):
        def run():
            old = S.LINALG_THREADS
            S.LINALG_THREADS = n
            try:
                return fn()
            finally:
                S.LINALG_THREADS = old
        return run

    configs = {
        "LoRA, auto (default)": lambda: analyze(lora),
        "LoRA, full SVD of ΔW": lambda: analyze(lora, method="full"),
        "LoRA, auto, cached base": lambda: analyze(lora, cache=cache),
        "LoRA, auto, 2 LAPACK threads": with_threads(2, lambda: analyze(lora)),
        "full FT (dense ΔW), auto": lambda: analyze(base, full),
        "per-matrix measures of W0, full svdvals": lambda: matrix_measures(ws),
        "per-matrix measures of W0, randomized q=32": lambda: matrix_measures(ws, method="randomized", q=32),
        "batched svd of W0 (rankwise.analysis.svd)": lambda: S.svd(ws),
        "unbatched loop: torch.linalg.svd of W0": lambda: unbatched(ws),
    }
    if not args.quick:
        batches = docstring_batches()
        configs["LoRA, auto + representations (64 docstrings)"] = lambda: analyze(lora, batches=batches)

    # correctness of the fast paths against the exact ones
    a_auto, a_full = analyze(lora), analyze(lora, method="full")
    checks = {
        "ΔW ranks equal (auto vs full)": all(x["dW_rank"] == y["dW_rank"] for x, y in zip(a_auto.layers, a_full.layers)),
        "max |eff. rank ΔW| difference": max(abs(x["dW_erank"] - y["dW_erank"])
                                             for x, y in zip(a_auto.layers, a_full.layers)),
        "intruder counts equal": [x["intruders"] for x in a_auto.layers] == [x["intruders"] for x in a_full.layers],
    }
    exact = matrix_measures(ws)
    rnd = matrix_measures(ws, method="randomized", q=32)
    checks["randomized q=32 on W0: max rel. error of σ1"] = max(
        abs(rnd[n]["spectral"] - exact[n]["spectral"]) / exact[n]["spectral"] for n in ws)
    checks["randomized q=32 on W0: max energy@8 error"] = max(abs(rnd[n]["energy@8"] - exact[n]["energy@8"])
                                                             for n in ws)
    checks["randomized q=32 on W0: max stated tail (share of ‖W‖_F²)"] = max(rnd[n]["tail_energy"] for n in ws)

    wall: dict[str, list[float]] = {k: [] for k in configs}
    cpu: dict[str, list[float]] = {k: [] for k in configs}
    for fn in configs.values():  # warm-up
        fn()
    rng = random.Random(0)
    for _ in range(rounds):
        for name in rng.sample(list(configs), len(configs)):
            t, c = time.perf_counter(), time.process_time()
            configs[name]()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)

    headers = ["configuration", "median wall s", "median CPU s", "rounds"]
    rows = [[k, round(statistics.median(wall[k]), 3), round(statistics.median(cpu[k]), 3), len(wall[k])]
            for k in configs]
    env = ", ".join(f"{k}: {v}" for k, v in info.items()) + f"; load average at the end {C.load_average()}"
    print(C.table(rows, headers))
    print()
    for k, v in checks.items():
        print(f"{k}: {v if not isinstance(v, float) else f'{v:.3g}'}")
    print("\n" + env)
    if args.out:
        from rankwise.io.atomic import write_text

        md = C.table(rows, headers, markdown=True) + "\n\n" + "\n".join(
            f"- {k}: {v if not isinstance(v, float) else f'{v:.3g}'}" for k, v in checks.items()) + "\n\n" + env + "\n"
        write_text(args.out, md)


if __name__ == "__main__":
    main()
