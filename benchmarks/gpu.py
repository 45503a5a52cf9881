"""GPU step time and memory: rankwise against PEFT and the frozen-model floor, one LLaMA-shaped model.

    python benchmarks/gpu.py                 # on a GPU: < 5 min on one H200
    python benchmarks/gpu.py --smoke         # tiny shapes on any device (a check that it runs)
    python benchmarks/gpu.py --out gpu.md    # also write the tables as markdown

Setup (issue 18's shape): ``LlamaForCausalLM`` from a config — 8 layers of width 2048 (MLP 5632,
16 heads, vocabulary 32000), random weights in bfloat16, batch 8 × 1024 random token ids, loss =
the causal LM loss; adapters of rank 16 on every linear layer of the blocks (q, k, v, o, gate,
up, down), AdamW on the trainable parameters.

Measured, all configurations interleaved in one process (one step of each per round, random
order; medians; ratios are medians of per-round ratios):

* train step (forward + backward + optimizer step): ``floor`` (frozen model, gradient only to the
  input embeddings: the least any adapter can cost), rankwise and PEFT LoRA (PEFT with bf16
  adapters, and PEFT's default float32 adapters on the bf16 base), DoRA, PiSSA, VeRA, full
  fine-tuning; peak memory of one step above the model (``torch.cuda.max_memory_allocated``);
* inference forward (eval, ``inference_mode``): bare model, rankwise merged / unmerged, PEFT;
* ``torch.compile`` (``--compile``, default on a GPU): compiled LoRA step vs the compiled floor,
  and the compile time;
* GaLore's subspace refresh for the 14 largest projection matrices (2 layers' worth of 2048 ×
  5632 and 2048 × 2048 gradients): full SVD vs randomized SVD, and galore-torch if installed;
  then ``GaLoreAdamW`` over one refresh cycle of 14 matrices of 2048 × 5632 (``refresh.py``'s
  table): exact vs randomized, unstaggered vs staggered, and the defaults — the slowest step.
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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256) if args.smoke else \
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000)
    cfg = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config.use_cache = False
    return model


def trainer(model, device, params):
    """A closure: one training step of ``model`` (the batch is bound later)."""
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None

    def step(batch):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    return step


def configurations(base, args, device):
    """``{name: (model, step)}``: every configuration on its own copy of the model."""
    import peft

    out = {}
    floor = copy.deepcopy(base)
    floor.requires_grad_(False)
    floor.enable_input_require_grads()
    out["floor"] = (floor, trainer(floor, device, []))
    full = copy.deepcopy(base)
    out["full fine-tuning"] = (full, trainer(full, device, list(full.parameters())))
    for method, opts in (("lora", {}), ("dora", {}), ("pissa", {}), ("vera", {"rank": 256})):
        m = rw.adapt(copy.deepcopy(base), method, **{"rank": args.rank, "targets": TARGETS, **opts})
        out[f"rankwise {method}"] = (m, trainer(m, device, [p for p in m.parameters() if p.requires_grad]))
    for label, kw in (("PEFT lora", {}), ("PEFT dora", {"use_dora": True})):
        cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, **kw)
        m = peft.get_peft_model(copy.deepcopy(base), cfg, autocast_adapter_dtype=False)  # bf16 adapters
        out[label] = (m, trainer(m, device, [p for p in m.parameters() if p.requires_grad]))
    m = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                                target_modules=TARGETS))
    out["PEFT lora (fp32 adapters)"] = (m, trainer(m, device, [p for p in m.parameters() if p.requires_grad]))
    return out


def peak_step(step, batch, device) -> float | None:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    step(batch)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - start


def train_table(base, args, device, batch):
    confs = configurations(base, args, device)
    fns = {}
    for name, (_, step) in confs.items():
        fns[name] = (lambda s=step: (s(batch), sync(device)))
    times = C.interleaved(fns, rounds=args.rounds, warmup=2)
    peaks = {name: peak_step(step, batch, device) for name, (_, step) in confs.items()}
    rows = []
    for name in confs:
        rows.append([name, C.ms(C.median(times[name])), C.ratio(C.paired_ratio(times[name], times["floor"])),
                     C.ratio(C.paired_ratio(times[name], times["rankwise lora"])), C.mib(peaks[name])])
    return rows, confs


def inference_table(base, confs, args, device, batch):
    bare = copy.deepcopy(base).eval()
    merged = copy.deepcopy(confs["rankwise lora"][0]).eval()
    rw.merge(merged)
    unmerged = confs["rankwise lora"][0].eval()
    peft_model = confs["PEFT lora"][0].eval()

    def fwd(m):
        def run():
            with torch.inference_mode():
                m(input_ids=batch)
            sync(device)
        return run

    times = C.interleaved({"bare": fwd(bare), "rankwise merged": fwd(merged), "rankwise unmerged": fwd(unmerged),
                           "PEFT unmerged": fwd(peft_model)}, rounds=args.rounds, warmup=2)
    rows = [[n, C.ms(C.median(t)), C.ratio(C.paired_ratio(t, times["bare"])),
             C.ratio(C.paired_ratio(t, times["PEFT unmerged"]))] for n, t in times.items()]
    for m in (unmerged, peft_model):
        m.train()
    return rows


def compile_table(base, args, device, batch):
    floor = copy.deepcopy(base)
    floor.requires_grad_(False)
    floor.enable_input_require_grads()
    lora = rw.adapt(copy.deepcopy(base), "lora", rank=args.rank, targets=TARGETS)
    steps, compile_s = {}, {}
    for name, m in (("floor", floor), ("rankwise lora", lora)):
        eager = trainer(m, device, [p for p in m.parameters() if p.requires_grad])
        compiled_model = torch.compile(m)
        compiled = trainer(compiled_model, device, [p for p in m.parameters() if p.requires_grad])
        t0 = time.perf_counter()
        compiled(batch)
        sync(device)
        compile_s[name] = time.perf_counter() - t0
        steps[f"{name} eager"] = lambda s=eager: (s(batch), sync(device))
        steps[f"{name} compiled"] = lambda s=compiled: (s(batch), sync(device))
    times = C.interleaved(steps, rounds=args.rounds, warmup=1)
    return [[n, C.ms(C.median(t)), C.ratio(C.paired_ratio(t, times["floor compiled"])),
             round(compile_s[n.split(" ")[0] if n.startswith("floor") else "rankwise lora"], 1)
             if n.endswith("compiled") else "-"] for n, t in times.items()]


def galore_table(args, device):
    from rankwise.optim import make_projector

    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(64, 172)] * 2 if args.smoke else [(2048, 5632)] * 6 + [(5632, 2048)] * 2 + [(2048, 2048)] * 6
    grads = [torch.randn(s, device=device, generator=g) for s in shapes]
    rows = []
    for kind in ("svd", "randomized_svd"):
        projs = [make_projector(kind, rank=args.galore_rank, update_gap=200) for _ in grads]
        sync(device)
        t0 = time.perf_counter()
        for p, gr in zip(projs, grads):
            p.update(gr, 0)
        sync(device)
        rows.append([f"rankwise {kind}", len(grads), round(time.perf_counter() - t0, 3)])
    try:
        from galore_torch.galore_projector import GaLoreProjector
    except ImportError:
        rows.append(["galore-torch svd", len(grads), "not installed"])
    else:
        sync(device)
        t0 = time.perf_counter()
        for gr in grads:
            GaLoreProjector(args.galore_rank, update_proj_gap=200).project(gr, 0)
        sync(device)
        rows.append(["galore-torch svd", len(grads), round(time.perf_counter() - t0, 3)])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 3 rounds: checks the script runs")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--galore-rank", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also time torch.compile (default: on a GPU)")
    ap.add_argument("--out", default=None, help="also write the tables as markdown here")
    args = ap.parse_args()
    C.setup(threads=torch.get_num_threads())
    device = torch.device(args.device)
    args.rounds = args.rounds or (3 if args.smoke else 10)
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    if args.smoke:
        args.galore_rank = 8
    t_start = time.perf_counter()
    base = build(args, device)
    batch_shape = (2, 32) if args.smoke else (8, 1024)
    batch = torch.randint(0, base.config.vocab_size, batch_shape, device=device,
                          generator=torch.Generator(device=device).manual_seed(0))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else C.cpu_name()
    head = (f"# rankwise on {name}\n\ntorch {torch.__version__}; LLaMA {base.config.num_hidden_layers} x "
            f"{base.config.hidden_size}, bf16, batch {batch_shape[0]} x {batch_shape[1]}, rank {args.rank}, "
            f"{args.rounds} rounds")
    print(head)
    parts = [head]
    rows, confs = train_table(base, args, device, batch)
    t = C.table(rows, ["train step", "ms", "x floor", "x rankwise lora", "peak MiB above model"], markdown=True)
    print(t)
    parts.append(t)
    t = C.table(inference_table(base, confs, args, device, batch), ["inference forward", "ms", "x bare", "x PEFT"],
                markdown=True)
    print(t)
    parts.append(t)
    del confs
    if args.compile:
        t = C.table(compile_table(base, args, device, batch),
                    ["torch.compile", "ms", "x compiled floor", "compile s"], markdown=True)
        print(t)
        parts.append(t)
    t = C.table(galore_table(args, device), ["GaLore refresh", "matrices", "seconds"], markdown=True)
    print(t)
    parts.append(t)
    from refresh import latency_table  # GaLoreAdamW steps over one refresh cycle: the slowest step

    cycle = argparse.Namespace(shape=(64, 172) if args.smoke else (2048, 5632), matrices=4 if args.smoke else 14,
                               rank=args.galore_rank, gap=4 if args.smoke else 14, rounds=2 if args.smoke else 3)
    rows, headers = latency_table(cycle, device)
    t = C.table(rows, [f"GaLoreAdamW, {cycle.matrices} x {cycle.shape}, T={cycle.gap}", *headers[1:]], markdown=True)
    print(t)
    parts.append(t)
    wall = time.perf_counter() - t_start
    print(f"\ntotal {wall:.0f} s")
    if args.out:
        from rankwise.io.atomic import write_text

        write_text(args.out, "\n\n".join(parts) + f"\n\nTotal {wall:.0f} s.\n")


if __name__ == "__main__":
    main()
