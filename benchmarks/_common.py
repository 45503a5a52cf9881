"""Shared helpers for rankwise benchmarks.

Timing on a small shared CPU is noisy, so every benchmark here:

* pins the thread count (:func:`setup`) and reports it with the versions (:func:`env_info`);
* times the configurations it compares *interleaved* in one process (:func:`interleaved`):
  one call of each per round, in a random order each round, so load from other processes
  falls on all of them alike; it reports medians and the median of the per-round ratios;
* measures memory in a fresh subprocess per configuration (:func:`run_child`), since memory a
  process has touched once stays resident and would blur the next measurement.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

CHILD_MARK = "@@RESULT@@ "


# ---- environment ------------------------------------------------------------------------------
def setup(threads: int = 2, seed: int = 0) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()


def quiet_transformers() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
    except ImportError:
        pass


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info() -> dict:
    info = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": f"{cpu_name()} ({os.cpu_count()} logical cores)",
    }
    for mod in ("transformers", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = "not installed"
    load = load_average()
    if load:
        info["load average at start"] = load
    return info


def load_average() -> str:
    """1, 5 and 15 minute load averages ('' off Linux): other work on the machine skews timings."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return ""


# ---- models and data --------------------------------------------------------------------------
def load_minilm(seed: int = 0):
    """all-MiniLM-L6-v2 as a ``BertModel`` without the pooler (its output is not used)."""
    from transformers import AutoModel

    from rankwise.integrations.hf import minilm_path

    torch.manual_seed(seed)
    return AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)


def token_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ---- timing -----------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 2,
                clock: Callable[[], float] = time.perf_counter, seed: int = 0) -> dict[str, list[float]]:
    """Seconds per call of each function: every round calls each once, in a fresh seeded random
    order, so neither a slow spell of the machine nor the previous function's leftovers (caches,
    allocator state) systematically favour one of them. Two functions simply alternate."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    rng = random.Random(seed)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % 2:] + names[:r % 2] if len(names) == 2 else rng.sample(names, len(names))
        for n in order:
            t0 = clock()
            fns[n]()
            times[n].append(clock() - t0)
    return times


def median(xs) -> float:
    return statistics.median(xs)


def iqr(xs) -> float:
    if len(xs) < 4:
        return max(xs) - min(xs)
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num[i] / den[i]``: both were measured in the same round."""
    return statistics.median(a / b for a, b in zip(num, den))


# ---- subprocesses -----------------------------------------------------------------------------
def run_child(script: str, args: list[str], timeout: float = 600) -> dict:
    """Run ``python script *args`` in a fresh interpreter; return the dict it :func:`emit`-ed."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK):])
    raise RuntimeError(
        f"child {' '.join(args)} exited with {proc.returncode} and no result:\n{proc.stderr[-3000:]}"
    )


def emit(result: dict) -> None:
    print(CHILD_MARK + json.dumps(result), flush=True)


# ---- reporting --------------------------------------------------------------------------------
def mib(n: float | None) -> float | str:
    return "-" if n is None else round(n / 2**20, 1)


def ms(seconds: float | None) -> float | str:
    return "-" if seconds is None else round(seconds * 1e3, 1)


def ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(rows: list[list], headers: list[str], markdown: bool = False) -> str:
    from rankwise.utils.table import format_table

    return format_table(rows, headers, markdown=markdown)
