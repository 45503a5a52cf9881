"""rankwise.analysis: what fine-tuning changed, and whether the rank was right.

    import rankwise as rw
    res = rw.analysis.analyze(base_model, finetuned_model, batches)   # or analyze(model_with_adapters)
    rw.analysis.write_report(res, "report/")                          # report.html + report.md + PNGs

Per-matrix measures (:mod:`.spectra`), update measures between ``W0`` and ``W`` (:mod:`.updates`),
representation measures on data (:mod:`.representations`), the whole-model driver
(:mod:`.analyzer`) and the report writer (:mod:`.report`).
"""

from __future__ import annotations

from .analyzer import COLUMNS, Analysis, adapters_off, analyze, cross_similarity
from .report import write_report
from .representations import (
    kernel_alignment,
    label_kernel,
    layer_outputs,
    linear_cka,
    rankme,
    relative_weight_change,
    tangent_kernel,
)
from .spectra import (
    Spectrum,
    effective_rank,
    energy_at_rank,
    matrix_measures,
    norms,
    numerical_rank,
    rank_at_energy,
    singular_values,
    stable_rank,
    svd,
)
from .updates import (
    adapter_similarity,
    amplification_factor,
    intruder_count,
    intruder_dimensions,
    principal_angles,
    subspace_similarity,
    top_alignment,
    weight_pairs,
)

__all__ = [
    "COLUMNS", "Analysis", "Spectrum", "adapter_similarity", "adapters_off", "amplification_factor", "analyze",
    "cross_similarity", "effective_rank", "energy_at_rank", "intruder_count", "intruder_dimensions",
    "kernel_alignment", "label_kernel", "layer_outputs", "linear_cka", "matrix_measures", "norms",
    "numerical_rank", "principal_angles", "rank_at_energy", "rankme",
    "relative_weight_change", "singular_values", "stable_rank", "subspace_similarity", "svd", "tangent_kernel",
    "top_alignment", "weight_pairs", "write_report",
]
