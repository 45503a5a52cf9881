"""The analysis step of ``rankwise demo``: the weight measures of every trained model, one report.

Adapter methods are analysed on their own model (``W0`` is the frozen base weight, ``ΔW`` the
adapter's weight view); full fine-tuning against a freshly built base (the same seed, so the same
starting head). The base SVDs are computed once and shared. The head trained by every method
(``modules_to_save``) is left out so all methods are compared on the layers adapters change.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..core.api import adapter_state
from ..errors import RankwiseError
from .analyzer import Analysis, analyze
from .report import write_report


class DemoAnalysis:
    def __init__(self, make_base, out, head=()):
        self.make_base, self.out, self.head = make_base, Path(out), list(head)
        self.analyses: dict[str, Analysis] = {}
        self.cache: dict = {}
        self.seconds = 0.0

    def add(self, name: str, model) -> Analysis | None:
        """Analyse one trained model; a method without a weight view is reported, not fatal."""
        t0 = time.perf_counter()
        try:
            if adapter_state(model):
                a = analyze(model, name=name, cache=self.cache)
            else:
                a = analyze(self.make_base(), model, name=name, cache=self.cache, exclude=self.head)
        except (NotImplementedError, RankwiseError) as e:
            print(f"analysis of {name} skipped: {e}")
            return None
        finally:
            self.seconds += time.perf_counter() - t0
        self.analyses[name] = a
        return a

    def write(self) -> str:
        """Write the report; return a Markdown paragraph that links it (empty when nothing was added)."""
        if not self.analyses:
            return ""
        t0 = time.perf_counter()
        write_report(self.analyses, self.out, title="rankwise demo: what each method changed in the weights",
                     notes="Weight measures of the demo's trained models against the pre-trained MiniLM.")
        self.seconds += time.perf_counter() - t0
        counts = ", ".join(f"{n} {a.summary['intruders (total)']}" for n, a in self.analyses.items())
        rel = self.out.name
        return (f"\n\n**Analysis** ([{rel}/report.html]({rel}/report.html), [{rel}/report.md]({rel}/report.md)): "
                f"spectra, effective rank of ΔW, intruder dimensions (top 10, ε=0.5; total over layers: {counts}), "
                f"subspace similarity between methods; {self.seconds:.1f} s.")
