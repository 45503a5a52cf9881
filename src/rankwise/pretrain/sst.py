"""SST: Sparse Spectral Training (Zhao, Zhang, Li, Liu, Cannistraci 2024, "Sparse Spectral Training and
Inference on Euclidean and Hyperbolic Neural Networks", arXiv:2405.15481, ICML 2025).

A linear layer ``W (out × in)`` is replaced by its full spectral factorization (the dense ``W`` is
removed), ``k = min(out, in)``::

    W = U diag(σ) Vᵀ,     U ∈ R^{out×k},  σ ∈ R^k_{≥0},  V ∈ R^{in×k}      (initially the SVD of W)
    y = U (σ ⊙ (Vᵀ x)) + b

Training (paper §4, Algorithm 1):

* **All singular values** ``σ`` are trained every step; after each step ``σ ← max(σ, 0)``.
* **Sampled singular vectors**: in each *iteration* of ``resample_every`` steps only ``r = rank``
  pairs ``(U_{·i}, V_{·i})`` get updates. The indices are drawn without replacement from the
  multinomial distribution weighted by the singular values (§4.4)::

        p(i) = (1 − u) · σ_i / Σ_j σ_j + u / k          (u = ``uniform_mix``; 0 = σ-proportional)

* **Enhanced gradient** (§4.2, ``enhanced_gradient=True``): the sampled vectors get the gradient of
  the direction only, without the factor σ_i that autograd would put on it::

        ∇̃U_{·i} = (∂L/∂W) V_{·i},        ∇̃V_{·i} = (∂L/∂W)ᵀ U_{·i},        ∇σ_i = U_{·i}ᵀ (∂L/∂W) V_{·i}

  (computed from the layer's input and output gradient; ``∂L/∂W`` is never formed). After each step
  the trained vectors are normalized to unit length (``normalize=True``): magnitudes live in σ.
* **Periodic re-SVD**: every ``svd_every`` steps (one *round*; default ``resample_every·⌈k/r⌉``,
  i.e. ``⌈k/r⌉`` iterations so that every index can be visited) the current
  ``W = U diag(σ) Vᵀ`` is decomposed again, which restores ``UᵀU = VᵀV = I`` and re-sorts σ.

Storage follows the paper's memory-efficient implementation (§4.5): the ``r`` sampled pairs are
trainable parameters ``U_active (out×r)``, ``V_active (in×r)``; the other ``k − r`` pairs are
buffers ``U_frozen``, ``V_frozen`` without gradient or optimizer state; ``sigma`` (length k, in
spectral order) is a parameter; ``active_idx`` / ``frozen_idx`` record which spectral index each
column holds. Resampling swaps columns between the two segments and resets the optimizer state of
``U_active`` / ``V_active`` (the moments belonged to other vectors); re-SVD resets the state of all
three re-factored tensors. Both go through :func:`rankwise.pretrain._optim.reset_state`.

Memory (per layer, elements; dense Adam training holds ``4·out·in``: weight, gradient, 2 moments)::

    stored factors   (out + in) · k + k           (≥ out·in: for a square layer 2n² + n, twice dense)
    gradients        (out + in) · r + k
    Adam moments     2 · ((out + in) · r + k)

so SST saves gradient and optimizer memory, not weight memory: a square ``n×n`` layer needs
``2n² + 6nr + 4n`` numbers against dense Adam's ``4n²`` (``r = n/12``: about ``2.5n²``, -37%).
Activations: the frozen branch keeps ``x`` and ``Vᵀx`` (``k − r`` values per token) for backward. The forward costs ``(out + in)·k`` MACs per
token (twice a square dense layer's). Sampling is reproducible and resumable: the first draw uses
the generator ``parametrize`` gives the layer, the draw at step ``s`` uses
``rankwise.pretrain.layer_generator(layer, "sst", s)`` (seed, layer name, step).

Defaults: ``rank=64`` (the paper's OPT-125M setting, 8.3% of d=768); ``resample_every=200`` steps
per iteration. Deviations and what could not be checked: the authors' code
(``anonymous.4open.science/r/sparse_spectral_training-6A2C``; GitHub ``biomedical-cybernetics``) was
not reachable from here, so storage, the enhanced gradient and the swap follow the paper's text as
summarized above; ``uniform_mix`` (the ICML version's reported ``p(i) = ½(1/k + σ_i/Σσ)``) is an
option, default 0 (σ-proportional, the v1 text and the abstract); whether the authors fold the
norms into σ when normalizing is not stated — here they are not (the normalization is a projection
step, as the paper describes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import layer_generator, register
from ._optim import reset_state

__all__ = ["SST", "SSTLinear", "sampling_probabilities", "sample_indices"]


def sampling_probabilities(sigma: torch.Tensor, uniform_mix: float = 0.0) -> torch.Tensor:
    """``p(i) = (1 − u)·σ_i/Σσ + u/k`` in float64 on the CPU (uniform when all σ are 0)."""
    s = sigma.detach().to(device="cpu", dtype=torch.float64).clamp_min(0)
    k = s.numel()
    total = s.sum()
    prop = s / total if total > 0 else torch.full_like(s, 1.0 / k)
    return (1.0 - uniform_mix) * prop + uniform_mix / k


def sample_indices(sigma: torch.Tensor, r: int, generator: torch.Generator | None = None,
                   uniform_mix: float = 0.0) -> torch.Tensor:
    """``r`` distinct spectral indices drawn by ``torch.multinomial`` (without replacement) from
    :func:`sampling_probabilities`, on the generator's device; sorted, int64."""
    p = sampling_probabilities(sigma, uniform_mix)
    if int((p > 0).sum()) < r:  # fewer non-zero σ than r: the rest with a tiny uniform weight
        p = p + (p == 0).double() * 1e-12
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.multinomial(p.to(device), r, replacement=False, generator=generator).sort().values


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _ActiveBranch(torch.autograd.Function):
    """``y = U_a (σ_a ⊙ (V_aᵀ x))`` with SST's enhanced gradient for ``U_a`` and ``V_a``."""

    @staticmethod
    def forward(ctx, x, u, v, s):
        dt = _compute_dtype(x)
        xc, uc, vc, sc = x.to(dt), u.to(dt), v.to(dt), s.to(dt)
        a = xc @ vc  # (..., r)
        y = (a * sc) @ uc.T
        ctx.save_for_backward(xc, a, uc, vc, sc)
        ctx.dtypes = (x.dtype, u.dtype, v.dtype, s.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        xc, a, uc, vc, sc = ctx.saved_tensors
        tx, tu, tv, ts = ctx.dtypes
        g = g.to(uc.dtype)
        c = g @ uc  # (..., r) = (∂L/∂y) projected on U
        g2, a2, c2, x2 = g.reshape(-1, g.shape[-1]), a.reshape(-1, a.shape[-1]), c.reshape(-1, c.shape[-1]), \
            xc.reshape(-1, xc.shape[-1])
        grad_u = (g2.T @ a2).to(tu)  # (∂L/∂W) V     (no σ: enhanced)
        grad_v = (x2.T @ c2).to(tv)  # (∂L/∂W)ᵀ U   (no σ: enhanced)
        grad_s = (c2.float() * a2.float()).sum(0).to(ts)  # U_iᵀ (∂L/∂W) V_i
        grad_x = ((c * sc) @ vc.T).to(tx) if ctx.needs_input_grad[0] else None
        return grad_x, grad_u, grad_v, grad_s


class SSTLinear(nn.Module):
    """A linear layer stored as ``U diag(σ) Vᵀ`` with ``r`` trainable singular-vector pairs (see module doc)."""

    def __init__(self, linear: nn.Linear, config: SST.Config, generator: torch.Generator | None = None):
        super().__init__()
        w = linear.weight
        out_f, in_f = w.shape
        k = min(out_f, in_f)
        r = config.rank
        self.in_features, self.out_features, self.k, self.rank = in_f, out_f, k, r
        self.enhanced_gradient = config.enhanced_gradient
        kw = dict(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
        active = sample_indices(s, r, generator, config.uniform_mix).cpu()
        frozen = _complement(active, k)
        a_dev, f_dev = active.to(w.device), frozen.to(w.device)
        self.sigma = nn.Parameter(s.to(**kw))
        self.U_active = nn.Parameter(u[:, a_dev].to(**kw).contiguous())
        self.V_active = nn.Parameter(vh.T[:, a_dev].to(**kw).contiguous())
        self.register_buffer("U_frozen", u[:, f_dev].to(**kw).contiguous())
        self.register_buffer("V_frozen", vh.T[:, f_dev].to(**kw).contiguous())
        self.register_buffer("active_idx", a_dev)
        self.register_buffer("frozen_idx", f_dev)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    # ------------------------------------------------------------------ views
    def full_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U (out×k), σ (k), V (in×k))`` in spectral order (copies)."""
        u = self.U_frozen.new_empty(self.out_features, self.k)
        v = self.V_frozen.new_empty(self.in_features, self.k)
        u[:, self.frozen_idx] = self.U_frozen
        u[:, self.active_idx] = self.U_active.detach()
        v[:, self.frozen_idx] = self.V_frozen
        v[:, self.active_idx] = self.V_active.detach()
        return u, self.sigma.detach().clone(), v

    def dense_weight(self) -> torch.Tensor:
        u, s, v = self.full_factors()
        return ((u.float() * s.float()) @ v.float().T).to(self.sigma.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma
        if self.k > self.rank:
            h = (x @ self.V_frozen) * sigma[self.frozen_idx]
            y = F.linear(h, self.U_frozen, self.bias)
        else:
            y = None
        s_a = sigma[self.active_idx]
        if self.enhanced_gradient:
            ya = _ActiveBranch.apply(x, self.U_active, self.V_active, s_a)
        else:
            ya = ((x @ self.V_active) * s_a) @ self.U_active.T
        if y is None:
            return ya if self.bias is None else ya + self.bias.to(ya.dtype)
        return y + ya.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, rank={self.rank}"

    # ------------------------------------------------------------------ training-time surgery
    @torch.no_grad()
    def project(self) -> None:
        """After a step: ``σ ← max(σ, 0)``."""
        self.sigma.clamp_(min=0)

    @torch.no_grad()
    def normalize_active(self) -> None:
        for p in (self.U_active, self.V_active):
            n = p.float().norm(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            p.copy_((p.float() / n).to(p.dtype))

    @torch.no_grad()
    def _set_split(self, u: torch.Tensor, v: torch.Tensor, active: torch.Tensor) -> None:
        active = active.to(self.active_idx.device)
        frozen = _complement(active.cpu(), self.k).to(self.active_idx.device)
        self.U_active.copy_(u[:, active])
        self.V_active.copy_(v[:, active])
        self.U_frozen.copy_(u[:, frozen])
        self.V_frozen.copy_(v[:, frozen])
        self.active_idx.copy_(active)
        self.frozen_idx.copy_(frozen)

    @torch.no_grad()
    def resample(self, generator: torch.Generator, uniform_mix: float) -> None:
        """Write the trained pairs back and draw a new active set (σ unchanged)."""
        u, _, v = self.full_factors()
        self._set_split(u, v, sample_indices(self.sigma, self.rank, generator, uniform_mix))

    @torch.no_grad()
    def resvd(self, generator: torch.Generator, uniform_mix: float) -> None:
        """Re-factor the current ``W = U diag(σ) Vᵀ`` by SVD (float32) and draw a new active set."""
        w = self.dense_weight().float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        self.sigma.copy_(s.to(self.sigma.dtype))
        self._set_split(u.to(self.U_frozen.dtype), vh.T.to(self.V_frozen.dtype),
                        sample_indices(s, self.rank, generator, uniform_mix))


def _complement(idx: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.ones(k, dtype=torch.bool)
    mask[idx.cpu()] = False
    return torch.arange(k)[mask]


@register
class SST:
    """Sparse Spectral Training (see :mod:`rankwise.pretrain.sst`)."""

    name = "sst"

    @dataclass
    class Config:
        """rank: singular-vector pairs trained per iteration; resample_every: steps per iteration
        (T3); svd_every: steps per round, re-SVD (None: resample_every·⌈k/rank⌉ per layer);
        uniform_mix: weight of the uniform part of the sampling distribution; enhanced_gradient:
        the paper's σ-free gradient for U, V; normalize: unit-length vectors after each step."""

        rank: int = 64
        resample_every: int = 200
        svd_every: int | None = None
        uniform_mix: float = 0.0
        enhanced_gradient: bool = True
        normalize: bool = True

        def __post_init__(self):
            for name, low in (("rank", 1), ("resample_every", 1)):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int) or v < low:
                    raise ConfigError(f"sst: {name}={v!r} must be an int >= {low}.")
            if self.svd_every is not None and (isinstance(self.svd_every, bool) or not isinstance(self.svd_every, int)
                                               or self.svd_every < 1):
                raise ConfigError(f"sst: svd_every={self.svd_every!r} must be an int >= 1 (steps between re-SVDs) "
                                  "or None (resample_every · ⌈k / rank⌉).")
            if isinstance(self.uniform_mix, bool) or not isinstance(self.uniform_mix, (int, float)) \
                    or not 0.0 <= self.uniform_mix <= 1.0:
                raise ConfigError(f"sst: uniform_mix={self.uniform_mix!r} must be in [0, 1] (0: σ-proportional "
                                  "sampling, 0.5: the ICML version's mixture).")
            for name in ("enhanced_gradient", "normalize"):
                if not isinstance(getattr(self, name), bool):
                    raise ConfigError(f"sst: {name}={getattr(self, name)!r} must be True or False.")

    @staticmethod
    def wrap(linear: nn.Linear, config: SST.Config, generator: torch.Generator | None = None) -> SSTLinear:
        out_f, in_f = linear.weight.shape
        if config.rank > min(out_f, in_f):
            raise ConfigError(f"sst: rank={config.rank} is larger than min(out, in) = {min(out_f, in_f)} of a "
                              f"Linear({in_f} -> {out_f}); use rank <= {min(out_f, in_f)} (a fraction of the width, "
                              "e.g. 8%).")
        if linear.weight.device.type == "meta":
            raise ConfigError(f"sst: the Linear({in_f} -> {out_f}) weight is on the meta device; SST starts from "
                              "the SVD of the weight, so materialize the model first (e.g. model.to_empty(...) "
                              "then initialize).")
        return SSTLinear(linear, config, generator)

    @staticmethod
    def dense_weight(module: SSTLinear) -> torch.Tensor:
        return module.dense_weight()

    @staticmethod
    def svd_every(module: SSTLinear, config: SST.Config) -> int:
        if config.svd_every is not None:
            return config.svd_every
        return config.resample_every * math.ceil(module.k / module.rank)

    @classmethod
    def on_step(cls, model, layers, config, step, optimizers, total_steps=None) -> dict | None:
        resampled, refactored, zeroed = 0, 0, 0
        for _, m in layers:
            m.project()
            if config.normalize:
                m.normalize_active()
            if step <= 0:
                continue
            if step % cls.svd_every(m, config) == 0:
                m.resvd(layer_generator(m, "sst", step), config.uniform_mix)
                zeroed += reset_state(optimizers, [m.U_active, m.V_active, m.sigma])
                refactored += 1
            elif step % config.resample_every == 0:
                m.resample(layer_generator(m, "sst", step), config.uniform_mix)
                zeroed += reset_state(optimizers, [m.U_active, m.V_active])
                resampled += 1
        if resampled or refactored:
            return {"resampled": resampled, "resvd": refactored, "state_zeroed": zeroed}
        return None
