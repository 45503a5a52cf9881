"""NOLA: Compressing LoRA using Linear Combination of Random Basis (Koohpayegani, Navaneet,
Nooralinejad, Kolouri & Pirsiavash, ICLR 2024, arXiv:2310.02556).

LoRA's factors are re-parameterized as linear combinations of frozen random matrices generated
from a seed; only the mixing coefficients are trained::

    ΔW = s · B A,    A = A₀ + Σ_{j=1..k} α_j A_j,    B = Σ_{i=1..l} β_i B_i
    A_j ∈ R^{r×in}, B_i ∈ R^{out×r} ~ U(−1, 1)/√k (resp. /√l) frozen;  α ∈ R^k, β ∈ R^l trained

with ``s = α/r``. Default ``α = r`` (``s = 1``): the authors' GPT-2 scripts
(``finetune_gpt2m_e2e_qv_nola.sh``: ``RANK=8``, ``LORA_ALPHA=8``) run at ``s = 1``, and so does
rankwise's LoRA, so learning rates carry over; the default argument of their ``LoRA`` module is
``α = 1`` (``s = 1/r``), which ``alpha=1.0`` gives.

As in the authors' code, ``A₀`` is a frozen Kaiming-uniform matrix (PyTorch's Linear init, bound
``1/√in``) and both coefficient vectors start at zero, so ``B = 0``, ``ΔW = 0`` and the adapted
model equals the base at init, while ``β`` still gets a gradient through ``A₀``.
The number of trained parameters, ``k + l`` per layer, is independent of the rank and of the
layer's shape.

Each layer has its own seed (drawn from the adapter's generator; the paper stores one seed per
layer, not shared), kept as a persistent ``int64`` buffer; the bases are non-persistent buffers
regenerated from it, so a saved adapter holds ``k + l`` coefficients and one seed per layer.

Cost: the bases are kept in memory (``r·(k·in + l·out)`` floats per layer: 2.0M, 7.5 MiB, for a
384×1536 layer at the defaults r = 8, k = l = 128) instead of being regenerated every step as the
reference does; forming ``A`` and ``B`` is two matrix-vector products (``k·r·in + l·out·r``
flops), and the activation view is LoRA's (``core.ops.low_rank_apply``, never ``B A``). Every
layer kind works. The bases are drawn by a CPU generator and copied to the weight's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import RankAlphaConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import low_rank_apply
from ..core.registry import register
from ._shared_bases import SeededBases, draw_seed


@dataclass
class NolaConfig(RankAlphaConfig):
    """rank: r of the LoRA factors; num_basis_A: k (bases for A); num_basis_B: l (bases for B);
    alpha: s = α/r (None: α = r, s = 1, as the authors' scripts; their code's default α = 1 is
    ``alpha=1.0``); dropout: on the adapter's input; rslora: s = α/√r."""

    num_basis_A: int = 128
    num_basis_B: int = 128

    def __post_init__(self):
        super().__post_init__()
        self._check_int("num_basis_A")
        self._check_int("num_basis_B")


class NolaBases(SeededBases):
    """One layer's frozen ``A₀ (r × in)``, ``A_j (k × r × in)`` and ``B_i (l × out × r)``; ``key = (seed,)``."""

    names = ("nola_A0", "nola_basis_A", "nola_basis_B")

    def __init__(self, seed: int, rank: int, n_out: int, n_in: int, k: int, l_: int, device=None, dtype=None):
        self.shape = (rank, n_out, n_in, k, l_)
        super().__init__([seed], device=device, dtype=dtype)

    def generate(self, key):
        r, n_out, n_in, k, l_ = self.shape
        g = torch.Generator(device="cpu").manual_seed(key[0])
        bound = 1.0 / math.sqrt(n_in)
        a0 = torch.empty(r, n_in).uniform_(-bound, bound, generator=g)
        basis_a = torch.empty(k, r, n_in).uniform_(-1.0, 1.0, generator=g).mul_(1.0 / math.sqrt(k))
        basis_b = torch.empty(l_, n_out, r).uniform_(-1.0, 1.0, generator=g).mul_(1.0 / math.sqrt(l_))
        return {"nola_A0": a0, "nola_basis_A": basis_a, "nola_basis_B": basis_b}


@register("nola")
class Nola(Method):
    """LoRA factors as trained combinations of seeded random bases (see module docstring)."""

    Config = NolaConfig
    summary = "A = A0+Σα_j A_j, B = Σβ_i B_i over frozen seeded random bases; trains k+l coefficients (Koohpayegani 2024)"
    default_lr = 1e-2
    demo_options = {"rank": 8}

    def __init__(self, view: LayerView, config: NolaConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, self.name)
        self.rank, self.scale = config.rank, config.scale
        kw = view.factory_kwargs
        self.bases = NolaBases(draw_seed(generator), config.rank, view.out_features, view.in_features,
                               config.num_basis_A, config.num_basis_B, **kw)
        self.nola_alpha = nn.Parameter(torch.zeros(config.num_basis_A, **kw))
        self.nola_beta = nn.Parameter(torch.zeros(config.num_basis_B, **kw))

    @classmethod
    def num_params(cls, view: LayerView, config: NolaConfig) -> int:
        return config.num_basis_A + config.num_basis_B

    def loaded(self) -> None:
        self.bases.refresh()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = A₀ + Σ α_j A_j`` (r × in) and ``B = Σ β_i B_i`` (out × r)."""
        b = self.bases
        b.refresh()
        k, r, n_in = b.nola_basis_A.shape
        l_, n_out, _ = b.nola_basis_B.shape
        a = torch.addmv(b.nola_A0.reshape(-1), b.nola_basis_A.reshape(k, -1).t(), self.nola_alpha).view(r, n_in)
        bb = torch.mv(b.nola_basis_B.reshape(l_, -1).t(), self.nola_beta).view(n_out, r)
        return a, bb

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """LoRA's activation path with the combined factors (autograd carries their gradients on to
        the coefficients)."""
        a, b = self.factors()
        return low_rank_apply(self.view, x, base_out, a, b, self.scale, self.config.dropout, self.training)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return self.view.to_param((b @ a) * self.scale)
