"""Small tensor operations shared by adapter methods: dropout masks and the autocast check."""

from __future__ import annotations

import functools
import platform

import torch


def autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


@functools.cache
def cpu_bernoulli_is_fast() -> bool:
    """PyTorch's CPU ``bernoulli_`` uses MKL's generator only on Intel CPUs; elsewhere it is a
    serial per-element loop, about twice as slow as ``rand() < p`` (measured on an AMD EPYC)."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" in line
    except OSError:
        pass
    return "intel" in platform.processor().lower()


def keep_mask(x: torch.Tensor, keep: float) -> torch.Tensor:
    """Bool mask of ``x``'s shape, each entry True with probability ``keep`` (from the global RNG),
    drawn with whichever of ``bernoulli_`` and ``rand < keep`` is faster on ``x``'s device."""
    if x.device.type == "cpu" and not cpu_bernoulli_is_fast():
        return torch.rand(x.shape) < keep
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(keep)
