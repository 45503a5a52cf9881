"""Mixed-adapter inference and `rankwise serve` under load, in one bounded run (a few minutes on 2 CPU cores).

    python benchmarks/serve.py [--threads 1] [--iters 12] [--requests 160] [--out benchmarks/serve.json]

Part 1, in process: one forward pass over a batch of ``--batch`` rows × ``--seq`` tokens of a Llama
(hidden 256, 4 layers, LoRA r=16 on every linear layer of every adapter), timed ``--iters`` times:

* ``merged``: the plain model (an adapter merged into the weights costs exactly this);
* ``rankwise k``: ``rw.mixed_batch`` with k = 1, 8, 32 distinct adapters spread over the rows;
* ``peft k``: PEFT's mixed-batch inference (``model(..., adapter_names=[...])``), same adapters' shapes.

Reported: rows/s (throughput) and p50 / p99 batch latency. Part 2, over loopback: the server (uvicorn in
this process) with 8 adapter folders, and a second process that sends ``--requests`` greedy completions
(16 concurrent clients, adapters round-robin), stopping early after ``--load-seconds``; it reports
requests/s and p50 / p99 request latency. Goals (issue 17): ≥ 1.5× PEFT's mixed-batch throughput at 8
adapters, and within 1.2× of the merged single model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import rankwise as rw

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=4096, max_position_embeddings=256, eos_token_id=None,
                      pad_token_id=0, bos_token_id=1)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def timed(fn, iters, warmup=2):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def row_names(k, batch):
    return [f"ad{i % k}" for i in range(batch)]


def part1(args) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(2, 4096, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    n_ad = 32
    results = []

    base = make_model()
    with torch.inference_mode():
        lat = timed(lambda: base(input_ids=ids), args.iters)
    results.append({"setup": "merged (plain model)", "adapters": 1, "latencies": lat})

    model = make_model()
    for i in range(n_ad):
        rw.adapt(model, "lora", name=f"ad{i}", rank=16, targets=TARGETS, seed=i)
        with torch.no_grad():
            for p in rw.core.api.adapter_parameters(model, f"ad{i}"):
                p.normal_(0, 0.02)
    for k in (1, 8, 32):
        names = row_names(k, args.batch)

        def run(names=names, model=model):
            with rw.mixed_batch(model, names):
                model(input_ids=ids)

        with torch.inference_mode():
            lat = timed(run, args.iters)
        results.append({"setup": "rankwise mixed_batch", "adapters": k, "latencies": lat})
    model = None  # free it before PEFT's copy

    pm = get_peft_model(make_model(), LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False),
                        adapter_name="ad0")
    for i in range(1, n_ad):
        pm.add_adapter(f"ad{i}", LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    pm.eval()
    for k in (1, 8, 32):
        names = row_names(k, args.batch)
        with torch.inference_mode():
            lat = timed(lambda names=names: pm(input_ids=ids, adapter_names=names), args.iters)
        results.append({"setup": "peft adapter_names=", "adapters": k, "latencies": lat})
    for r in results:
        lat = r.pop("latencies")
        r.update({"rows_per_s": args.batch * len(lat) / sum(lat), "p50_ms": 1e3 * percentile(lat, 50),
                  "p99_ms": 1e3 * percentile(lat, 99)})
    return results


CLIENT = r"""
import json, sys, threading, time, httpx
url, n, conc, limit, adapters, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5].split(","), int(sys.argv[6])
lat, codes, lock, it = [], [], threading.Lock(), iter(range(n))
t_end = time.perf_counter() + limit
def worker():
    with httpx.Client(base_url=url, timeout=120) as c:
        while time.perf_counter() < t_end:
            with lock:
                i = next(it, None)
            if i is None:
                return
            body = {"model": adapters[i % len(adapters)], "prompt": [5 + i % 50, 7, 9, 11, 13, 17, 19, 23],
                    "max_tokens": max_tokens, "temperature": 0}
            t = time.perf_counter()
            r = c.post("/v1/completions", json=body)
            with lock:
                lat.append(time.perf_counter() - t); codes.append(r.status_code)
t0 = time.perf_counter()
ts = [threading.Thread(target=worker) for _ in range(conc)]
[t.start() for t in ts]; [t.join() for t in ts]
wall = time.perf_counter() - t0
lat.sort()
pick = lambda q: lat[min(len(lat) - 1, round(q / 100 * (len(lat) - 1)))]
print(json.dumps({"requests": len(lat), "ok": codes.count(200), "wall_s": wall, "req_per_s": len(lat) / wall,
                  "p50_ms": 1e3 * pick(50), "p99_ms": 1e3 * pick(99)}))
"""


def part2(args) -> dict:
    import socket

    import uvicorn

    from rankwise.serve import AdapterCache, Engine, load_model
    from rankwise.serve.app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_model().save_pretrained(root / "model")
        (root / "adapters").mkdir()
        for i in range(8):
            m = make_model()
            rw.adapt(m, "lora", name=f"ad{i}", rank=16, targets=TARGETS, seed=i)
            rw.save(m, root / "adapters" / f"ad{i}")
        model, tok, task = load_model(root / "model", "cpu")
        engine = Engine(model, tok, task, AdapterCache(model, root / "adapters"), max_batch=16, window_s=0.005)
        app = create_app(engine, base_name="base")
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            out = subprocess.run([sys.executable, "-c", CLIENT, f"http://127.0.0.1:{port}", str(args.requests), "16",
                                  str(args.load_seconds), ",".join(f"ad{i}" for i in range(8)), "8"],
                                 capture_output=True, text=True, timeout=args.load_seconds + 120)
            if out.returncode != 0:
                raise RuntimeError(out.stderr)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            m = engine.metrics
            result["batches"] = int(m.total("batches_total"))
            result["mean_rows_per_batch"] = result["requests"] / max(1, result["batches"])
        finally:
            server.should_exit = True
            thread.join(30)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--load-seconds", type=float, default=60.0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = part1(args)
    merged = rows[0]["rows_per_s"]
    peft = {r["adapters"]: r["rows_per_s"] for r in rows if r["setup"].startswith("peft")}
    print(f"{'setup':<24}{'adapters':>9}{'rows/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'vs merged':>10}{'vs peft':>9}")
    for r in rows:
        vs_peft = r["rows_per_s"] / peft[r["adapters"]] if r["setup"].startswith("rankwise") else float("nan")
        print(f"{r['setup']:<24}{r['adapters']:>9}{r['rows_per_s']:>10.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
              f"{merged / r['rows_per_s']:>9.2f}x{vs_peft:>8.2f}x")
    load = part2(args)
    print(f"load test (second process, loopback, 16 clients, 8 adapters, 8 tokens each): {load['requests']} requests, "
          f"{load['ok']} ok, {load['req_per_s']:.1f} req/s, p50 {load['p50_ms']:.0f} ms, p99 {load['p99_ms']:.0f} ms, "
          f"{load['mean_rows_per_batch']:.1f} requests per batch")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.out:
        from rankwise.io.atomic import write_json

        write_json(args.out, {"forward": rows, "load_test": load, "threads": args.threads,
                              "batch": args.batch, "seq": args.seq})


if __name__ == "__main__":
    main()
