"""Training step of adapted all-MiniLM-L6-v2 with and without ``torch.compile`` (issue 18).

    python benchmarks/compile.py                      # lora, dora, pissa, vera; inductor; ~2-3 min on 1 thread
    python benchmarks/compile.py --backend aot_eager  # no code generation (where no C++ compiler exists)
    python benchmarks/compile.py --methods lora --rounds 5 --out results.md

Setup: ``BertModel`` all-MiniLM-L6-v2 (``benchmarks/_common.load_minilm``), batch 8 x 32 random
token ids, fp32, train mode with every dropout set to 0 (so the eager and compiled losses can be
checked equal), loss = MSE of the mean-pooled last hidden state against a fixed random target,
AdamW(lr=1e-4) on the adapter. Each method on all 36 linear layers with its ``demo_options``
(rank 8 where it has one; VeRA's demo rank), adapter tensors nudged off their init as in
``benchmarks/adapters.py``.

Measured per method: compile time (the first compiled step: tracing, AOTAutograd and code
generation of forward and backward), then the eager step (``model``) and the compiled step
(``torch.compile(model)``, the same module, so the same parameters and optimizer) timed
interleaved with the frozen model's eager and compiled steps (the floor: forward and backward to
the input embeddings, no optimizer; issue 18's targets are LoRA ≤ 1.10× the floor and compiled
LoRA ≤ 1.05× the compiled floor) (``_common.interleaved``: one of each per round, random order),
medians and the medians of per-round ratios. Before timing, the script asserts that the compiled loss equals the
eager loss (rtol 1e-4: Inductor reorders float sums).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from adapters import data, perturb_adapters  # noqa: E402

import rankwise as rw  # noqa: E402
from rankwise.cli.common import method_options  # noqa: E402

METHODS = ("lora", "dora", "pissa", "vera")
FLOOR = "floor"


def build(method: str):
    """MiniLM with ``method`` on every linear layer, or frozen (``"floor"``), dropout 0, train mode."""
    model = C.load_minilm(0)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if method == FLOOR:
        model.requires_grad_(False)
    else:
        rw.adapt(model, method, targets="all-linear", seed=0, **method_options(method, rank=8))
        perturb_adapters(model, 0)
    return model.train()


def steps(model, compiled, batch, target):
    """(loss of one eager forward, loss of one compiled forward, eager step, compiled step). The floor's
    step is the frozen model's forward and the backward to its input embeddings (what any adapter
    must at least compute), as in ``benchmarks/adapters.py``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    emb = model.get_input_embeddings()

    def loss(m):
        if opt is None:  # the floor: gradients flow through every activation, to the embeddings' output
            e = emb(batch["input_ids"]).detach().requires_grad_(True)
            out = m(inputs_embeds=e, attention_mask=batch["attention_mask"]).last_hidden_state
        else:
            out = m(**batch).last_hidden_state
        return F.mse_loss(out.mean(1), target)

    def step(m):
        def f():
            loss(m).backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return f

    return (lambda: loss(model)), (lambda: loss(compiled)), step(model), step(compiled)


def run(args) -> str:
    C.setup(args.threads)
    env = C.env_info()
    print("  ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    rows = []
    floor = None
    # one process compiles the floor and every method's model (new module objects: guards fail, code is
    # recompiled); the default limit of 8 would drop the later methods to eager without saying so
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    for method in [FLOOR, *args.methods.split(",")]:
        model = build(method)
        batch, target = data(model, args.batch, args.seq)
        compiled = torch.compile(model, backend=args.backend)
        eager_loss, compiled_loss, eager_step, compiled_step = steps(model, compiled, batch, target)
        t0 = time.perf_counter()
        compiled_step()  # compiles forward and backward
        compile_s = time.perf_counter() - t0
        with torch.no_grad():  # the same weights now for both: the losses must agree
            a, b = eager_loss(), compiled_loss()
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        if floor is None:  # the frozen model first: every method's steps are timed next to it
            floor = {"floor eager": eager_step, "floor compiled": compiled_step}
            continue
        t = C.interleaved({"eager": eager_step, "compiled": compiled_step, **floor}, rounds=args.rounds,
                          warmup=args.warmup)
        rows.append([method, rw.parameter_count(model).trainable, round(compile_s, 1), C.ms(C.median(t["eager"])),
                     C.ms(C.median(t["compiled"])), C.ratio(C.paired_ratio(t["compiled"], t["eager"])),
                     C.ratio(C.paired_ratio(t["eager"], t["floor eager"])),
                     C.ratio(C.paired_ratio(t["compiled"], t["floor compiled"]))])
        print(f"  {method}: compile {rows[-1][2]} s, eager {rows[-1][3]} ms, compiled {rows[-1][4]} ms, "
              f"x eager {rows[-1][5]}, eager x floor {rows[-1][6]}, compiled x compiled floor {rows[-1][7]}",
              flush=True)
        del model, compiled
    headers = ["method", "trained params", "compile s", "eager step ms", "compiled step ms", "compiled x eager",
               "eager x floor", "compiled x compiled floor"]
    setup = (f"backend {args.backend}; batch {args.batch} x {args.seq} tokens, all linear layers of all-MiniLM-L6-v2, "
             f"dropout 0, {args.rounds} interleaved rounds after {args.warmup} warm-up")
    print("\n" + C.table(rows, headers) + "\n\n" + setup)
    md = ["Environment: " + "; ".join(f"{k} {v}" for k, v in env.items()) + ".", "", setup + ".", "",
          C.table(rows, headers, markdown=True)]
    return "\n".join(md) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of registered methods")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, …)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", help="also write the results as Markdown to this file")
    args = ap.parse_args(argv)
    md = run(args)
    if args.out:
        from rankwise.io.atomic import write_text

        write_text(args.out, md)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
