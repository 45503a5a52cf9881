r"""SLTrain: a sparse plus low-rank weight, trained from scratch.

Han, Li, Huang, Hong, Takeda, Jawanpuria, Mishra, "SLTrain: a sparse plus low-rank approach for
parameter and memory efficient pretraining", NeurIPS 2024, arXiv 2406.02214; code
``andyjm3/SLTrain`` (``splora/splora_linear.py``, ``sparse-lora/sparse_linear.cpp``). Each target
layer (no base weight is kept) is

    y = W x + b,    W = s · B A + S,    s = alpha / rank,   B ∈ R^{m×r}, A ∈ R^{r×n}

where S has a support I of ``round(δ·m·n)`` entries sampled uniformly without replacement at
initialisation and **never changed**; only its values V are trained (paper §3.2). S is stored as
V (``sparse_values``, trained) and the sorted flat row-major indices I (``sparse_index``, a
persistent buffer, int32 when m·n < 2³¹ else int64).

Init (authors' code, ``SpLoRaLinear``): A Kaiming-uniform (a = √5), B = 0, V ~ U[-1/√n, 1/√n]
(the bound of a dense ``nn.Linear``), so W starts as the sparse S. Defaults: rank 128, alpha 32
(s = 0.25), δ = 0.03 (their LLaMA-60M/130M scripts; the paper also uses 0.05).

Memory (the trade-off, following the authors' extension): the forward and backward go through
:class:`_SparseLowRankLinear`, which forms ``W = s·BA + scatter(I, V)`` as a *transient* dense
(m, n) tensor, computes ``x Wᵀ`` and frees it; for the backward it saves only x and the factors and
forms W (for ∂x) and ∂W = ∂yᵀ x (for ∂B = s·∂W Aᵀ, ∂A = s·Bᵀ ∂W, ∂V = ∂W[I]) again. So the stored
model, its gradients and the optimizer state are (m + n)·r + δ·m·n numbers per layer, and no dense
(m, n) tensor outlives one layer's forward or backward — where plain autograd on ``F.linear(x, BA +
S)`` would keep every layer's dense W alive from forward to backward (a full model's worth of
weights). The alternative, a truly sparse product ``x Sᵀ``, costs O(tokens · δ·m·n) memory for the
gathered products, more than the m·n transient as soon as a batch holds over 1/δ tokens; so, as the
authors, we use the transient. The cost is one extra dense weight-sized product in the backward.

``refactorize_every=T`` (Glentis et al., "Scalable Parameter and Memory Efficient Pretraining for
LLM: Recent Algorithmic Advances and Benchmarking", arXiv 2505.22922, "weight refactorization" and
"momentum reset"): every T steps re-factor ``BA = UΣVᵀ`` (thin SVD via two QRs and an r×r SVD) as
``B = U√Σ, A = √ΣVᵀ`` (same product: the function is unchanged, the factors are balanced) and zero
the first moment (``exp_avg``) of A and B. Their code for it is not in the public repository; the
choice to zero the first moment only (the second moment keeps its scale, so no re-warmup is needed)
is ours. A zero singular value leaves a zero row of A and column of B, which no longer train.

Deviations: nnz = round(δ·m·n) (the authors floor it); no trainable scaling; the transient W is
formed in the compute dtype (the autocast dtype under autocast, else the factors' dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import register
from ._optim import reset_state
from .relora import _int, _positive


def _scatter_dense(b, a, values, index) -> torch.Tensor:
    w = b @ a
    w.view(-1).index_add_(0, index, values)
    return w


class _SparseLowRankLinear(torch.autograd.Function):
    """``y = x (B A + S)ᵀ + bias`` with ``S = scatter(index, values)``; saves no dense (m, n) tensor.
    ``a`` comes in already multiplied by the scale."""

    @staticmethod
    def forward(ctx, x, b, a, values, index, bias):
        ctx.save_for_backward(x, b, a, values, index)
        ctx.has_bias = bias is not None
        return F.linear(x, _scatter_dense(b, a, values, index), bias)

    @staticmethod
    def backward(ctx, grad):
        x, b, a, values, index = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = gb = ga = gv = gbias = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ _scatter_dense(b, a, values, index)).view(x.shape)
        if any(ctx.needs_input_grad[1:4]):
            gw = g2.t() @ x.reshape(-1, x.shape[-1])  # transient (m, n)
            gb = gw @ a.t() if ctx.needs_input_grad[1] else None
            ga = b.t() @ gw if ctx.needs_input_grad[2] else None
            gv = gw.view(-1).index_select(0, index) if ctx.needs_input_grad[3] else None
        if ctx.has_bias and ctx.needs_input_grad[5]:
            gbias = g2.sum(0)
        return gx, gb, ga, gv, None, gbias


class SLTrainLinear(nn.Module):
    """``W = s·B A + S`` with a fixed random sparse support; see the module docstring."""

    def __init__(self, linear: nn.Linear, rank: int, scale: float, density: float, generator: torch.Generator):
        super().__init__()
        w = linear.weight
        m, n = linear.out_features, linear.in_features
        self.in_features, self.out_features, self.rank, self.scale = n, m, rank, scale
        kw = dict(device=w.device, dtype=w.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, n, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.lora_B = nn.Parameter(torch.zeros(m, rank, **kw))
        nnz = round(density * m * n)
        index = torch.randperm(m * n, generator=generator, device=w.device)[:nnz].sort().values
        self.register_buffer("sparse_index", index.to(torch.int32 if m * n < 2**31 else torch.int64))
        bound = 1 / math.sqrt(n)
        self.sparse_values = nn.Parameter(torch.empty(nnz, **kw).uniform_(-bound, bound, generator=generator))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.lora_B.dtype

        def cast(t):
            return t if t is None or t.dtype == dtype else t.to(dtype)

        with torch.autocast(dev, enabled=False):
            return _SparseLowRankLinear.apply(cast(x), cast(self.lora_B), cast(self.lora_A * self.scale),
                                              cast(self.sparse_values), self.sparse_index, cast(self.bias))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scale={self.scale}, nnz={self.sparse_values.numel()}")


@torch.no_grad()
def refactorize_(b: torch.Tensor, a: torch.Tensor) -> None:
    """In place: ``B A = U Σ Vᵀ`` (thin SVD of the product, from QR(B), QR(Aᵀ) and the SVD of an
    r×r matrix), then ``B ← U √Σ``, ``A ← √Σ Vᵀ``. The product is unchanged (to rounding). A zero
    product (B = 0 at init) is left as it is: its factorization would zero A as well."""
    if not b.any():
        return
    work = torch.promote_types(b.dtype, torch.float32)  # float32 at least (no QR in bf16)
    qb, rb = torch.linalg.qr(b.to(work))
    qa, ra = torch.linalg.qr(a.to(work).t())
    u, sigma, vh = torch.linalg.svd(rb @ ra.t())
    root = sigma.sqrt()
    b.copy_(((qb @ u) * root).to(b.dtype))
    a.copy_((root[:, None] * (vh @ qa.t())).to(a.dtype))


def refactorize_layers(layers, optimizers) -> dict:
    """Refactorize every layer's (B, A) and zero their first moment (the benchmark's two tricks)."""
    for _, m in layers:
        refactorize_(m.lora_B, m.lora_A)
    params = [p for _, m in layers for p in (m.lora_A, m.lora_B)]
    zeroed = reset_state(optimizers, params, prune=1.0, keys=("exp_avg",))
    return {"refactorized_layers": len(layers), "momentum_entries_zeroed": zeroed}


@register
class SLTrain:
    """SLTrain: ``W = (alpha/rank)·B A + S``, S on a fixed random support of density δ; math in the
    module docstring."""

    name = "sltrain"

    @dataclass
    class Config:
        rank: int = 128
        alpha: float = 32.0  # scale s = alpha / rank
        density: float = 0.03  # δ: share of W's entries in the sparse support
        refactorize_every: int = 0  # re-factor BA by SVD + momentum reset every T steps (0 = never)

        def __post_init__(self):
            _int("sltrain", "rank", self.rank, 1)
            _positive("sltrain", "alpha", self.alpha)
            if (isinstance(self.density, bool) or not isinstance(self.density, (int, float))
                    or not 0 < self.density < 1):
                raise ConfigError(f"sltrain: density={self.density!r} must be in (0, 1): the share of each "
                                  "weight's entries in the sparse part (the paper: 0.03 or 0.05).")
            _int("sltrain", "refactorize_every", self.refactorize_every, 0)

    @staticmethod
    def check(name: str, linear: nn.Linear, config) -> None:
        if round(config.density * linear.in_features * linear.out_features) < 1:
            raise ConfigError(f"sltrain: density={config.density} gives no sparse entry for {name} (shape "
                              f"{tuple(linear.weight.shape)}); raise density.")

    @staticmethod
    def wrap(linear: nn.Linear, config, generator: torch.Generator) -> nn.Module:
        return SLTrainLinear(linear, config.rank, config.alpha / config.rank, config.density, generator)

    @staticmethod
    @torch.no_grad()
    def dense_weight(module) -> torch.Tensor:
        w = _scatter_dense(module.lora_B.float(), module.lora_A.float() * module.scale,
                           module.sparse_values.float(), module.sparse_index)
        return w.to(module.lora_B.dtype)

    @classmethod
    def on_step(cls, model, layers, config, step, optimizers, total_steps):
        if not config.refactorize_every or step == 0 or step % config.refactorize_every:
            return None
        return refactorize_layers(layers, optimizers)
