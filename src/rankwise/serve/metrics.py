"""Counters, gauges and histograms rendered in the Prometheus text format (version 0.0.4).

A few dozen lines instead of a client library: the server exposes a fixed, small set of series.
Thread-safe (the HTTP loop and the worker thread both record)."""

from __future__ import annotations

import bisect
import math
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(labels: dict | None) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(esc.items())) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Metrics:
    def __init__(self, prefix: str = "rankwise_"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._values: dict[str, dict[str, float]] = {}
        self._hist: dict[str, dict[str, list]] = {}  # name -> labels -> [bucket counts, sum, count]
        self._buckets: dict[str, tuple[float, ...]] = {}

    def describe(self, name: str, kind: str, help_text: str, buckets=None) -> None:
        self._meta[name] = (kind, help_text)
        if kind == "histogram":
            self._buckets[name] = tuple(buckets or LATENCY_BUCKETS)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        with self._lock:
            series = self._values.setdefault(name, {})
            key = _labels(labels)
            series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._values.setdefault(name, {})[_labels(labels)] = float(value)

    def observe(self, name: str, value: float, **labels) -> None:
        buckets = self._buckets[name]
        with self._lock:
            h = self._hist.setdefault(name, {}).setdefault(_labels(labels), [[0] * len(buckets), 0.0, 0])
            i = bisect.bisect_left(buckets, value)
            if i < len(buckets):
                h[0][i] += 1
            h[1] += value
            h[2] += 1

    def value(self, name: str, **labels) -> float:
        with self._lock:
            return self._values.get(name, {}).get(_labels(labels), 0.0)

    def total(self, name: str) -> float:
        """Sum of a counter over all its labels."""
        with self._lock:
            return sum(self._values.get(name, {}).values())

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help_text) in self._meta.items():
                full = self.prefix + name
                lines.append(f"# HELP {full} {help_text}")
                lines.append(f"# TYPE {full} {kind}")
                if kind == "histogram":
                    for key, (counts, total, n) in self._hist.get(name, {}).items():
                        inner = key[1:-1]
                        cum = 0
                        for b, c in zip(self._buckets[name], counts):
                            cum += c
                            le = f'le="{_num(b)}"'
                            lines.append(f"{full}_bucket{{{inner + ',' if inner else ''}{le}}} {cum}")
                        lines.append(f'{full}_bucket{{{inner + "," if inner else ""}le="+Inf"}} {n}')
                        lines.append(f"{full}_sum{key} {_num(total)}")
                        lines.append(f"{full}_count{key} {n}")
                else:
                    for key, v in self._values.get(name, {}).items():
                        lines.append(f"{full}{key} {_num(v)}")
        return "\n".join(lines) + "\n"
