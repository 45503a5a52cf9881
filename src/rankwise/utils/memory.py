"""Memory measurement on CPU and GPU.

* :class:`PeakRSS` — peak resident memory of this process during a block, sampled by a
  background thread from ``/proc/self/statm`` (Linux) every ``interval`` seconds, relative
  to the resident size at entry. On CUDA use ``torch.cuda.max_memory_allocated`` instead.
* :func:`saved_activation_bytes` — exact bytes autograd keeps for backward during a
  forward pass (each storage counted once), the activation-memory figure that decides
  whether adapter training fits. Deterministic, so tests can compare methods with it.
"""

from __future__ import annotations

import os
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.peak_bytes`` (peak RSS above the start)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak_bytes = 0

    def __enter__(self):
        self.start = rss_bytes()
        self._peak = self.start
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._peak = max(self._peak, rss_bytes())
        self.peak_bytes = self._peak - self.start
        return False


class saved_activation_bytes:
    """Count the bytes autograd saves for backward inside the block.

    ``with saved_activation_bytes(model) as s: loss = model(x).sum()`` then ``s.bytes``.
    Tensors sharing storage with ``model``'s parameters or buffers are weights, not
    activations, and are skipped; a storage saved by several ops is counted once.
    """

    def __init__(self, model: torch.nn.Module | None = None):
        self._weights: set[int] = set()
        if model is not None:
            for t in list(model.parameters()) + list(model.buffers()):
                self._weights.add(t.untyped_storage().data_ptr())

    def __enter__(self):
        self._seen: set[int] = set(self._weights)
        self.bytes = 0

        def pack(t: torch.Tensor):
            st = t.untyped_storage()
            key = st.data_ptr()
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += st.nbytes()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        return False
