"""The serving engine: one model, one worker thread, dynamic batches of mixed adapters.

Requests become :class:`Job` s in a bounded queue (:class:`QueueFull` when it holds ``max_queue``
jobs; the server answers 503). The worker thread takes the oldest job, waits up to ``window_s`` for
more jobs of the same kind and settings, up to ``max_batch`` rows in all, and runs them as one batch
under :func:`rankwise.mixed_batch`, each row with its request's adapter. Control calls (adapter
upload, delete) run in the same thread between batches, so an adapter is swapped between two batches,
never during one: every request sees one version of its adapter. The adapters are loaded on demand
by an :class:`~rankwise.serve.cache.AdapterCache` (LRU by bytes).

Tasks, from the model folder's ``config.json``:

* ``completions`` (``*ForCausalLM``): ``generate`` with left padding, per-row ``max_tokens`` (a
  stopping criterion per row), greedy at ``temperature == 0``, else sampling with ``temperature`` and
  ``top_p`` (requests batch together only with equal sampling settings); tokens stream per row.
* ``classify`` (``*ForSequenceClassification``): logits and softmax per input.
* ``embeddings`` (any other encoder, through ``AutoModel``): the mean of the last hidden states over
  the attention mask, L2-normalized (sentence-transformers' pooling for all-MiniLM-L6-v2).

Shutdown: :meth:`Engine.close` refuses new jobs, lets the worker finish every queued job and joins it.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.mixed import mixed_batch
from ..errors import AdapterNotFoundError, ConfigError
from .cache import AdapterCache
from .metrics import SIZE_BUCKETS, Metrics

TASKS = ("completions", "classify", "embeddings")


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` jobs: try again shortly."""


class Closed(RuntimeError):
    """The engine is shutting down and takes no new jobs."""


@dataclass
class Job:
    """One request: ``items`` are token-id lists, all for adapter ``adapter`` (``None``: base model)."""

    kind: str
    adapter: str | None = None
    items: list[list[int]] = field(default_factory=list)
    max_tokens: list[int] | None = None  # completions: per item
    sampling: tuple = ()  # completions: (temperature, top_p); jobs batch only with equal settings
    on_tokens: Callable | None = None  # completions, streaming: on_tokens(item, token_id | None, finish_reason)
    fn: Callable | None = None  # kind "call": run in the worker thread
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def key(self):
        return (self.kind, self.sampling)


def load_model(path: str | Path, device: str | None = None, dtype: str = "auto"):
    """``(model, tokenizer or None, task)`` from a ``save_pretrained`` folder (safetensors weights only)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model folder {path} has no config.json; pass a folder written by save_pretrained.")
    cfg = AutoConfig.from_pretrained(path)
    archs = list(getattr(cfg, "architectures", None) or [])
    if any(a.endswith("ForCausalLM") for a in archs):
        task, auto = "completions", AutoModelForCausalLM
    elif any(a.endswith("ForSequenceClassification") for a in archs):
        task, auto = "classify", AutoModelForSequenceClassification
    else:
        task, auto = "embeddings", AutoModel
    torch_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}.get(dtype)
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype {dtype!r}: use auto, float32, bfloat16 or float16.")
    kw = {"use_safetensors": True}
    if torch_dtype is not None:
        kw["dtype"] = torch_dtype
    model = auto.from_pretrained(path, **kw)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, task


class Engine:
    """Dynamic batching over one model (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer, task: str, cache: AdapterCache, *, max_batch: int = 32,
                 window_s: float = 0.005, max_queue: int = 256, metrics: Metrics | None = None):
        if task not in TASKS:
            raise ConfigError(f"task {task!r}: use one of {TASKS}.")
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ConfigError(f"max_batch={max_batch}, max_queue={max_queue}, window_s={window_s}: give "
                              "max_batch ≥ 1, max_queue ≥ 1 and window_s ≥ 0.")
        self.model, self.tokenizer, self.task, self.cache = model, tokenizer, task, cache
        self.max_batch, self.window_s, self.max_queue = max_batch, window_s, max_queue
        self.metrics = metrics or Metrics()
        self._describe()
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        cfg = getattr(model, "config", None)
        self.max_positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.pad_id = self._pad_id()
        self.eos_ids = self._eos_ids()

    def _describe(self) -> None:
        m = self.metrics
        m.describe("requests_total", "counter", "HTTP requests by endpoint and status code.")
        m.describe("request_seconds", "histogram", "Time from request arrival to response (non-streaming).")
        m.describe("batches_total", "counter", "Batches run by the worker, by kind.")
        m.describe("batch_rows", "histogram", "Rows per batch.", buckets=SIZE_BUCKETS)
        m.describe("batch_adapters", "histogram", "Distinct adapters (and the base) per batch.", buckets=SIZE_BUCKETS)
        m.describe("queue_depth", "gauge", "Jobs waiting for the worker.")
        m.describe("adapters_loaded", "gauge", "Adapters on the model.")
        m.describe("adapter_cache_bytes", "gauge", "Bytes of the loaded adapters' tensors.")
        m.describe("adapter_loads_total", "counter", "Adapters loaded from their folders.")
        m.describe("adapter_evictions_total", "counter", "Adapters evicted to stay within the cache budget.")
        m.describe("tokens_generated_total", "counter", "Completion tokens generated.")
        m.describe("rejected_total", "counter", "Requests refused before queueing, by reason.")

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for v in (getattr(tok, "pad_token_id", None), getattr(getattr(self.model, "config", None), "pad_token_id", None),
                  getattr(tok, "eos_token_id", None)):
            if isinstance(v, int):
                return v
        return 0

    def _eos_ids(self) -> set[int]:
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="rankwise-serve-worker", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs, finish the queued ones, stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def closing(self) -> bool:
        return self._closing

    # ---- submitting --------------------------------------------------------------------------------------
    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue holds {len(self._queue)} requests (--max-queue {self.max_queue})")
            self._queue.append(job)
            self.metrics.set("queue_depth", len(self._queue))
            self._cond.notify()
        return job.future

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Run ``fn()`` in the worker thread between batches (adapter upload / delete); bypasses the bound."""
        job = Job("call", fn=fn)
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    # ---- the worker ------------------------------------------------------------------------------------
    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            if first.kind == "call":
                return [first]
            batch, rows = [first], len(first.items)
            deadline = time.perf_counter() + self.window_s
            while rows < self.max_batch:
                kept = deque()
                while self._queue:
                    job = self._queue.popleft()
                    if job.kind == "call":  # keep order around control calls
                        kept.append(job)
                        kept.extend(self._queue)
                        self._queue.clear()
                        break
                    if job.key == first.key and rows + len(job.items) <= self.max_batch:
                        batch.append(job)
                        rows += len(job.items)
                    else:
                        kept.append(job)
                self._queue.extendleft(reversed(kept))
                left = deadline - time.perf_counter()
                if rows >= self.max_batch or left <= 0 or self._closing or (
                        self._queue and self._queue[0].kind == "call"):
                    break
                self._cond.wait(left)
            self.metrics.set("queue_depth", len(self._queue))
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch[0].kind == "call":
                job = batch[0]
                try:
                    job.future.set_result(job.fn())
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    job.future.set_exception(e)
                self._cache_gauges()
                continue
            try:
                self._run(batch)
            except BaseException as e:  # noqa: BLE001 - every job of a failed batch gets the error
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)

    def _cache_gauges(self) -> None:
        m, c = self.metrics, self.cache
        m.set("adapters_loaded", len(c.loaded))
        m.set("adapter_cache_bytes", c.bytes)
        m.set("adapter_loads_total", c.loads)
        m.set("adapter_evictions_total", c.evictions)

    def _run(self, batch: list[Job]) -> None:
        # load each adapter on its own, so one bad adapter fails only its requests
        for name in dict.fromkeys(j.adapter for j in batch if j.adapter is not None):
            try:
                self.cache.acquire([name])
            except Exception as e:  # noqa: BLE001 - handed to the requests for this adapter
                for j in batch:
                    if j.adapter == name:
                        j.future.set_exception(e if isinstance(e, AdapterNotFoundError) else
                                               RuntimeError(f"adapter '{name}' could not be loaded: {e}"))
        batch = [j for j in batch if not j.future.done()]
        ok = [j.adapter for j in batch if j.adapter is not None]
        if ok:
            self.cache.acquire(ok)  # all of them loaded at once now (evicts only adapters not in this batch)
        self._cache_gauges()
        if not batch:
            return
        names = [j.adapter for j in batch for _ in j.items]
        m = self.metrics
        m.inc("batches_total", kind=batch[0].kind)
        m.observe("batch_rows", len(names))
        m.observe("batch_adapters", len(set(names)))
        with torch.inference_mode():
            if batch[0].kind == "completions":
                self._complete(batch, names)
            else:
                self._encode(batch, names)

    # ---- encoders ---------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _encode(self, batch: list[Job], names: list) -> None:
        items = [ids for j in batch for ids in j.items]
        width = max(len(ids) for ids in items)
        dev = self._device()
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, ids in enumerate(items):
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, :len(ids)] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        with mixed_batch(self.model, names):
            out = self.model(input_ids=input_ids, attention_mask=mask)
        if batch[0].kind == "classify":
            logits = out.logits.float()
            result = logits.cpu()
        else:
            h = out.last_hidden_state.float()
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            result = torch.nn.functional.normalize(pooled, dim=-1).cpu()
        start = 0
        for job in batch:
            job.future.set_result(result[start:start + len(job.items)])
            start += len(job.items)

    # ---- completions ------------------------------------------------------------------------------------
    def _complete(self, batch: list[Job], names: list) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        items = [ids for j in batch for ids in j.items]
        limits = [n for j in batch for n in j.max_tokens]
        owners = [(j, k) for j in batch for k in range(len(j.items))]
        width = max(len(ids) for ids in items)
        dev = self._device()
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, ids in enumerate(items):  # left padding: every prompt ends at the same column
            input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[i, width - len(ids):] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        limit_t = torch.tensor(limits, device=dev)
        eos = self.eos_ids
        tokens: list[list[int]] = [[] for _ in items]
        reasons: list[str | None] = [None] * len(items)

        class RowLimits(StoppingCriteria):
            def __call__(self, ids, scores, **kwargs):
                return (ids.shape[1] - width) >= limit_t

        class Rows(BaseStreamer):  # records (and streams) each row's tokens until it stops
            started = False

            def put(self, value):
                if not self.started:  # the prompt
                    self.started = True
                    return
                for i, t in enumerate(value.view(-1).tolist()):
                    if reasons[i] is not None:
                        continue
                    job, k = owners[i]
                    if t in eos:
                        reasons[i] = "stop"
                    else:
                        tokens[i].append(t)
                        if job.on_tokens is not None:
                            job.on_tokens(k, t, None)
                        if len(tokens[i]) >= limits[i]:
                            reasons[i] = "length"
                    if reasons[i] is not None and job.on_tokens is not None:
                        job.on_tokens(k, None, reasons[i])

            def end(self):
                for i, (job, k) in enumerate(owners):
                    if reasons[i] is None:
                        reasons[i] = "length"
                        if job.on_tokens is not None:
                            job.on_tokens(k, None, "length")

        temperature, top_p = batch[0].sampling
        kw = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature,
                                                             "top_p": top_p, "top_k": 0}
        with mixed_batch(self.model, names):
            self.model.generate(input_ids, attention_mask=mask, max_new_tokens=max(limits), pad_token_id=self.pad_id,
                                stopping_criteria=StoppingCriteriaList([RowLimits()]), streamer=Rows(), **kw)
        self.metrics.inc("tokens_generated_total", sum(len(t) for t in tokens))
        i = 0
        for job in batch:
            n = len(job.items)
            job.future.set_result(list(zip(tokens[i:i + n], reasons[i:i + n])))
            i += n
