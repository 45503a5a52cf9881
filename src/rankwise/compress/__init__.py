"""Post-training low-rank compression: ``rankwise.compress``.

    import rankwise.compress as rc

    report = rc.compress(model, "svd_llm", ratio=0.6, calibration=batches)   # in place; per-layer report
    print(report.table())
    rc.save(model, "compressed/")                  # safetensors + JSON (rankwise.io.atomic)
    model = rc.load("compressed/")                 # HF models rebuild from config.json; else load(dir, model=fresh)
    rc.export(model, "hf_dense/")                  # a plain Hugging Face folder (factors multiplied out)
    rw.adapt(model, "lora", rank=8)                # fine-tune after compression: LoRA on the factors

Methods (:data:`METHODS`): ``svd``, ``asvd``, ``svd_llm``, ``fwsvd``, ``cur``, ``welore`` (factor the
weights, :mod:`.svd`, :mod:`.cur`, :mod:`.allocate`); ``eora``, ``lorc`` (quantize or prune, compensate with
a LoRA adapter, :mod:`.quantized`); ``extract`` (LoRA from a fine-tune) and ``compeft`` (shrink an adapter),
:mod:`.adapters`. The layer: :class:`FactoredLinear` (:mod:`.factored`). The driver: :mod:`.engine`.
"""

from __future__ import annotations

from .engine import ALLOCATIONS, METHODS, OPTIONS, CompressionReport, compress, model_bytes
from .factored import FactoredLinear, factored_layers
from .io import export, load, save, to_dense


def extract(base, finetuned, rank: int, **kw) -> CompressionReport:
    """A LoRA adapter of rank ``rank`` on ``base`` from ``finetuned − base`` (``compress(base, "extract", ...)``)."""
    return compress(base, "extract", rank=rank, finetuned=finetuned, **kw)


__all__ = ["ALLOCATIONS", "METHODS", "OPTIONS", "CompressionReport", "FactoredLinear", "compress", "export",
           "extract", "factored_layers", "load", "model_bytes", "save", "to_dense"]
