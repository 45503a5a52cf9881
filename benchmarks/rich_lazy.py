"""Rich vs lazy learning against the effective rank of the initial weights, at small scale on CPU.

    python benchmarks/rich_lazy.py                 # the README run (about 10-15 min, one thread)
    python benchmarks/rich_lazy.py --quick         # smoke run (< 1 min)
    python benchmarks/rich_lazy.py --seeds 5 --n 256

Reproduces the setting of Liu, Baratin, Cornford, Mihalas, Shea-Brown & Lajoie, "How connectivity structure
shapes rich and lazy learning in neural circuits" (ICLR 2024, arXiv:2310.08513), scaled down:

* a leaky (continuous-time, ``Δt/τ = 0.2``) RNN of ``N`` units with a leaky-ReLU nonlinearity
  (negative slope 0.1): ``h_{t+1} = (1-a) h_t + a (W_rec φ(h_t) + W_in u_t + b)``, ``z_t = W_out φ(h_t)``;
  ``W_rec`` is drawn ``N(0, g²/N)`` with gain ``g = 1.5`` and re-initialized with ``rw.init.low_rank_``
  to rank ``r ∈ {1, 2, 4, 8, 16, 32, N}`` at the full-rank draw's Frobenius norm (the paper's protocol);
* task ``2af``: two-alternative evidence accumulation — a noisy scalar stimulus of coherence
  ``c ∈ ±{0.05, 0.1, 0.2, 0.4}`` (noise σ = 1) for 20 steps, answer ``sign(c)`` in the last 5 of 25;
  task ``cxt``: context-dependent decision (Mante et al. 2013) — two noisy stimuli, a one-hot context,
  answer the sign of the stimulus the context names (same coherences and noise; target MSE 0.15);
* every weight (``W_in, W_rec, b, W_out``) trained with Adam (lr 1e-3, batch 64 fresh trials) until the
  loss (MSE in the answer window) on a fixed 256-trial validation batch is ≤ the task's target;
* measured at the end: the relative change of the recurrent weight ``‖W_T − W_0‖_F / ‖W_0‖_F``
  (``rankwise.analysis.relative_weight_change``) and the tangent-kernel movement ``1 − A(K_0, K_T)``,
  ``A`` the uncentered kernel alignment (``rankwise.analysis.kernel_alignment(centered=False)``) of the
  empirical NTKs (``rankwise.analysis.tangent_kernel``, with respect to all three weight matrices, exact:
  one backward per output) on a fixed 32-trial probe batch; x-axis: the effective rank
  (``rankwise.analysis.effective_rank``) of ``W_rec`` at init;
* the exception the paper reports: ``aligned`` — a rank-1 ``W_rec`` built by ``rw.init.aligned_low_rank_``
  from the task's own vectors, ``W_rec ∝ W_outᵀ (Σ_stim W_in[:, s])ᵀ`` (it reads the stimulus input
  direction and writes the readout direction), at the same Frobenius norm (a rankwise construction:
  the paper's own aligned RNN init could not be read from here);
* controls: ``spectral`` — the 2af runs with low-rank weights rescaled to the full-rank draw's top
  singular value instead of its Frobenius norm (``norm="spectral"``); ``linear`` — the two-layer linear
  student-teacher of the paper's theory (``d = 64`` inputs, ``h = 64`` hidden, scalar teacher
  ``y = βᵀx``), ``W_1`` at each rank, full-batch gradient descent to a fixed loss, plus the
  aligned rank-1 ``W_1`` (row space along ``β``: the paper's Proposition 1).

Writes a Markdown table (stdout, and ``--out``) and ``benchmarks/results/rich_lazy.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import rankwise as rw  # noqa: E402
from rankwise.analysis import effective_rank, kernel_alignment, relative_weight_change, tangent_kernel  # noqa: E402
from rankwise.io.atomic import write_png, write_text  # noqa: E402

GAIN, LEAK, SLOPE = 1.5, 0.2, 0.1
LAYERS = ["inp", "rec", "out"]


# ---- the network -------------------------------------------------------------------------------
class RNN(nn.Module):
    def __init__(self, n_in: int, n: int, n_out: int, resp: int):
        super().__init__()
        self.inp = nn.Linear(n_in, n, bias=False)
        self.rec = nn.Linear(n, n)
        self.out = nn.Linear(n, n_out)
        self.resp, self.n = resp, n

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """``u (B, T, n_in)`` → the outputs of the answer window, flattened ``(B, resp · n_out)``."""
        h = u.new_zeros(u.shape[0], self.n)
        outs = []
        for t in range(u.shape[1]):
            h = (1 - LEAK) * h + LEAK * (self.rec(F.leaky_relu(h, SLOPE)) + self.inp(u[:, t]))
            if t >= u.shape[1] - self.resp:
                outs.append(self.out(F.leaky_relu(h, SLOPE)))
        return torch.stack(outs, 1).reshape(u.shape[0], -1)


def build_rnn(task, n: int, rank: int, mode: str, seed: int) -> RNN:
    g = torch.Generator().manual_seed(seed)
    net = RNN(task.n_in, n, 1, task.resp)
    with torch.no_grad():
        net.inp.weight.normal_(0, 1.0, generator=g)
        net.rec.bias.zero_()
        net.out.weight.normal_(0, 1 / math.sqrt(n), generator=g)
        net.out.bias.zero_()
        std = GAIN / math.sqrt(n)
        if mode == "aligned":
            # input → readout: reads the stimulus direction, writes the readout direction (their overlap is
            # O(1/√N), so the rank-1 loop gain stays that of a random rank-1 matrix)
            target = torch.outer(net.out.weight[0], net.inp.weight[:, task.stim].sum(1))
            rw.init.aligned_low_rank_(net.rec.weight, target, rank=1, std=std, generator=g)
        else:
            rw.init.low_rank_(net.rec.weight, rank, std=std, norm="spectral" if mode == "spectral" else "fro",
                              generator=g)
    return net


# ---- tasks --------------------------------------------------------------------------------------
class TwoAF:
    name, n_in, stim, resp, steps, target = "2af", 1, [0], 5, 25, 0.1
    coh, noise = torch.tensor([0.1, 0.2, 0.4]), 0.3

    def batch(self, n: int, g: torch.Generator):
        c = self.coh[torch.randint(0, 3, (n,), generator=g)] * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)
        u = torch.zeros(n, self.steps, 1)
        u[:, :20, 0] = c[:, None] + self.noise * torch.randn(n, 20, generator=g)
        return u, torch.sign(c)[:, None].expand(n, self.resp)


class Context:
    name, n_in, stim, resp, steps, target = "cxt", 4, [0, 1], 5, 25, 0.15
    coh, noise = torch.tensor([0.1, 0.2, 0.4]), 0.3

    def batch(self, n: int, g: torch.Generator):
        c = self.coh[torch.randint(0, 3, (n, 2), generator=g)] * (torch.randint(0, 2, (n, 2), generator=g) * 2 - 1)
        ctx = torch.randint(0, 2, (n,), generator=g)
        u = torch.zeros(n, self.steps, 4)
        u[:, :20, :2] = c[:, None, :] + self.noise * torch.randn(n, 20, 2, generator=g)
        u[:, :20, 2] = (ctx == 0).float()[:, None]
        u[:, :20, 3] = (ctx == 1).float()[:, None]
        y = torch.sign(c.gather(1, ctx[:, None]))
        return u, y.expand(n, self.resp)


TASKS = {"2af": TwoAF(), "cxt": Context()}


# ---- measures -----------------------------------------------------------------------------------
def ntk(model: nn.Module, probe, names) -> torch.Tensor:
    return tangent_kernel(model, probe, names, probes=64, embed_fn=lambda out, _b: out)


def train_to_loss(model, task_batch, val, target, max_steps, lr, seed):
    g = torch.Generator().manual_seed(10_000 + seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    step, loss = 0, float("inf")
    while step < max_steps:
        with torch.no_grad():
            loss = float(F.mse_loss(model(val[0]), val[1]))
        if loss <= target:
            break
        for _ in range(10):
            u, y = task_batch(64, g)
            opt.zero_grad(set_to_none=True)
            F.mse_loss(model(u), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
    return step, loss


def run_rnn(task, n, rank, mode, seed, max_steps):
    net = build_rnn(task, n, rank, mode, seed)
    w0 = {k: getattr(net, k).weight.detach().clone() for k in LAYERS}
    er = float(effective_rank(torch.linalg.svdvals(w0["rec"].double())))
    gp = torch.Generator().manual_seed(777)
    probe = task.batch(32, gp)[0]
    val = task.batch(256, torch.Generator().manual_seed(778))
    k0 = ntk(net, probe, LAYERS)
    steps, loss = train_to_loss(net, task.batch, val, task.target, max_steps, 1e-3, seed)
    kt = ntk(net, probe, LAYERS)
    dw = relative_weight_change({"rec": (w0["rec"], net.rec.weight.detach() - w0["rec"])})
    return {"eff_rank": er, "dw": dw, "dk": 1 - kernel_alignment(k0, kt, centered=False), "steps": steps,
            "loss": loss, "ok": loss <= task.target}


# ---- the linear student-teacher control -----------------------------------------------------------
def run_linear(rank, mode, seed, d=64, h=64, n=256, target=0.01, max_steps=20_000, lr=0.01):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    beta = torch.randn(d, generator=g) / math.sqrt(d)
    y = (x @ beta)[:, None]
    net = nn.Sequential(nn.Linear(d, h, bias=False), nn.Linear(h, 1, bias=False))
    with torch.no_grad():
        std = 1 / math.sqrt(d)
        if mode == "aligned":
            u = torch.randn(h, generator=g)
            rw.init.aligned_low_rank_(net[0].weight, torch.outer(u, beta), rank=1, std=std, generator=g)
        else:
            rw.init.low_rank_(net[0].weight, rank, std=std, generator=g)
        net[1].weight.normal_(0, 1 / math.sqrt(h), generator=g)
    w0 = net[0].weight.detach().clone()
    er = float(effective_rank(torch.linalg.svdvals(w0.double())))
    probe = x[:32]
    k0 = tangent_kernel(net, probe, ["0", "1"], embed_fn=lambda out, _b: out)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    scale = float(y.var())
    step = 0
    while step < max_steps:
        loss = F.mse_loss(net(x), y) / scale
        if float(loss.detach()) <= target:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    kt = tangent_kernel(net, probe, ["0", "1"], embed_fn=lambda out, _b: out)
    dw = relative_weight_change({"W1": (w0, net[0].weight.detach() - w0)})
    return {"eff_rank": er, "dw": dw, "dk": 1 - kernel_alignment(k0, kt, centered=False), "steps": step,
            "loss": float(loss.detach()), "ok": float(loss.detach()) <= target}


# ---- the run ------------------------------------------------------------------------------------
def summarize(rows):
    def ms(key):
        v = [r[key] for r in rows]
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)
    out = {k: ms(k) for k in ("eff_rank", "dw", "dk", "steps")}
    out["ok"] = sum(r["ok"] for r in rows)
    out["n"] = len(rows)
    return out


def table(results) -> str:
    lines = ["| setting | init rank | eff. rank at init | ‖ΔW‖/‖W₀‖ (mean ± sd) | 1 − NTK alignment (mean ± sd) "
             "| steps to target | reached |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for (setting, rank), s in results.items():
        lines.append(f"| {setting} | {rank} | {s['eff_rank'][0]:.2f} | {s['dw'][0]:.3f} ± {s['dw'][1]:.3f} | "
                     f"{s['dk'][0]:.3f} ± {s['dk'][1]:.3f} | {s['steps'][0]:.0f} | {s['ok']}/{s['n']} |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: dict[str, list] = {}
    for (setting, rank), s in results.items():
        groups.setdefault(setting, []).append((rank, s))
    for setting, items in groups.items():
        aligned = setting.endswith("aligned")
        for ax, key in zip(axes, ("dw", "dk")):
            xs = [s["eff_rank"][0] for _, s in items]
            ys = [s[key][0] for _, s in items]
            es = [s[key][1] for _, s in items]
            if aligned:
                ax.errorbar(xs, ys, yerr=es, fmt="*", markersize=14, capsize=3, label=setting)
            else:
                ax.errorbar(xs, ys, yerr=es, fmt="-o", capsize=3, label=setting)
    for ax, title in zip(axes, ("relative weight change ‖W_T − W_0‖/‖W_0‖", "tangent-kernel movement 1 − A(K_0, K_T)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("effective rank of the initial weight")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    write_png(path, fig, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: N=32, 1 seed, few ranks")
    ap.add_argument("--n", type=int, default=128, help="RNN units N")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per setting")
    ap.add_argument("--tasks", default="2af,cxt")
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "rich_lazy.png"))
    args = ap.parse_args(argv)
    C.setup(threads=1)
    from tqdm import tqdm

    n, seeds = (32, 1) if args.quick else (args.n, args.seeds)
    ranks = [1, 4, n] if args.quick else [r for r in (1, 2, 4, 8, 16, 32) if r < n] + [n]
    max_steps = 300 if args.quick else args.max_steps
    jobs = []
    for name in args.tasks.split(","):
        jobs += [(f"rnn-{name}", r, "fro", name) for r in ranks] + [(f"rnn-{name} aligned", 1, "aligned", name)]
    jobs += [("rnn-2af spectral", r, "spectral", "2af") for r in ranks if r < n]
    lin_ranks = [1, 4, 64] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    jobs += [("linear", r, "fro", None) for r in lin_ranks] + [("linear aligned", 1, "aligned", None)]
    t0 = time.time()
    results = {}
    with tqdm(total=len(jobs) * seeds, desc="rich/lazy runs") as bar:
        for setting, rank, mode, task in jobs:
            rows = []
            for seed in range(seeds):
                if task is None:
                    rows.append(run_linear(rank, mode, seed))
                else:
                    rows.append(run_rnn(TASKS[task], n, rank, mode, seed, max_steps))
                bar.update()
            results[(setting, "N" if rank == n and task else rank)] = summarize(rows)
    wall = time.time() - t0
    text = table(results)
    head = (f"N = {n}, gain {GAIN}, seeds = {seeds}, one thread, wall {wall / 60:.1f} min "
            f"({C.env_info()['cpu']}, torch {torch.__version__})")
    print(head)
    print(text)
    if args.out:
        write_text(args.out, head + "\n\n" + text + "\n")
    plot(results, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
