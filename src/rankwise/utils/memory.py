"""Memory measurement on CPU and GPU.

* :class:`PeakRSS` — peak resident memory of this process during a block, relative to the
  resident size at entry. On Linux it resets the kernel's high-water mark (``VmHWM``, via
  ``/proc/self/clear_refs``) at entry and reads it at exit, so the peak is exact however short
  it lasted; where that is not allowed it falls back to sampling ``/proc/self/statm`` from a
  background thread every ``interval`` seconds (which can miss short peaks). On CUDA use
  ``torch.cuda.max_memory_allocated`` instead.
* :func:`saved_activation_bytes` — exact bytes autograd keeps for backward during a
  forward pass (each storage counted once, weights excluded), the activation-memory figure
  that decides whether adapter training fits. Deterministic, so tests can compare methods
  with it.
"""

from __future__ import annotations

import os
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident memory of this process now (lifetime peak where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so a
    following :class:`PeakRSS` sees the next job's own peak rather than reused free memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def hwm_bytes() -> int | None:
    """The kernel's resident high-water mark (``VmHWM``) of this process, or ``None`` off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current resident size (Linux ≥ 4.0); ``False`` where not allowed.

    This is process-wide: an enclosing measurement that relies on ``VmHWM`` loses its peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return hwm_bytes() is not None
    except OSError:
        return False


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.peak_bytes`` (peak RSS above the start) and
    ``m.peak_total_bytes`` (the absolute peak); ``m.exact`` says whether the kernel's
    high-water mark was used (``True``) or sampling (``False``).

    Memory the allocator already holds from before the block is reused without raising RSS,
    so for comparable figures measure each configuration in a fresh process.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak_bytes = 0
        self.peak_total_bytes = 0
        self.exact = False

    def __enter__(self):
        self.exact = reset_hwm()
        self.start = rss_bytes()
        self._peak = self.start
        self._stop = threading.Event()
        self._t = None
        if not self.exact:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        if self._t is not None:
            self._t.join()
        self._peak = max(self._peak, rss_bytes())
        if self.exact:
            self._peak = max(self._peak, hwm_bytes() or 0)
        self.peak_total_bytes = self._peak
        self.peak_bytes = self._peak - self.start
        return False


class saved_activation_bytes:
    """Count the bytes autograd saves for backward inside the block.

    ``with saved_activation_bytes(model) as s: loss = model(x).sum()`` then ``s.bytes``
    (and ``s.count``, the number of distinct storages).
    Tensors sharing storage with ``model``'s parameters or buffers are weights, not
    activations, and are skipped; a storage saved by several ops is counted once, in full
    (a saved view keeps its whole storage alive). The saved storages are referenced until
    the block ends, so a graph freed inside the block cannot hand its address to a later
    tensor and hide it from the count.
    """

    def __init__(self, model: torch.nn.Module | None = None):
        self._weights: set[tuple[str, int]] = set()
        if model is not None:
            for t in list(model.parameters()) + list(model.buffers()):
                key = self._key(t)
                if key is not None:
                    self._weights.add(key)

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[str, int] | None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested or other storage-less tensors
            return None
        return (str(st.device), st.data_ptr()) if st.nbytes() else None

    def __enter__(self):
        self._seen: set[tuple[str, int]] = set(self._weights)
        self._held: list[torch.Tensor] = []
        self.bytes = 0
        self.count = 0

        def pack(t: torch.Tensor):
            key = self._key(t)
            if key is None:
                if t.layout != torch.strided:  # no plain storage: count its elements
                    self.bytes += t.numel() * t.element_size()
                    self.count += 1
            elif key not in self._seen:
                self._seen.add(key)
                self._held.append(t)
                self.bytes += t.untyped_storage().nbytes()
                self.count += 1
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self._held = []
        return False
