"""GaLore's subspace refresh: exact vs randomized SVD, all matrices on one step vs staggered (issue 18).

    python benchmarks/refresh.py                   # 14 matrices of 512 x 1408, rank 32, T = 14; ~2 min
    python benchmarks/refresh.py --shape 2048 5632 --rank 128 --rounds 3 --out results.md

Two questions about the defaults of :mod:`rankwise.optim` (``projector="auto"``,
``stagger_refresh="auto"``: exact SVD and no stagger on the CPU, randomized SVD and staggered
refreshes on a GPU):

1. **Latency.** ``GaLoreAdamW`` on ``n`` matrices (default 14 of 512 x 1408: a quarter of the
   issue's 2048 x 5632 in each dimension) with their gradients set, stepped for one refresh cycle
   of ``T`` steps after the first (whose step builds every basis in every configuration). Five
   configurations, interleaved per round (``_common.interleaved``): svd / randomized_svd, each
   unstaggered (galore-torch's schedule: every SVD on one step of the cycle) and staggered (about
   ``n / T`` SVDs on each step), and the defaults (``"auto"``: the first on the CPU, the fourth on
   a GPU). Reported: the median step, the slowest step of a cycle (median
   over rounds), the whole cycle, and the slowest step as a multiple of galore-torch's.
2. **Quality of the randomized basis.** The fraction of the gradient's energy the rank-``r`` basis
   captures, ``‖Pᵀ G‖²_F / ‖U_rᵀ G‖²_F`` (1 = the exact top-``r`` subspace), for the real
   gradients of all-MiniLM-L6-v2's 36 linear layers (one batch of random token ids, MSE of the
   mean-pooled output against a random target) at the chosen rank, with the projector's default
   options (8 extra test vectors, 1 power iteration).

The gradients of part 1 are synthetic, ``U diag(σ) Vᵀ`` with ``σ_i = i^-1`` (random orthogonal
``U, V``): the refresh cost does not depend on the values, only on the shapes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import rankwise as rw  # noqa: E402
from rankwise.optim.projectors import make_projector  # noqa: E402

CONFIGS = {  # name: (projector, stagger_refresh)
    "svd, all on one step (galore-torch)": ("svd", False),
    "randomized_svd, all on one step": ("randomized_svd", False),
    "svd, staggered": ("svd", True),
    "randomized_svd, staggered (GPU default)": ("randomized_svd", True),
    "defaults (auto) on this device": ("auto", "auto"),
}


def power_law_gradient(m: int, n: int, seed: int, device="cpu") -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, device=device))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=g, device=device))[0]
    sigma = 1.0 / torch.arange(1, k + 1, dtype=torch.float32, device=device)
    return (u * sigma) @ v.t()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def cycle_fn(params, projector: str, stagger, rank: int, gap: int, step_times: list):
    """One function per configuration: each call runs one refresh cycle (T steps) and appends the
    per-step seconds to ``step_times``; the first call also runs the initial step (every basis)."""
    opt = rw.optim.GaLoreAdamW([{"params": params, "rank": rank, "update_proj_gap": gap, "projector": projector,
                                 "stagger_refresh": stagger}], lr=1e-6)
    opt.step()  # step 0: every matrix builds its first basis

    device = params[0].device

    def run():
        times = []
        for _ in range(gap):
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            times.append(time.perf_counter() - t0)
        step_times.append(times)

    return run


def latency_table(args, device="cpu") -> tuple[list[list], list[str]]:
    """The latency table for ``args.matrices`` matrices of ``args.shape`` on ``device`` (also used by
    ``gpu.py``)."""
    m, n = args.shape
    grads = [power_law_gradient(m, n, i, device) for i in range(args.matrices)]
    times: dict[str, list[list[float]]] = {}
    fns = {}
    for name, (projector, stagger) in CONFIGS.items():
        params = [torch.nn.Parameter(torch.zeros(m, n, device=device)) for _ in grads]
        for p, g in zip(params, grads):
            p.grad = g
        times[name] = []
        fns[name] = cycle_fn(params, projector, stagger, args.rank, args.gap, times[name])
    C.interleaved(fns, rounds=args.rounds, warmup=1)
    rows = []
    ref_worst = None
    for name, cycles in times.items():
        cycles = cycles[1:]  # the warm-up cycle is dropped
        steps = [t for c in cycles for t in c]
        worst = C.median([max(c) for c in cycles])
        total = C.median([sum(c) for c in cycles])
        ref_worst = worst if ref_worst is None else ref_worst
        rows.append([name, C.ms(C.median(steps)), C.ms(worst), C.ms(total), f"{worst / ref_worst:.3f}"])
    return rows, ["configuration", "median step ms", "slowest step ms", "cycle ms", "slowest x galore-torch"]


def minilm_gradients():
    import torch.nn.functional as F

    model = C.load_minilm(0).train()
    batch = C.token_batch(model.config.vocab_size, 8, 32, seed=0)
    target = torch.randn(8, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    F.mse_loss(model(**batch).last_hidden_state.mean(1), target).backward()
    return {n: mod.weight.grad.detach().clone() for n, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and mod.weight.grad is not None}


def captured(basis_thin: torch.Tensor, side: str, g: torch.Tensor) -> float:
    low = basis_thin.t() @ g if side == "left" else g @ basis_thin.t()
    return float(low.square().sum())


def quality_table(args) -> tuple[list[list], list[str]]:
    grads = minilm_gradients()
    ratios = []
    for i, g in enumerate(grads.values()):
        energy = {}
        for kind in ("svd", "randomized_svd"):
            state: dict = {}
            proj = make_projector(kind, args.rank, state=state, seed=i) if kind != "svd" else \
                make_projector(kind, args.rank, state=state)
            proj.update(g, 0)
            energy[kind] = captured(state["proj_basis"], proj.side, g)
        ratios.append(energy["randomized_svd"] / energy["svd"])
    ratios.sort()
    rows = [["all-MiniLM-L6-v2 linear-layer gradients", len(ratios), args.rank, f"{C.median(ratios):.4f}",
             f"{ratios[0]:.4f}", f"{ratios[-1]:.4f}"]]
    return rows, ["gradients", "matrices", "rank", "median captured", "min", "max"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=2, default=(512, 1408))
    ap.add_argument("--matrices", type=int, default=14)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--gap", type=int, default=14, help="update_proj_gap T")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the tables as markdown here")
    args = ap.parse_args(argv)
    C.setup(args.threads)
    print(f"{C.cpu_name()}, torch {torch.__version__}, {args.threads} threads, load {C.load_average()}")
    lat, lat_h = latency_table(args)
    qual, qual_h = quality_table(args)
    title = (f"GaLoreAdamW, {args.matrices} matrices {args.shape[0]}x{args.shape[1]}, rank {args.rank}, "
             f"T = {args.gap}, {args.rounds} cycles each (interleaved)")
    print(title)
    print(C.table(lat, lat_h))
    print("randomized SVD basis (oversample 8, 1 power iteration): share of the exact top-r energy")
    print(C.table(qual, qual_h))
    if args.out:
        from rankwise.io.atomic import atomic_path

        with atomic_path(args.out) as tmp:
            tmp.write_text(f"{title}\n\n{C.table(lat, lat_h, markdown=True)}\n\n{C.table(qual, qual_h, markdown=True)}\n")


if __name__ == "__main__":
    main()
