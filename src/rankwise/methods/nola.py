"""NOLA: Compressing LoRA using Linear Combination of Random Basis (Koohpayegani, Navaneet,
Nooralinejad, Kolouri & Pirsiavash, ICLR 2024, arXiv:2310.02556).

LoRA's factors are re-parameterized as linear combinations of frozen random matrices generated
from a seed; only the mixing coefficients are trained::

    ΔW = s · B A,    A = A₀ + Σ_{j=1..k} α_j A_j,    B = Σ_{i=1..l} β_i B_i
    A_j ∈ R^{r×in}, B_i ∈ R^{out×r} ~ U(−1, 1)/√k (resp. /√l) frozen;  α ∈ R^k, β ∈ R^l trained

with ``s = α/r``. As in the authors' code, ``A₀`` is a frozen Kaiming-uniform matrix (PyTorch's
Linear init, bound ``1/√in``) and both coefficient vectors start at zero, so ``B = 0``, ``ΔW = 0``
and the adapted model equals the base at init, while ``β`` still gets a gradient through ``A₀``.
The number of trained parameters, ``k + l`` per layer, is independent of the rank and of the
layer's shape.

Each layer has its own seed (drawn from the adapter's generator; the paper stores one seed per
layer, not shared), kept as a persistent ``int64`` buffer; the bases are non-persistent buffers
regenerated from it, so a saved adapter holds ``k + l`` coefficients and one seed per layer.

Cost: the bases are kept in memory (``r·(k·in + l·out)`` floats per layer: 2.0M, 7.5 MiB, for a
384×1536 layer at the defaults r = 8, k = l = 128) instead of being regenerated every step as the
reference does; forming ``A`` and ``B`` is two matrix-vector products (``k·r·in + l·out·r``
flops), and the activation view is LoRA's two thin products (never ``B A``). Every layer kind
works (LoRA's ``apply_in``/``apply_out``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import LowRankLinear, autocast_on, keep_mask, lowrank_branch
from ..core.registry import register
from ._shared_bases import SeededBases, draw_seed


@dataclass
class NolaConfig(AdapterConfig):
    """rank: r of the LoRA factors; num_basis_A: k (bases for A); num_basis_B: l (bases for B);
    alpha: s = α/r (None: α = r); dropout: on the adapter's input."""

    rank: int = 8
    num_basis_A: int = 128
    num_basis_B: int = 128
    alpha: float | None = None
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        for name in ("rank", "num_basis_A", "num_basis_B"):
            v = getattr(self, name)
            self._check(isinstance(v, int) and not isinstance(v, bool) and v > 0, name,
                        f"{name} must be a positive integer.")
        self._check(self.alpha is None or self.alpha > 0, "alpha", "alpha must be positive (or None: alpha = rank).")
        self._check(0.0 <= self.dropout < 1.0, "dropout", "dropout must be in [0, 1).")

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else float(self.alpha)) / self.rank


class NolaBases(SeededBases):
    """One layer's frozen ``A₀ (r × in)``, ``A_j (k × r × in)`` and ``B_i (l × out × r)``; ``key = (seed,)``."""

    def __init__(self, seed: int, rank: int, n_out: int, n_in: int, k: int, l_: int):
        self.shape = (rank, n_out, n_in, k, l_)
        super().__init__([seed])

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
    kinds = ("linear", "hf_conv1d", "conv1d", "conv2d", "embedding")
    summary = "A = A0+Σα_j A_j, B = Σβ_i B_i over frozen seeded random bases; trains k+l coefficients (Koohpayegani 2024)"
    identity_at_init = True
    merge_atol = 1e-5
    default_lr = 1e-2
    demo_options = {"rank": 8}

    def __init__(self, view: LayerView, config: NolaConfig, generator=None, calibration=None):
        super().__init__(view, config)
        view.check_rank(config.rank, "nola")
        self.view, self.config, self.rank, self.scale = view, config, config.rank, config.scale
        self.bases = NolaBases(draw_seed(generator), config.rank, view.out_features, view.in_features,
                               config.num_basis_A, config.num_basis_B)
        w = view.weight
        kw = {"dtype": w.dtype if w.is_floating_point() else torch.float32}
        if kw["dtype"] != torch.float32:
            self.bases.to(kw["dtype"])
        self.nola_alpha = nn.Parameter(torch.zeros(config.num_basis_A, **kw))
        self.nola_beta = nn.Parameter(torch.zeros(config.num_basis_B, **kw))
        self.drop = config.dropout

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
        the coefficients): one fused node on linear layers, the layer's own operation elsewhere."""
        a, b = self.factors()
        v, dropping = self.view, self.drop > 0 and self.training
        if (v.kind in ("linear", "hf_conv1d") and x.dtype == a.dtype == base_out.dtype
                and not autocast_on(x.device.type)):
            keep = 1.0 - self.drop if dropping else 1.0
            mask = keep_mask(x, keep) if dropping else None
            if torch.is_grad_enabled():
                return LowRankLinear.apply(x, base_out, a, b, self.scale, mask, keep)
            return lowrank_branch(x, base_out, a, b, self.scale / keep, mask)
        if x.is_floating_point() and x.dtype != a.dtype:
            x = x.to(a.dtype)
        if dropping and x.is_floating_point():
            x = F.dropout(x, self.drop, training=True)
        return base_out + (v.apply_out(v.apply_in(x, a), b) * self.scale).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return self.view.to_param((b @ a) * self.scale)
