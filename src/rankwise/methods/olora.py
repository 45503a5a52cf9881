"""OLoRA: Orthonormal Low-Rank Adaptation (Büyükakyüz, 2024, arXiv:2406.01775).

The adapter starts from the thin QR decomposition ``W0 = Q R`` (``Q`` orthonormal columns)::

    B₀ = Q[:, :r]   (out × r, orthonormal columns),     A₀ = R[:r, :]   (r × in)

and ``W0 − s·B₀A₀`` stays frozen (``s = α/r``; as in the paper's code and PEFT, the frozen part
is ``s`` times the QR part, not divided by it). The orthonormal ``B`` is the point: it
conditions the update well and the paper reports faster convergence than LoRA. QR costs about
half an SVD and all target layers of one shape are factored in one batched call. The QR is
made unique by a non-negative ``diag(R)`` (LAPACK may flip column signs; ``Q D · D R`` is the
same product, and training is equivariant under that sign flip).

As for PiSSA, rankwise keeps ``W0`` untouched and the adapter holds ``A₀, B₀``
(``ΔW = s·(B A − B₀ A₀)``, ``_init_common.py``). Parameters per layer: ``r · (in + out)``.
PEFT: ``export_peft`` writes the equivalent rank-``2r`` LoRA; ``import_peft`` reads PEFT's own
``init_lora_weights="olora"`` adapters (``A₀, B₀`` rebuilt from ``W0``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import RankAlphaConfig
from ..core.registry import register
from ..linalg import batched_map, qr_positive
from ._init_common import WeightSplit


@dataclass
class OloraConfig(RankAlphaConfig):
    """rank, alpha, dropout, rslora as LoRA; the adapter starts at the first r QR components."""


@register("olora")
class Olora(WeightSplit):
    """``ΔW = s·(BA − B₀A₀)`` with ``B₀ = Q_r``, ``A₀ = R_r`` from ``W0 = QR`` (see module docstring)."""

    Config = OloraConfig
    summary = "A,B from the thin QR of W0 (orthonormal B), residual frozen (Büyükakyüz 2024)"
    peft_init = "olora"

    @classmethod
    def decompose(cls, views, config: OloraConfig, generator=None) -> dict:
        """``(Q[:, :r], R[:r])`` of every view's ``W0``, batched over equal shapes."""
        def first_r(stack):
            q, r = qr_positive(stack)  # the full Q, R are freed as soon as the first r are copied out
            return q[..., :config.rank].contiguous(), r[..., :config.rank, :].contiguous()

        return dict(zip(views, batched_map(first_r, [v.weight2d().detach() for v in views.values()])))

    @classmethod
    def split(cls, qr, config: OloraConfig):
        q, r = qr
        return r, q

    @classmethod
    def peft_accepts(cls, pcfg: dict) -> bool:
        init = pcfg.get("init_lora_weights")
        return pcfg.get("peft_type") == "LORA" and isinstance(init, str) and init.lower() == "olora"

    @classmethod
    def from_peft_config(cls, pcfg: dict) -> dict:
        return cls.lora_options_from_peft(pcfg, "OLoRA")
