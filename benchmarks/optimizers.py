"""Memory-efficient optimizers: a small LLaMA pretrained on the standard library's source.

    python benchmarks/optimizers.py               # full run (~10-15 min on 2 cores)
    python benchmarks/optimizers.py --quick       # smoke run on a 0.13M-parameter LLaMA (< 2 min)
    python benchmarks/optimizers.py --configs adamw,galore,galore-torch --out results.md

Setup: ``LlamaForCausalLM`` ``llama-tiny`` (10.8M parameters, byte vocabulary) with the same random
init for every row, the recipe of ``rankwise pretrain`` (:mod:`rankwise.cli.pretrain`): byte-level
tokens of the stdlib's ``.py`` files, ``steps x batch x seq`` tokens in the same order for every
row, linear warmup (10%) then cosine decay, gradient clipping 1.0, fp32. Projected optimizers get
the attention and MLP matrices (rank 96 = 1/4 of the hidden size, subspace refresh every 10 steps so
a short run refreshes 4 times); each rankwise optimizer and its reference package get identical
hyperparameters.

Rows: AdamW (``torch.optim.AdamW``), every rankwise optimizer (GaLore with the SVD, randomized-SVD,
random, DCT and online-PCA projectors, GaLore 8-bit, Q-GaLore, Fira, Flora, APOLLO, APOLLO-Mini,
FRUGAL, GradNormLoRP, Adafactor, SMMF) and every reference package (galore-torch 32/8-bit, fira,
apollo-torch, q-galore-torch, flora-opt, transformers' Adafactor).

Measured, all rows trained *interleaved* in one process (each round: one training step of every row
in a fresh random order), so load from other processes falls on all alike:

* final train loss (mean of the last 10 steps) and validation perplexity (held-out stdlib files);
* optimizer state: bytes of every tensor in the optimizer's state, each storage once (for rankwise
  rows this is ``rw.optim.state_bytes``; reference packages keep tensors inside projector objects,
  which are walked too), and its ratio to the analytic minimum of the algorithm (see ``analytic``);
* ``opt step ms``: median time of ``optimizer.step()``; ``train step ms``: forward + backward + step;
* ``subspace update ms``: the extra time of a step that refreshes the subspace (median over the
  refresh steps after the first, minus the median of the other steps);
* peak RSS during 3 training steps, each row in a fresh subprocess, above the loaded model;
* ratios to AdamW and to the row's reference package, step times as the median of per-round ratios;
* a second table times one subspace refresh of all projected matrices (real gradients) with each
  projector kind against galore-torch's SVD projector, interleaved.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import rankwise.optim as ro  # noqa: E402
from rankwise.cli.pretrain import (  # noqa: E402
    OPTIMIZERS,
    TARGETS,
    Windows,
    build_model,
    collate,
    lm_loss,
    make_optimizer,
    stdlib_bytes,
)

SCALE = 0.25


# ---- configurations --------------------------------------------------------------------------
def _groups(model, args, rank=None, **extra):
    return ro.param_groups(model, rank=args.rank if rank is None else rank, targets=TARGETS,
                           update_proj_gap=args.gap, scale=extra.pop("scale", SCALE), proj_type="std", **extra)


def _rankwise(name, projector=None):
    return lambda model, args: make_optimizer(name, model, rank=args.rank, update_gap=args.gap,
                                              scale=None if name not in ("galore", "fira") else SCALE,
                                              projector=projector)


def _stored(opt):
    """APOLLO keeping its random projection in the state (as apollo-torch does) instead of
    regenerating it from the seed at every step: more state, less time."""
    for g in opt.param_groups:
        if "store_projection" in g:
            g["store_projection"] = True
    return opt


QG_KEYS = dict(quant=True, quant_n_bit=4, quant_group_size=256, cos_threshold=0.4, gamma_proj=2, queue_size=5)


def _ref_galore(model, args):
    import galore_torch

    return galore_torch.GaLoreAdamW(_groups(model, args), lr=OPTIMIZERS["galore"][0])


def _ref_galore8bit(model, args):
    import galore_torch

    return galore_torch.GaLoreAdamW8bit(_groups(model, args), lr=OPTIMIZERS["galore8bit"][0])


def _ref_fira(model, args):
    import fira

    groups = _groups(model, args)
    groups[-1]["alpha"] = groups[-1].pop("scale")
    return fira.FiraAdamW(groups, lr=OPTIMIZERS["fira"][0])


def _ref_apollo(mini):
    def build(model, args):
        from apollo_torch import APOLLOAdamW

        groups = _groups(model, args, rank=1 if mini else None, scale=128.0 if mini else 1.0)
        groups[-1].update(proj="random", scale_type="tensor" if mini else "channel")
        return APOLLOAdamW(groups, lr=OPTIMIZERS["apollo-mini" if mini else "apollo"][0])

    return build


def _ref_qgalore(model, args):
    from q_galore_torch import QGaLoreAdamW8bit_simulate

    groups = _groups(model, args, **QG_KEYS)
    for p in groups[-1]["params"]:  # the reference quantizes the weights of parameters tagged like this
        p.group_size, p.stochastic_round = QG_KEYS["quant_group_size"], True
    return QGaLoreAdamW8bit_simulate(groups, lr=OPTIMIZERS["qgalore"][0])


def _ref_flora(model, args):
    import flora_opt

    return flora_opt.Flora(model.parameters(), lr=OPTIMIZERS["flora"][0], rank=args.rank, kappa=args.gap,
                           beta1=0.9, scale_parameter=False)


def _ref_adafactor(model, args):
    from transformers.optimization import Adafactor

    return Adafactor(model.parameters(), lr=OPTIMIZERS["adafactor"][0], scale_parameter=False,
                     relative_step=False, warmup_init=False)


# name -> (implementation, reference row or None, builder, projected)
CONFIGS: dict[str, tuple] = {
    "adamw": ("torch", None, lambda m, a: torch.optim.AdamW(m.parameters(), lr=OPTIMIZERS["adamw"][0],
                                                             weight_decay=0.0), False),
    "galore": ("rankwise", "galore-torch", _rankwise("galore"), True),
    "galore-rsvd": ("rankwise", "galore-torch", _rankwise("galore", "randomized_svd"), True),
    "galore-random": ("rankwise", "galore-torch", _rankwise("galore", "random"), True),
    "galore-dct": ("rankwise", "galore-torch", _rankwise("galore", "dct"), True),
    "galore-online-pca": ("rankwise", "galore-torch", _rankwise("galore", "online_pca"), True),
    "galore8bit": ("rankwise", "galore-torch-8bit", _rankwise("galore8bit"), True),
    "qgalore": ("rankwise", "q-galore-torch", lambda m, a: ro.QGaLoreAdamW(
        _groups(m, a, **QG_KEYS), lr=OPTIMIZERS["qgalore"][0]), True),
    "fira": ("rankwise", "fira-pkg", _rankwise("fira"), True),
    "flora": ("rankwise", "flora-opt", _rankwise("flora"), True),
    "apollo": ("rankwise", "apollo-torch", _rankwise("apollo"), True),
    "apollo-mini": ("rankwise", "apollo-torch-mini", _rankwise("apollo-mini"), True),
    "apollo-stored": ("rankwise", "apollo-torch", lambda m, a: _stored(_rankwise("apollo")(m, a)), True),
    "frugal": ("rankwise", None, _rankwise("frugal"), True),
    "gradnorm-lorp": ("rankwise", None, _rankwise("gradnorm-lorp"), True),
    "adafactor": ("rankwise", "transformers-adafactor", _rankwise("adafactor"), False),
    "smmf": ("rankwise", None, _rankwise("smmf"), False),
    "galore-torch": ("reference", None, _ref_galore, True),
    "galore-torch-8bit": ("reference", None, _ref_galore8bit, True),
    "q-galore-torch": ("reference", None, _ref_qgalore, True),
    "fira-pkg": ("reference", None, _ref_fira, True),
    "flora-opt": ("reference", None, _ref_flora, True),
    "apollo-torch": ("reference", None, _ref_apollo(False), True),
    "apollo-torch-mini": ("reference", None, _ref_apollo(True), True),
    "transformers-adafactor": ("reference", None, _ref_adafactor, False),
}


# ---- analytic minimum of the optimizer state ------------------------------------------------
def analytic(name: str, model, args) -> int | None:
    """Bytes the algorithm needs at minimum (fp32 numbers): moments in the subspace, the basis
    (none when it is regenerated from a seed or stored as indices), and its fallback for the rest."""
    proj = {id(p): p for _, p in ro.matrix_parameters(model, targets=TARGETS)}
    rest = [p for p in model.parameters() if id(p) not in proj]
    dense = 8 * sum(p.numel() for p in rest)  # AdamW fallback: two moments
    out = 0
    base = name.split("-")[0] if name.startswith("galore") and name != "galore8bit" else name
    for p in proj.values():
        m, n = p.shape
        big, small = max(m, n), min(m, n)
        r = min(args.rank, small)
        if base == "galore" or name in ("fira", "frugal"):
            basis = r * 8 if name == "galore-dct" else r * small * 4    # DCT keeps r int64 indices
            out += 2 * r * big * 4 + basis
        elif name == "gradnorm-lorp":
            out += 2 * r * big * 4 + r * small * 4 + 4 * m * 4
        elif name == "apollo":
            out += 2 * r * big * 4 + 4          # regenerated projection; one norm for the limiter
        elif name == "apollo-mini":
            out += 2 * big * 4 + 4
        else:
            return None
    return out + dense


def adamw_bytes(model) -> int:
    return 8 * sum(p.numel() for p in model.parameters())


def analytic_all(name, model, args) -> int | None:
    if name == "adamw":
        return adamw_bytes(model)
    if name == "adafactor":
        return sum((sum(p.shape) if p.ndim >= 2 else p.numel()) * 4 for p in model.parameters())
    if name == "smmf":
        from rankwise.optim.smmf import square_shape

        return sum(2 * sum(square_shape(p.numel())) * 4 + -(-p.numel() // 8) for p in model.parameters())
    if CONFIGS[name][0] != "rankwise":
        return None
    return analytic(name, model, args)


# ---- state bytes of any optimizer -----------------------------------------------------------
def state_tensor_bytes(opt) -> int:
    """Bytes of every tensor reachable from ``opt.state`` (through dicts, lists and the ``__dict__`` of
    objects such as galore-torch's projectors), each storage counted once."""
    seen_storage, seen_obj, total = set(), set(), 0

    def visit(v, depth=0):
        nonlocal total
        if isinstance(v, torch.Tensor):
            st = v.untyped_storage()
            key = (str(v.device), st.data_ptr())
            if key not in seen_storage:
                seen_storage.add(key)
                total += st.nbytes()
        elif isinstance(v, dict):
            for x in v.values():
                visit(x, depth)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x, depth)
        elif hasattr(v, "__dict__") and depth < 3 and id(v) not in seen_obj and not isinstance(v, type):
            seen_obj.add(id(v))
            visit(vars(v), depth + 1)

    for st in opt.state.values():
        visit(st)
    return total


# ---- training -------------------------------------------------------------------------------
class Run:
    """One row: its model, optimizer, schedule, and what was measured."""

    def __init__(self, name, args, init_state):
        self.name = name
        self.model = build_model(args.model, seed=0)
        self.model.load_state_dict(init_state)
        self.model.train()
        self.opt = CONFIGS[name][2](self.model, args)
        warm = max(1, int(0.1 * args.steps))
        sched = lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (args.steps - warm)))  # noqa: E731
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, sched)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.losses, self.step_t, self.opt_t = [], [], []

    def step(self, ids):
        t0 = time.perf_counter()
        loss = lm_loss(self.model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        t1 = time.perf_counter()
        self.opt.step()
        t2 = time.perf_counter()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        self.opt_t.append(t2 - t1)
        self.step_t.append(t2 - t0)


def data(args):
    tokens = args.steps * args.batch * args.seq
    train, valid = stdlib_bytes(tokens, args.valid_windows * args.seq)
    w = Windows(train, args.seq)
    order = torch.randperm(len(w), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [collate([w[order[i * args.batch + j]] for j in range(args.batch)]) for i in range(args.steps)]
    return batches, Windows(valid, args.seq)


@torch.no_grad()
def valid_loss(model, valid: Windows) -> float:
    model.eval()
    ids = collate([valid[i] for i in range(len(valid))])
    loss = sum(lm_loss(model, ids[i:i + 8]).item() * ids[i:i + 8].shape[0] for i in range(0, len(ids), 8))
    model.train()
    return loss / len(ids)


def subspace_ms(run: Run, args) -> float | None:
    if not CONFIGS[run.name][3]:
        return None
    refresh = [s for s in range(args.gap, args.steps, args.gap)]
    others = [t for s, t in enumerate(run.opt_t) if s > 0 and s % args.gap]
    if not refresh or not others:
        return None
    return max(0.0, C.median([run.opt_t[s] for s in refresh]) - C.median(others))


# ---- projector refresh timing ---------------------------------------------------------------
def projector_table(args, init_state, batches) -> tuple[list[list], list[str]]:
    """One subspace refresh of every projected matrix from its real gradient: rankwise kinds vs
    galore-torch's SVD projector, interleaved."""
    from galore_torch.galore_projector import GaLoreProjector

    from rankwise.optim.projectors import make_projector

    model = build_model(args.model, seed=0)
    model.load_state_dict(init_state)
    lm_loss(model, batches[0]).backward()
    grads = [p.grad.detach().clone() for _, p in ro.matrix_parameters(model, targets=TARGETS)]
    del model
    kinds = ["svd", "randomized_svd", "random", "dct", "online_pca"]
    fns = {"galore-torch svd": lambda: [GaLoreProjector(args.rank, proj_type="std").project(g, 0) for g in grads]}
    for k in kinds:
        def refresh(k=k):
            for g in grads:
                make_projector(k, args.rank, state={}).update(g, 0)
        fns[f"rankwise {k}"] = refresh
    # online PCA (Online Subspace Descent) takes one AdamW step on P every optimizer step after the SVD it
    # starts from: the (update) row times that per-step cost
    states = []
    for g in grads:
        st = {}
        make_projector("online_pca", args.rank, state=st).update(g, 0)
        states.append(st)
    fns["rankwise online_pca (update)"] = lambda: [make_projector("online_pca", args.rank, state=st).update(g, 0)
                                                   for st, g in zip(states, grads)]
    t = C.interleaved(fns, rounds=args.proj_rounds, warmup=1)
    ref = t["galore-torch svd"]
    rows = [[k, len(grads), C.ms(C.median(v)), C.ratio(C.paired_ratio(v, ref))] for k, v in t.items()]
    return rows, ["projector refresh", "matrices", "median ms (all)", "x galore-torch svd"]


# ---- memory: one row per fresh process ------------------------------------------------------
def child_memory(args) -> dict:
    from rankwise.utils.memory import PeakRSS

    batches, _ = data(args)
    model = build_model(args.model, seed=0)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    run = Run(args.child_memory, args, init)
    del model, init
    gc.collect()
    with PeakRSS() as peak:
        for ids in batches[:3]:
            run.step(ids)
    return {"peak_bytes": peak.peak_bytes, "exact": peak.exact}


def measure_memory(names, args) -> dict[str, int | None]:
    out = {}
    for n in names:
        cmd = ["--child-memory", n, "--threads", str(args.threads), "--model", args.model, "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank), "--gap", str(args.gap)]
        try:
            out[n] = C.run_child(os.path.abspath(__file__), cmd)["peak_bytes"]
        except Exception as e:  # report, go on
            print(f"  memory {n}: failed ({str(e)[:200]})", flush=True)
            out[n] = None
        print(f"  memory {n}: peak +{C.mib(out[n])} MiB", flush=True)
    return out


# ---- main -----------------------------------------------------------------------------------
def run(args) -> str:
    C.setup(args.threads)
    warnings.filterwarnings("ignore")
    torch.cuda.synchronize = lambda *a, **k: None  # bitsandbytes-based references call it every step
    env = C.env_info()
    print("  ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    names = list(CONFIGS) if args.configs is None else [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    batches, valid = data(args)
    model0 = build_model(args.model, seed=0)
    init_state = {k: v.clone() for k, v in model0.state_dict().items()}
    n_params = sum(p.numel() for p in model0.parameters())
    print(f"{args.model}: {n_params:,} parameters; {args.steps} steps x {args.batch} x {args.seq} tokens "
          f"= {args.steps * args.batch * args.seq:,} tokens; rank {args.rank}, refresh every {args.gap} steps; "
          f"rows: {', '.join(names)}", flush=True)

    runs, notes = {}, []
    for n in names:
        try:
            runs[n] = Run(n, args, init_state)
        except Exception as e:
            notes.append(f"{n}: not built ({type(e).__name__}: {str(e)[:160]})")
    failed = set()
    rng = random.Random(0)
    t0 = time.perf_counter()
    for s, ids in enumerate(batches):
        for n in rng.sample(list(runs), len(runs)):
            if n in failed:
                continue
            try:
                runs[n].step(ids)
            except Exception as e:
                failed.add(n)
                notes.append(f"{n}: failed at step {s} ({type(e).__name__}: {str(e)[:160]})")
        if (s + 1) % max(1, args.steps // 10) == 0:
            print(f"  step {s + 1}/{args.steps}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    for n in failed:
        runs.pop(n)

    results = {}
    for n, r in runs.items():
        vl = valid_loss(r.model, valid)
        state = state_tensor_bytes(r.opt)
        if CONFIGS[n][0] == "rankwise" and state != ro.state_bytes(r.opt)["total"]:
            notes.append(f"{n}: state walker {state} B != rw.optim.state_bytes {ro.state_bytes(r.opt)['total']} B")
        results[n] = dict(train=sum(r.losses[-10:]) / len(r.losses[-10:]), valid=vl, state=state,
                          analytic=analytic_all(n, r.model, args), opt_ms=C.median(r.opt_t[1:]),
                          step_ms=C.median(r.step_t[1:]), sub=subspace_ms(r, args))
    mem = {} if args.quick else measure_memory(list(runs), args)

    def paired(a, b):
        return C.paired_ratio(runs[a].opt_t[1:], runs[b].opt_t[1:])

    rows = []
    for n, res in results.items():
        ref = CONFIGS[n][1] if CONFIGS[n][1] in results else None
        base = "adamw" if "adamw" in results else None
        rows.append([
            n, CONFIGS[n][0], round(res["train"], 4), round(math.exp(res["valid"]), 3),
            C.mib(res["state"]), C.ratio(res["state"] / res["analytic"]) if res["analytic"] else "-",
            C.mib(mem.get(n)), C.ms(res["step_ms"]), C.ms(res["opt_ms"]), C.ms(res["sub"]),
            C.ratio(res["valid"] / results[base]["valid"]) if base else "-",
            C.ratio(res["state"] / results[base]["state"]) if base else "-",
            C.ratio(paired(n, base)) if base else "-",
            ref or "-",
            C.ratio(res["valid"] / results[ref]["valid"]) if ref else "-",
            C.ratio(res["state"] / results[ref]["state"]) if ref else "-",
            C.ratio(paired(n, ref)) if ref else "-",
        ])
    headers = ["optimizer", "impl", "train loss", "valid ppl", "state MiB", "x analytic", "peak RSS +MiB",
               "train step ms", "opt step ms", "subspace upd ms", "loss x AdamW", "state x AdamW",
               "opt step x AdamW", "reference", "loss x ref", "state x ref", "opt step x ref"]
    print("\n" + C.table(rows, headers), flush=True)

    prow, pheaders = projector_table(args, init_state, batches)
    print("\n" + C.table(prow, pheaders), flush=True)
    env["load average at end"] = C.load_average()
    if args.quick:
        notes.insert(0, "quick run: a smoke test on a tiny model, not the measured setup; no memory children")
    notes.append("loss x ...: validation loss ratio (lower is better); opt step x ...: median over rounds of the "
                 "per-round ratio of optimizer.step() times.")
    md = ["Environment: " + "; ".join(f"{k} {v}" for k, v in env.items()) + ".", "",
          f"{args.model} ({n_params:,} parameters), {args.steps} steps x {args.batch} x {args.seq} tokens, rank "
          f"{args.rank}, subspace refresh every {args.gap} steps, rows trained interleaved.", "",
          C.table(rows, headers, markdown=True), "", C.table(prow, pheaders, markdown=True), ""]
    md += [f"- {x}" for x in notes]
    print("\n".join(notes))
    return "\n".join(md) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: llama-micro, 8 steps, no memory children")
    p.add_argument("--configs", default=None, help=f"comma list of rows (default all): {', '.join(CONFIGS)}")
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=96)
    p.add_argument("--gap", type=int, default=10, help="steps between subspace refreshes")
    p.add_argument("--valid-windows", type=int, default=32)
    p.add_argument("--proj-rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the tables as Markdown here")
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and args.child_memory is None:
        args.model, args.steps, args.batch, args.seq, args.rank, args.gap = "llama-micro", 8, 2, 64, 16, 3
        args.valid_windows, args.proj_rounds = 8, 2
    if args.child_memory:
        C.setup(args.threads)
        warnings.filterwarnings("ignore")
        torch.cuda.synchronize = lambda *a, **k: None
        C.emit(child_memory(args))
        return
    md = run(args)
    if args.out:
        from rankwise.io.atomic import write_text

        write_text(args.out, md)


if __name__ == "__main__":
    main()
