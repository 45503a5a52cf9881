"""RandLoRA: full-rank parameter-efficient fine-tuning of large models (Albert, Zhang, Ranasinghe,
Caetano, Lucey & Gould, ICLR 2025, arXiv:2502.00987), in PEFT 0.21's parametrization.

A sum of ``n = ⌈min(out, in)/r⌉`` frozen random rank-``r`` bases, each with trained diagonal
scalings, so the update can reach full rank with few trained parameters. With ``d = min(out, in)``
and ``D = max(out, in)``::

    Â = flatten_{(i,b)}( λ[i,b] · A[i,:] ⊙ γ[b,:] ) ∈ R^{(r·n) × d}   (one shared A ∈ R^{r×d})
    B̂ = flatten_{(b,i)}( B[:, b, i] )               ∈ R^{D × (n·r)}   (B ∈ R^{D×n×r})
    ΔW = s · B̂ Â     if in = d,     ΔW = s · (B̂ Â)ᵀ    otherwise;     s = α / r  (α = 20·r by default)

``A``, ``B`` frozen, ``λ ∈ R^{r×n}`` and ``γ ∈ R^{n×d}`` trained. The two flattenings index the
``r·n`` columns differently (``i·n + b`` against ``b·r + i``), exactly as PEFT does, so weights move
between the two libraries unchanged; each column is still a product of one random ``D``-vector,
one random ``d``-vector and two trained scalings, and ``r·n ≥ d`` such terms make ``ΔW`` full rank
(the paper's point; tested). Init (PEFT): ``λ = 0`` (so ``ΔW = 0``: the adapted model equals the
base), ``γ = 1/max(n, d)``.

The bases are shared by all layers of an adapter, sliced from one pair sized for the largest
layer (``A[:, :, :d]``, ``B[:D, :n, :]``), and generated exactly as PEFT does from
``projection_seed``: Kaiming-uniform (``a = √5``) in bfloat16, each divided by its standard
deviation (``sparse``/``very_sparse``: ternary ``{-1, 0, 1}`` bases, also normalized). PEFT uses
float16 instead where ``accelerate`` reports no bfloat16 support; rankwise always uses bfloat16.

Activation view: ``Â`` (an ``(r·n) × d`` matrix, about ``d × d``) is formed from ``λ, A, γ`` by one
autograd node that saves only the small factors. The update is full rank, so for large batches
one product with ``W0 + ΔW`` is cheaper than the two thin products ``x → Â → B̂`` (about
``2·N·d·D`` flops): on linear layers with more tokens ``N`` than ``d`` the adapter forms ``ΔW``
(``D·d·r·n ≈ D·d²`` flops) and, as the first adapter of the layer, replaces the base matmul with
one product with ``W0 + ΔW`` (``computes_base``); otherwise it uses the thin products.

Parameters per layer: ``r·n + n·d``. Storage: the trained tensors and, once per adapter, the key
``(seed, max_out, max_in)`` (``save_projection=True``: the bases too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import LayerView
from ..core.ops import low_rank_apply
from ..core.registry import register
from ._shared_bases import SeededBases, SharedBasesConfig, SharedBasesMethod


@dataclass
class RandloraConfig(SharedBasesConfig):
    """rank: r of each random basis (fewer trained parameters as r grows: n = ⌈min(out,in)/r⌉ bases);
    alpha: s = α/r (None: α = 20·r, s = 20: PEFT's 640 at its r = 32); sparse / very_sparse: ternary
    bases; dropout, projection_seed, save_projection: see ``SharedBasesConfig``."""

    rank: int = 32
    alpha: float | None = None
    sparse: bool = False
    very_sparse: bool = False

    def __post_init__(self):
        super().__post_init__()
        self._check(self.alpha is None or (math.isfinite(self.alpha) and self.alpha > 0), "alpha",
                    "alpha must be a positive number (or None: 20·rank, as PEFT recommends).")

    @property
    def randlora_alpha(self) -> float:
        """α in effect: ``alpha``, or 20·rank when None (kept None so a rank override follows)."""
        return 20.0 * self.rank if self.alpha is None else float(self.alpha)

    @property
    def scale(self) -> float:
        return self.randlora_alpha / self.rank


def num_bases(d: int, rank: int) -> int:
    """``n = ⌈d / r⌉``: enough rank-``r`` bases for a full-rank ``d``-dimensional update."""
    return -(-d // rank)


class RandloraBases(SeededBases):
    """The shared ``A (r × 1 × d_max)`` and ``B (D_max × n_max × r)``; ``key = (seed, max_out, max_in)``."""

    names = ("randlora_A", "randlora_B")
    exact = {"randlora_A": (0, 1), "randlora_B": (2,)}

    def __init__(self, key, config: RandloraConfig, persistent: bool = False, device=None):
        self.rank, self.sparse, self.very_sparse = config.rank, config.sparse, config.very_sparse
        super().__init__(key, persistent, device)

    def generate(self, key):
        seed, n_out, n_in = key
        r = self.rank
        big, small = max(n_out, n_in), min(n_out, n_in)
        n = num_bases(small, r)
        g = torch.Generator(device="cpu").manual_seed(seed)
        if self.sparse or self.very_sparse:  # PEFT: very_sparse takes precedence
            sparsity = math.sqrt(small) if self.very_sparse else 3
            a = torch.rand((r, 1, small), generator=g)
            b = torch.rand((big, n, r), generator=g)
            a, b = (self._ternary(t, sparsity) for t in (a, b))
        else:
            a = nn.init.kaiming_uniform_(torch.empty((r, 1, small), dtype=torch.bfloat16), a=math.sqrt(5), generator=g)
            b = torch.cat([nn.init.kaiming_uniform_(torch.empty((big, 1, r), dtype=torch.bfloat16), a=math.sqrt(5),
                                                    generator=g) for _ in range(n)], dim=1)
        return {"randlora_A": (a / a.std()).float(), "randlora_B": (b / b.std()).float()}

    @staticmethod
    def _ternary(u: torch.Tensor, sparsity: float) -> torch.Tensor:
        t = torch.zeros(u.shape)
        t[u < 1 / (2 * sparsity)] = -1
        t[u > 1 - 1 / (2 * sparsity)] = 1
        return t


class _ScaledBasis(torch.autograd.Function):
    """``Â[i, b, :] = λ[i, b] · A[i, :] ⊙ γ[b, :]`` (``r × n × d``); saves only ``A``, ``λ``, ``γ``."""

    @staticmethod
    def forward(ctx, a, lam, gamma):
        ctx.save_for_backward(a, lam, gamma)
        return lam[:, :, None] * a[:, None, :] * gamma[None, :, :]

    @staticmethod
    def backward(ctx, grad):
        a, lam, gamma = ctx.saved_tensors
        grad_lam = grad_gamma = None
        if ctx.needs_input_grad[1]:
            grad_lam = torch.einsum("ibj,ij,bj->ib", grad, a, gamma)
        if ctx.needs_input_grad[2]:
            grad_gamma = torch.einsum("ibj,ij,ib->bj", grad, a, lam)
        return None, grad_lam, grad_gamma


@register("randlora")
class Randlora(SharedBasesMethod):
    """Full-rank update from scaled shared random bases (see module docstring)."""

    Config = RandloraConfig
    Bases = RandloraBases
    summary = "ΔW = s·Σ_b B_b diag(λ_b) A diag(γ_b): shared random bases, full rank (Albert et al. 2025)"
    computes_base = True
    demo_options = {"rank": 32}

    def __init__(self, view: LayerView, config: RandloraConfig, generator=None, calibration=None, shared=None):
        super().__init__(view, config, generator, shared)
        self.scale = config.scale
        self.small, self.big = min(view.in_features, view.out_features), max(view.in_features, view.out_features)
        self.n = num_bases(self.small, config.rank)
        kw = view.factory_kwargs
        self.randlora_lambda = nn.Parameter(torch.zeros(config.rank, self.n, **kw))
        self.randlora_gamma = nn.Parameter(torch.full((self.n, self.small), 1.0 / max(self.n, self.small), **kw))

    @classmethod
    def num_params(cls, view: LayerView, config: RandloraConfig) -> int:
        d = min(view.in_features, view.out_features)
        n = num_bases(d, config.rank)
        return config.rank * n + n * d

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first (k × in), second (out × k))`` with ``ΔW = s · second @ first``, ``k = r·n``."""
        self.bases.refresh()
        lam = self.randlora_lambda
        a = self.bases.randlora_A[:, 0, : self.small].to(lam.dtype)
        b = self.bases.randlora_B[: self.big, : self.n, :].to(lam.dtype)
        a_hat = _ScaledBasis.apply(a, lam, self.randlora_gamma).reshape(-1, self.small)  # (r·n) × d
        b_hat = b.reshape(self.big, -1)  # D × (n·r)
        if self.view.in_features == self.small:
            return a_hat, b_hat
        return b_hat.t(), a_hat.t()

    def delta2d(self) -> torch.Tensor:
        first, second = self.factors()
        return (second @ first) * self.scale

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        v, p = self.view, self.config.dropout
        lam = self.randlora_lambda
        if x.is_floating_point() and x.dtype != lam.dtype:
            x = x.to(lam.dtype)
        if v.is_linear and x.numel() // v.in_features > self.small:  # dense: one product with ΔW (or W0 + ΔW)
            xa = F.dropout(x, p, training=True) if p > 0 and self.training else x
            delta = self.delta2d()
            w0 = v.weight2d()
            if base_out is None and xa is x:
                return v.functional(x, w0 + delta.to(w0.dtype))
            out = v.functional(xa, delta, bias=False)
            if base_out is None:
                return v.functional(x, w0) + out.to(w0.dtype)
            return base_out + out.to(base_out.dtype)
        if base_out is None:
            base_out = v.functional(x, v.weight2d())
        first, second = self.factors()
        return low_rank_apply(v, x, base_out, first, second, self.scale, p, self.training)

    def delta_weight(self) -> torch.Tensor:
        return self.view.to_param(self.delta2d())

    # ---- PEFT format (the codec is SharedBasesMethod's) -------------------------------------
    peft_type = "RANDLORA"
    peft_name = "RandLoRA"
    trained = ("randlora_lambda", "randlora_gamma")

    @classmethod
    def peft_options(cls, config: RandloraConfig) -> dict:
        return {"randlora_alpha": config.randlora_alpha, "sparse": config.sparse, "very_sparse": config.very_sparse}

    @classmethod
    def from_peft_options(cls, pcfg: dict) -> dict:
        return {"alpha": float(pcfg.get("randlora_alpha", 640)), "sparse": bool(pcfg.get("sparse")),
                "very_sparse": bool(pcfg.get("very_sparse"))}

    # PEFT's files hold the bases once per model (base_model.randlora_A/B) and again under every layer
    def peft_tensors(self) -> dict[str, torch.Tensor]:
        self.bases.refresh()  # copies, so the file has no shared storage
        return {**super().peft_tensors(), **{n: getattr(self.bases, n).clone() for n in RandloraBases.names}}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_peft_tensors(tensors)
        if "randlora_A" in tensors:
            self.bases.assign({n: tensors[n] for n in RandloraBases.names}, f"module '{self.view.name}'")

    @classmethod
    def peft_suffixes(cls) -> tuple[str, ...]:
        return (*cls.trained, *RandloraBases.names)
