"""LoRA on all-MiniLM-L6-v2: rankwise against PEFT, full fine-tuning and the frozen-model floor.

    python benchmarks/adapters.py             # full run (a few minutes on 2 cores)
    python benchmarks/adapters.py --quick     # smoke run: small batch, few rounds (< 1 min)
    python benchmarks/adapters.py --out results.md
    python benchmarks/adapters.py --methods all     # one row per registered method, vs PEFT's twin
    python benchmarks/adapters.py --methods dora,vera --quick

Setup: ``BertModel`` all-MiniLM-L6-v2 (22.7M parameters, no pooler), batch 32 x 64 random
token ids, fp32, train mode (the model's own dropout on), loss = MSE of the mean-pooled last
hidden state against a fixed random target, AdamW(lr=1e-4). LoRA r=8, alpha=16 on all 36
linear layers — rankwise ``targets="all-linear"``, PEFT ``target_modules="all-linear"``; the
script asserts both adapt the same modules, start from the same weights, and give the same
loss and gradients.

Measured:

* training step (forward + backward + AdamW step), all configurations interleaved in one
  process (one step of each per round, in a random order), median over rounds; ratios are the
  median of per-round ratios. ``floor`` is the frozen model's forward plus the backward
  through its activations (no weight gradients, no optimizer): the least any adapter can cost;
* memory, each configuration in a fresh subprocess: bytes autograd saves for backward during
  one forward (``rankwise.utils.memory.saved_activation_bytes``, exact, weights excluded) and
  the peak RSS during training steps above the RSS of the loaded model
  (``rankwise.utils.memory.PeakRSS``: the kernel's VmHWM);
* inference forward (``torch.inference_mode``, eval mode): bare model, rankwise merged,
  rankwise unmerged and PEFT unmerged, interleaved, ratios to the bare model.

``--methods``: a row per method instead. Each method is put on all linear layers with its
``demo_options`` (rank 8 where it has a rank); for methods PEFT also has, PEFT's twin is
built from the very same adapter (``rw.export_peft`` → ``PeftModel.from_pretrained``) and
the script asserts both give the same loss before timing. Per method, rankwise, PEFT and
rankwise LoRA steps are interleaved (so "x PEFT" and "x LoRA" are paired ratios from the
same rounds); saved activations are exact; peak RSS comes from a fresh subprocess per row.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import rankwise as rw  # noqa: E402
from rankwise.core.adapted import AdaptedLayer  # noqa: E402
from rankwise.utils.memory import PeakRSS, saved_activation_bytes  # noqa: E402

RANK, ALPHA, N_LINEAR = 8, 16, 36
TRAIN = ["floor", "full", "rankwise", "peft", "rankwise-d0.1", "peft-d0.1"]
LABEL = {
    "floor": "frozen model fwd+bwd (floor)",
    "full": "full fine-tuning",
    "rankwise": "rankwise LoRA",
    "peft": "PEFT LoRA",
    "rankwise-d0.1": "rankwise LoRA, dropout 0.1",
    "peft-d0.1": "PEFT LoRA, dropout 0.1",
}
INFER = ["bare", "rankwise-merged", "rankwise-unmerged", "peft-unmerged"]
INFER_LABEL = {
    "bare": "bare model",
    "rankwise-merged": "rankwise LoRA merged",
    "rankwise-unmerged": "rankwise LoRA unmerged",
    "peft-unmerged": "PEFT LoRA unmerged",
}


# ---- models ----------------------------------------------------------------------------------
def parse(config: str) -> tuple[str, float]:
    kind, _, drop = config.partition("-d")
    return kind, float(drop) if drop else 0.0


def build(config: str, seed: int = 0) -> torch.nn.Module:
    if config.startswith(("method:", "peft:")):
        return build_method(*config.split(":", 1), seed=seed)
    kind, drop = parse(config)
    model = C.load_minilm(seed)
    if kind == "floor":
        model.requires_grad_(False)
    elif kind == "rankwise":
        rw.adapt(model, "lora", rank=RANK, alpha=ALPHA, targets="all-linear", dropout=drop, seed=seed)
    elif kind == "peft":
        import peft

        cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=drop)
        model = peft.get_peft_model(model, cfg)
    elif kind != "full":
        raise ValueError(f"unknown configuration {config!r}")
    return model


def build_method(kind: str, method: str, seed: int = 0):
    """rankwise's ``method`` on all linear layers (``kind='method'``) or PEFT's twin of that very
    adapter (``kind='peft'``: exported with ``rw.export_peft`` and loaded with ``PeftModel``)."""
    from rankwise.cli.common import method_options

    model = C.load_minilm(seed)
    rw.adapt(model, method, targets="all-linear", seed=seed, **method_options(method, rank=RANK))
    perturb_adapters(model, seed)
    if kind == "method":
        return model
    import tempfile

    import peft

    with tempfile.TemporaryDirectory() as tmp:
        rw.export_peft(model, tmp)
        return peft.PeftModel.from_pretrained(C.load_minilm(seed), tmp, is_trainable=True)


def perturb_adapters(model, seed: int, std: float = 0.02) -> None:
    """Nudge every trainable adapter tensor so no factor is exactly zero (as after some training)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AdaptedLayer):
                for p in m.adapters.parameters():
                    if p.requires_grad and p.is_floating_point():
                        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def lora_factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name in the base model: (A, B)} for a rankwise or a PEFT model."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, AdaptedLayer):
            ad = m.adapters["default"]
            out[name] = (ad.lora_A, ad.lora_B)
        elif isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and "default" in m.lora_A:
            out[name.removeprefix("base_model.model.")] = (m.lora_A["default"].weight, m.lora_B["default"].weight)
    return out


def copy_factors(src, dst, b_std: float = 0.0, seed: int = 0) -> None:
    """Give ``dst``'s adapters ``src``'s A (and both the same seeded B when ``b_std`` > 0)."""
    fs, fd = lora_factors(src), lora_factors(dst)
    assert set(fs) == set(fd), f"adapted modules differ: {sorted(set(fs) ^ set(fd))}"
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(fs):
            if b_std:
                fs[name][1].copy_(torch.randn(fs[name][1].shape, generator=g) * b_std)
            fd[name][0].copy_(fs[name][0])
            fd[name][1].copy_(fs[name][1])


def make_step(model, config: str, batch: dict, target: torch.Tensor):
    """(loss_fn, step): the loss of one forward, and one full training step."""
    kind, _ = parse(config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    emb = model.get_input_embeddings()

    def loss_fn():
        if kind == "floor":  # gradients flow through every activation, to the embeddings' output
            e = emb(batch["input_ids"]).detach().requires_grad_(True)
            out = model(inputs_embeds=e, attention_mask=batch["attention_mask"]).last_hidden_state
        else:
            out = model(**batch).last_hidden_state
        return F.mse_loss(out.mean(1), target)

    def step():
        loss = loss_fn()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return loss_fn, step


def data(model, batch: int, seq: int):
    b = C.token_batch(model.config.vocab_size, batch, seq, seed=0)
    target = torch.randn(batch, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    return b, target


# ---- checks: same modules, same weights, same math -----------------------------------------
def check_same_lora(models: dict, batch: dict, target: torch.Tensor) -> None:
    for d in ("", "-d0.1"):
        r, p = models["rankwise" + d], models["peft" + d]
        fr, fp = lora_factors(r), lora_factors(p)
        assert len(fr) == N_LINEAR, f"rankwise adapted {len(fr)} modules, expected {N_LINEAR}"
        assert set(fr) == set(fp), f"rankwise and PEFT adapt different modules: {sorted(set(fr) ^ set(fp))}"
        assert rw.parameter_count(r).trainable == rw.parameter_count(p).trainable, (rw.parameter_count(r).trainable, rw.parameter_count(p).trainable)
        copy_factors(r, p)
    # dropout 0: the same seed gives the same loss and the same LoRA gradients
    r, p = models["rankwise"], models["peft"]
    grads = []
    for m in (r, p):
        m.train()
        torch.manual_seed(123)  # the model's own dropout masks
        out = m(**batch).last_hidden_state
        loss = F.mse_loss(out.mean(1), target)
        loss.backward()
        grads.append((loss.detach(), {k: (a.grad.clone(), b.grad.clone()) for k, (a, b) in lora_factors(m).items()}))
        m.zero_grad(set_to_none=True)
    (lr, gr), (lp, gp) = grads
    torch.testing.assert_close(lr, lp, rtol=1e-5, atol=1e-6)
    for k in gr:
        for x, y in zip(gr[k], gp[k]):
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-6)


# ---- memory: one configuration per fresh process --------------------------------------------
def child_memory(config: str, batch_size: int, seq: int, steps: int) -> dict:
    model = build(config)
    batch, target = data(model, batch_size, seq)
    loss_fn, step = make_step(model, config, batch, target)
    gc.collect()
    with PeakRSS() as peak:
        for _ in range(steps):
            step()
    with saved_activation_bytes(model) as saved:
        loss = loss_fn()
    del loss
    return {"config": config, "saved_bytes": saved.bytes, "saved_tensors": saved.count,
            "peak_bytes": peak.peak_bytes, "peak_total_bytes": peak.peak_total_bytes,
            "peak_exact": peak.exact, "trainable": rw.parameter_count(model).trainable}


def measure_memory(configs, args) -> dict[str, dict]:
    out = {}
    for c in configs:
        cmd = ["--child-memory", c, "--batch", str(args.batch), "--seq", str(args.seq),
               "--steps", str(args.mem_steps), "--threads", str(args.threads)]
        out[c] = C.run_child(os.path.abspath(__file__), cmd)
        print(f"  memory {c}: saved {C.mib(out[c]['saved_bytes'])} MiB, peak +{C.mib(out[c]['peak_bytes'])} MiB",
              flush=True)
    return out


# ---- main ------------------------------------------------------------------------------------
def run(args) -> str:
    C.setup(args.threads)
    env = C.env_info()
    print("  ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    print(f"batch {args.batch} x {args.seq} tokens, LoRA r={RANK} alpha={ALPHA} on all {N_LINEAR} linear layers, "
          f"{args.rounds} training rounds, {args.infer_rounds} inference rounds", flush=True)

    # training step time, interleaved
    models = {c: build(c) for c in TRAIN}
    batch, target = data(models["full"], args.batch, args.seq)
    check_same_lora(models, batch, target)
    print("  checks passed: same 36 modules, same weights, same loss and gradients (rankwise vs PEFT)", flush=True)
    steps = {c: make_step(models[c], c, batch, target)[1] for c in TRAIN}
    train_t = C.interleaved(steps, rounds=args.rounds, warmup=args.warmup)
    params = {c: rw.parameter_count(models[c]).trainable for c in TRAIN}
    del models, steps
    gc.collect()
    print("  training timed", flush=True)

    # inference, interleaved
    inf = {"bare": build("full").eval(), "rankwise-merged": build("rankwise").eval(),
           "rankwise-unmerged": build("rankwise").eval(), "peft-unmerged": build("peft").eval()}
    copy_factors(inf["rankwise-unmerged"], inf["rankwise-merged"], b_std=0.02)
    copy_factors(inf["rankwise-unmerged"], inf["peft-unmerged"])
    rw.merge(inf["rankwise-merged"])
    ib, _ = data(inf["bare"], args.batch, args.seq)
    with torch.inference_mode():
        outs = {k: m(**ib).last_hidden_state for k, m in inf.items()}
    torch.testing.assert_close(outs["rankwise-merged"], outs["rankwise-unmerged"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["peft-unmerged"], outs["rankwise-unmerged"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(outs["bare"], outs["rankwise-unmerged"]), "the adapters should change the output"

    def infer(m):
        def f():
            with torch.inference_mode():
                m(**ib)
        return f

    infer_t = C.interleaved({k: infer(m) for k, m in inf.items()}, rounds=args.infer_rounds, warmup=args.warmup)
    del inf, outs
    gc.collect()
    print("  inference timed", flush=True)

    mem = measure_memory(TRAIN, args)

    # table
    med = {c: C.median(v) for c, v in train_t.items()}
    rows = []
    for c in TRAIN:
        kind, _ = parse(c)
        vs_peft = C.paired_ratio(train_t[c], train_t[c.replace("rankwise", "peft")]) if kind == "rankwise" else None
        rows.append(["train step", LABEL[c], params[c], C.ms(med[c]), C.ms(C.iqr(train_t[c])),
                     C.ratio(C.paired_ratio(train_t[c], train_t["floor"])), C.ratio(vs_peft),
                     C.mib(mem[c]["saved_bytes"]), C.mib(mem[c]["peak_bytes"])])
    imed = {c: C.median(v) for c, v in infer_t.items()}
    for c in INFER:
        vs_peft = C.paired_ratio(infer_t[c], infer_t["peft-unmerged"]) if c == "rankwise-unmerged" else None
        rows.append(["inference", INFER_LABEL[c], "-", C.ms(imed[c]), C.ms(C.iqr(infer_t[c])),
                     C.ratio(C.paired_ratio(infer_t[c], infer_t["bare"])), C.ratio(vs_peft), "-", "-"])
    headers = ["part", "configuration", "trained params", "median ms", "IQR ms", "x floor / bare", "x PEFT",
               "saved act. MiB", "peak RSS +MiB"]

    step_ratio = C.paired_ratio(train_t["rankwise"], train_t["peft"])
    step_ratio_d = C.paired_ratio(train_t["rankwise-d0.1"], train_t["peft-d0.1"])
    merged = C.paired_ratio(infer_t["rankwise-merged"], infer_t["bare"])

    def ok(b):
        return "met" if b else "NOT met"

    sb = {c: mem[c]["saved_bytes"] for c in TRAIN}
    pk = {c: mem[c]["peak_bytes"] for c in TRAIN}
    goals = [
        f"rankwise/PEFT step time: {step_ratio:.3f} (dropout 0), {step_ratio_d:.3f} (dropout 0.1); "
        f"goal <= 0.95: {ok(max(step_ratio, step_ratio_d) <= 0.95)}",
        f"saved activations: rankwise {C.mib(sb['rankwise'])} MiB <= full FT {C.mib(sb['full'])} MiB: "
        f"{ok(sb['rankwise'] <= sb['full'])}; <= PEFT {C.mib(sb['peft'])} MiB: {ok(sb['rankwise'] <= sb['peft'])}; "
        f"dropout 0.1: rankwise {C.mib(sb['rankwise-d0.1'])} MiB vs PEFT {C.mib(sb['peft-d0.1'])} MiB "
        f"({sb['peft-d0.1'] - sb['rankwise-d0.1']:+,} bytes for PEFT)",
        f"peak RSS above the loaded model: rankwise {C.mib(pk['rankwise'])} MiB vs PEFT {C.mib(pk['peft'])} MiB, "
        f"full FT {C.mib(pk['full'])} MiB; dropout 0.1: rankwise {C.mib(pk['rankwise-d0.1'])} MiB vs PEFT "
        f"{C.mib(pk['peft-d0.1'])} MiB; rankwise <= PEFT and <= full FT: "
        f"{ok(max(pk['rankwise'], pk['rankwise-d0.1']) <= min(pk['peft'], pk['full']))} "
        "(RSS varies by a few percent between runs; the saved bytes are exact)",
        f"merged inference / bare: {merged:.3f}; goal <= 1.02: {ok(merged <= 1.02)}",
    ]
    load_end = C.load_average()
    if args.quick:
        goals.insert(0, "quick run (small batch, few rounds): a smoke test, not the measured setup; "
                        "judge the goals on a full run")
    noisy = [c for c, v in list(train_t.items()) + list(infer_t.items()) if C.iqr(v) > 0.25 * C.median(v)]
    if noisy:
        goals.append(f"warning: the spread of step times (IQR > 25% of the median: {', '.join(noisy)}) says other "
                     "work shared the CPU during this run; medians and paired ratios are still usable, "
                     "but rerun on a quiet machine for tighter numbers")
    plain = C.table(rows, headers)
    print("\n" + plain + "\n\n" + "\n".join(goals))
    if load_end:
        print(f"load average at end: {load_end}")

    if load_end:
        env["load average at end"] = load_end
    md = ["Environment: " + "; ".join(f"{k} {v}" for k, v in env.items()) + ".", "",
          f"batch {args.batch} x {args.seq} tokens, LoRA r={RANK} alpha={ALPHA} on all {N_LINEAR} linear layers; "
          f"{args.rounds} interleaved training rounds after {args.warmup} warm-up, {args.infer_rounds} inference rounds.",
          "", C.table(rows, headers, markdown=True), ""] + [f"- {g}" for g in goals]
    return "\n".join(md) + "\n"


def has_peft(method: str) -> bool:
    return hasattr(rw.get_method(method), "to_peft_config")


def run_methods(args) -> str:
    """One row per method: params, step time (x PEFT's twin, x rankwise LoRA), saved activations, peak RSS."""
    from rankwise.cli.demo import demo_methods

    C.setup(args.threads)
    env = C.env_info()
    names = [m for m in demo_methods(args.methods) if m != "full"]
    print("  ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    print(f"batch {args.batch} x {args.seq} tokens, all linear layers, {args.rounds} rounds per method: "
          f"{', '.join(names)}", flush=True)
    ref = build("rankwise")
    batch, target = data(ref, args.batch, args.seq)
    ref_step = make_step(ref, "rankwise", batch, target)[1]
    rows, notes = [], []
    for method in names:
        try:
            model = build(f"method:{method}")
        except Exception as e:  # a method that cannot sit on MiniLM's layers: say why, go on
            notes.append(f"{method}: not built on MiniLM ({type(e).__name__}: {e})")
            continue
        loss_fn, step = make_step(model, method, batch, target)
        fns = {"rankwise": step, "lora": ref_step}
        twin_note = "-"
        if has_peft(method):
            try:
                twin = build(f"peft:{method}")
                t_loss, t_step = make_step(twin, method, batch, target)
                model.eval(), twin.eval()  # no dropout: the same loss from the same weights
                with torch.no_grad():
                    a, b = loss_fn(), t_loss()
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
                model.train(), twin.train()
                fns["peft"] = t_step
                twin_note = "same loss"
            except Exception as e:
                twin_note = f"no PEFT twin: {type(e).__name__}"
                notes.append(f"{method}: PEFT twin failed ({type(e).__name__}: {str(e)[:200]})")
        with saved_activation_bytes(model) as saved:
            loss = loss_fn()
        del loss
        t = C.interleaved(fns, rounds=args.rounds, warmup=args.warmup)
        mem = {}
        if not args.no_rss:
            for k in ("method", "peft") if "peft" in fns else ("method",):
                mem[k] = C.run_child(os.path.abspath(__file__), [
                    "--child-memory", f"{k}:{method}", "--batch", str(args.batch), "--seq", str(args.seq),
                    "--steps", str(args.mem_steps), "--threads", str(args.threads)])["peak_bytes"]
        rows.append([method, rw.parameter_count(model).trainable, C.ms(C.median(t["rankwise"])),
                     C.ratio(C.paired_ratio(t["rankwise"], t["lora"])),
                     C.ratio(C.paired_ratio(t["rankwise"], t["peft"])) if "peft" in t else "-",
                     C.ms(C.median(t["peft"])) if "peft" in t else "-",
                     C.mib(saved.bytes), C.mib(mem.get("method")), C.mib(mem.get("peft")), twin_note])
        print(f"  {method}: {rows[-1][2]} ms, x LoRA {rows[-1][3]}, x PEFT {rows[-1][4]}", flush=True)
        del model, fns
        gc.collect()
    headers = ["method", "trained params", "step ms", "x LoRA", "x PEFT", "PEFT step ms", "saved act. MiB",
               "peak RSS +MiB", "PEFT peak RSS +MiB", "PEFT twin"]
    slower = [r[0] for r in rows if r[4] != "-" and float(r[4]) > 1.0]
    goals = [f"methods with a PEFT twin: {sum(r[4] != '-' for r in rows)}; slower than PEFT (ratio > 1.0): "
             f"{', '.join(slower) if slower else 'none'}"] + notes
    if args.quick:
        goals.insert(0, "quick run: a smoke test, not the measured setup")
    print("\n" + C.table(rows, headers) + "\n\n" + "\n".join(goals))
    md = ["Environment: " + "; ".join(f"{k} {v}" for k, v in env.items()) + ".", "",
          f"batch {args.batch} x {args.seq} tokens, every method on all linear layers of all-MiniLM-L6-v2, "
          f"{args.rounds} interleaved rounds per method after {args.warmup} warm-up.", "",
          C.table(rows, headers, markdown=True), ""] + [f"- {g}" for g in goals]
    return "\n".join(md) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", help="'all' or a comma list: one row per method (vs PEFT's twin) instead of "
                                      "the LoRA table")
    ap.add_argument("--no-rss", action="store_true", help="with --methods: skip the peak-RSS subprocesses")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 8 x 32, 3 rounds")
    ap.add_argument("--out", help="also write the results as Markdown to this file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--rounds", type=int, help="interleaved training rounds (default 20, quick 3)")
    ap.add_argument("--infer-rounds", type=int, help="interleaved inference rounds (default 30, quick 5)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--mem-steps", type=int, help="training steps in each memory subprocess")
    ap.add_argument("--child-memory", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    defaults = {"batch": 8 if q else 32, "seq": 32 if q else 64,
                "rounds": (2 if q else 8) if args.methods else (3 if q else 20),
                "infer_rounds": 5 if q else 30, "warmup": 1 if q else 3, "mem_steps": 1 if q else 3}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    if args.child_memory:
        C.setup(args.threads)
        C.emit(child_memory(args.child_memory, args.batch, args.seq, args.steps))
        return
    md = run_methods(args) if args.methods else run(args)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
