"""Quantization (or pruning) plus a low-rank compensation: ``eora`` and ``lorc``.

The weight is replaced by its compressed version ``Ŵ`` — block-wise ``int4`` / ``nf4`` / ``int8``
(:mod:`rankwise.quant`, stored packed by :func:`rankwise.compress.save`) or, with ``prune=p``,
unstructured magnitude pruning of the fraction ``p`` of smallest entries — and the error
``E = W − Ŵ`` is compensated by a rank-``r`` term ``B A`` that lives in a LoRA adapter (``rw.save`` /
``rw.export_peft`` write it, PEFT loads it, and it can be fine-tuned further)::

    y = Ŵ x + b + B A x,        B A ≈ E

* ``lorc`` — ZeroQuant-V2's low-rank compensation (Yao et al. 2023, arXiv:2303.08302, §5; also in
  ZeroQuant-FP): ``B A = [E]_r``, the truncated SVD of the error (optimal in ``‖·‖_F``).
* ``eora`` — EoRA (Liu et al. 2024, "EoRA: Training-free Compensation for Compressed LLM with
  Eigenspace Low-Rank Approximation", arXiv:2410.21271, Alg. 1): project the error onto the
  eigenspace of the input activations, ``X Xᵀ = Q Λ Qᵀ``, ``Q' = Q Λ^½``; SVD of ``E Q'`` truncated to
  ``r``; ``A = A' Q'⁻¹``. That is the whitened truncation of :func:`rankwise.compress.svd.svd_llm`
  applied to ``E``: ``B A`` minimizes the output error ``‖(E − B A) X‖_F``. Eigenvalues are clamped at
  ``jitter · λ_max`` (the paper inverts ``Λ^½`` as is).

The quantizer is rankwise's own fake quantizer: compute happens in the weight's dtype with the
dequantized values; the packed storage is what ``save`` writes and what the bytes in the report count.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..quant import KINDS, check_kind, fake_quantize, storage_shapes
from .svd import Decomposition, svd, svd_llm


def check_base(quant: str | None, prune: float | None, block_size: int) -> None:
    if prune is not None:
        if quant not in (None, "none"):
            raise ConfigError(f"compress: give quant={quant!r} or prune={prune!r}, not both.")
        if isinstance(prune, bool) or not isinstance(prune, (int, float)) or not 0 < prune < 1:
            raise ConfigError(f"compress: prune={prune!r} must be a fraction in (0, 1) of weights set to zero.")
        return
    if quant not in KINDS:
        raise ConfigError(f"compress: quant={quant!r} is unknown; use one of {list(KINDS)} (or prune=<fraction>).")
    check_kind(quant, block_size)


@torch.no_grad()
def compressed_base(w: torch.Tensor, quant: str | None, prune: float | None, block_size: int) -> torch.Tensor:
    """``Ŵ``: the dequantized (or magnitude-pruned) weight, in ``w``'s dtype."""
    if prune is not None:
        k = int(round(prune * w.numel()))
        if k == 0:
            return w.clone()
        thresh = w.abs().flatten().float().kthvalue(k).values
        return torch.where(w.abs().float() > thresh, w, torch.zeros_like(w))
    return fake_quantize(w, quant, block_size).to(w.dtype)


def base_bytes(shape: tuple[int, int], quant: str | None, prune: float | None, block_size: int,
               element_size: int) -> int:
    """Bytes stored for ``Ŵ``: packed codes + one float32 absmax per block; for pruning the
    non-zeros (values) plus one bit per entry (a bitmask)."""
    numel = shape[0] * shape[1]
    if prune is not None:
        keep = numel - int(round(prune * numel))
        return keep * element_size + (numel + 7) // 8
    n_data, n_blocks = storage_shapes(numel, quant, block_size)
    return n_data + 4 * n_blocks


def compensation(method: str, error: torch.Tensor, second_moment: torch.Tensor | None = None) -> Decomposition:
    """The decomposition of ``E`` that ``lorc`` (plain SVD) or ``eora`` (eigenspace-whitened) truncates."""
    if method == "eora":
        return svd_llm(error, second_moment)
    return svd(error)
