"""Compacter: low-rank parameterized hypercomplex multiplication (Karimi Mahabadi, Henderson &
Ruder, NeurIPS 2021, arXiv:2106.04647).

A PHM layer writes a weight as a sum of ``n`` Kronecker products; Compacter makes the "slow"
``n × n`` rules ``A_i`` shared by every layer and the "fast" right factors low-rank::

    ΔW = Σ_{i=1..n} A_i ⊗ (S_i T_iᵀ),   A_i ∈ R^{n×n} (shared),  S_i ∈ R^{p×r},  T_i ∈ R^{q×r}

with ``p = ⌈out/n⌉``, ``q = ⌈in/n⌉`` and ``r`` = ``phm_rank`` (1, the paper's rank-one choice).
The paper puts this parameterization in the down/up projections of bottleneck adapters; here it
parameterizes the update of the adapted layer itself, as rankwise's additive methods do. When ``out`` or ``in``
is not a multiple of ``n``, ``ΔW`` is the top-left ``out × in`` block of the ``np × nq`` Kronecker
sum (zero-padding the input, cropping the output) — a choice that keeps every layer adaptable;
``r`` is clamped to ``min(r, p, q)``.

The rules ``A_i`` (an ``n × n × n`` tensor) are one parameter shared by all layers of the adapter
(the engine's ``shared`` hook): the optimizer steps it once with the gradients of every layer, and
``rw.save`` stores it once.

Init (a rankwise choice, stated): ``A_i ~ N(0, 1/n)`` (keeps ``Σ_i A_i ⊗ ·`` norm-preserving on
average), ``T_i`` uniform ``±1/√q``, ``S_i = 0`` — so the adapted model equals the base at init and
the first step trains the ``S_i`` (LoRA's ``B = 0`` pattern). The authors' code
(github.com/rabeehk/compacter, ``configs/compacter.json``: ``phm_c_init normal``,
``hypercomplex_nonlinearity glorot-uniform``) draws the shared rule ``~ N(0, 0.01²)`` and both fast
factors glorot-uniform (gain √2), which is not zero at init; their adapter is a bottleneck whose
output is added to the hidden state, not a ``ΔW``. Here one fast factor must start at zero, and
with a ``0.01``-std rule every step on ``S_i`` would move ``ΔW`` ``1/(0.01 √n)`` = 50× (``n = 4``)
less than with the ``N(0, 1/n)`` rule — so the rule's scale is ours, chosen so that
``default_lr`` (LoRA's range) trains it.

Activation view (linear / HF Conv1D), the Kronecker structure used as such: with ``x`` seen as
``X ∈ R^{n×q}``, ``(A ⊗ S Tᵀ) x = vec(A X T Sᵀ)``, so

    Z = X T_i  (all i in one matmul),  Z' = A_i Z (per i),  y = Σ_i Z'_i S_iᵀ  (one matmul)

at ``N·n·r·(in + out + n²)`` multiply-adds for ``N`` tokens — a LoRA of rank about ``n r`` — and
never the ``out × in`` matrix. Convolutions and embeddings use the equivalent factorization
``ΔW = [A_i ⊗ S_i]_i · [I_n ⊗ T_iᵀ]_i`` (rank ``n² r``) through the layer's own operation.

Parameters, as ``num_params`` counts them for a model with this one layer: ``n³ + n r (p + q)``;
``L`` layers train ``n³ + Σ_l n r (p_l + q_l)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig
from ..core.layers import LayerView
from ..core.method import Method
from ..core.ops import autocast_on, kaiming_bound, low_rank_apply, normal_, uniform_
from ..core.registry import register


@dataclass
class CompacterConfig(AdapterConfig):
    """phm_dim: n, the number of Kronecker terms and the size of the shared rules; phm_rank: r of
    each fast factor ``S_i T_iᵀ`` (clamped to the layer; 1 is the paper's rank-one Compacter). It
    is not called ``rank``: the update's rank is up to ``n² r``, and a LoRA-style rank override
    (demo, benchmarks) should not turn a rank-one Compacter into a rank-8 one."""

    phm_dim: int = 4
    phm_rank: int = 1

    def __post_init__(self):
        super().__post_init__()
        self._check_int("phm_dim")
        self._check_int("phm_rank")


def _sizes(view: LayerView, config: CompacterConfig) -> tuple[int, int, int, int]:
    """(n, p, q, r): block sizes ``p = ⌈out/n⌉``, ``q = ⌈in/n⌉`` and the clamped rank."""
    n = config.phm_dim
    p, q = -(-view.out_features // n), -(-view.in_features // n)
    return n, p, q, min(config.phm_rank, p, q)


class PhmRules(nn.Module):
    """The shared rules ``A_i``: one ``n × n × n`` parameter (``A[i]`` is the i-th ``n × n`` rule)."""

    def __init__(self, n: int, view: LayerView, generator=None):
        super().__init__()
        self.phm_rule = nn.Parameter(normal_(torch.empty(n, n, n, **view.factory_kwargs), n ** -0.5, generator))


@register("compacter")
class Compacter(Method):
    """``Σ_i A_i ⊗ S_i T_iᵀ`` with the rules ``A_i`` shared by all layers (see module docstring)."""

    Config = CompacterConfig
    summary = "ΔW = Σ_i A_i ⊗ (S_i T_iᵀ): shared n×n rules, low-rank fast factors (Karimi Mahabadi et al. 2021)"
    default_lr = 3e-3

    @classmethod
    def shared(cls, views: list[LayerView], config: CompacterConfig, generator=None) -> PhmRules:
        return PhmRules(config.phm_dim, views[0], generator)

    def __init__(self, view: LayerView, config: CompacterConfig, generator=None, calibration=None, shared=None):
        super().__init__(view, config)
        if shared is None:  # built outside rw.adapt: rules of its own
            shared = self.shared([view], config, generator)
        n, p, q, r = _sizes(view, config)
        self.n, self.p, self.q, self.rank = n, p, q, r
        self.rules = shared  # registered here too: one object, counted once by the model
        kw = view.factory_kwargs
        self.compacter_T = nn.Parameter(uniform_(torch.empty(n, q, r, **kw), kaiming_bound(q), generator))
        self.compacter_S = nn.Parameter(torch.zeros(n, p, r, **kw))

    @classmethod
    def num_params(cls, view: LayerView, config: CompacterConfig) -> int:
        n, p, q, r = _sizes(view, config)
        return n ** 3 + n * r * (p + q)

    # ---- the two views ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        v = self.view
        a, s, t = self.rules.phm_rule, self.compacter_S, self.compacter_T
        if not v.is_linear:
            down, up = self._factors()
            return low_rank_apply(v, x, base_out, down, up)
        n, p, q, r = self.n, self.p, self.q, self.rank
        n_in, n_out = v.in_features, v.out_features
        if x.dtype != t.dtype:
            x = x.to(t.dtype)
        x2 = x.reshape(-1, n_in)
        if n * q != n_in:
            x2 = F.pad(x2, (0, n * q - n_in))
        tokens = x2.shape[0]
        # Z[N, b, (i, ρ)] = Σ_j X[N, b, j] T_i[j, ρ]   — one matmul for all i
        z = torch.mm(x2.reshape(tokens * n, q), t.permute(1, 0, 2).reshape(q, n * r))
        # Z'[N, a, i, ρ] = Σ_b A_i[a, b] Z[N, b, i, ρ]
        z = torch.einsum("iab,Nbir->Nair", a, z.view(tokens, n, n, r))
        # y[N, a, c] = Σ_{i, ρ} Z'[N, a, i, ρ] S_i[c, ρ]   — one matmul
        s2 = s.permute(0, 2, 1).reshape(n * r, p)
        z2 = z.reshape(tokens * n, n * r)
        if n * p == n_out and base_out.dtype == s.dtype and not autocast_on(x.device.type):
            return torch.addmm(base_out.reshape(tokens * n, p), z2, s2).view(base_out.shape)
        y = torch.mm(z2, s2).view(tokens, n * p)[:, :n_out]
        return base_out + y.to(base_out.dtype).view(base_out.shape)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down (n²r × in), up (out × n²r))`` with ``up @ down = ΔW`` (rows/columns cropped)."""
        n, r = self.n, self.rank
        a, s, t = self.rules.phm_rule, self.compacter_S, self.compacter_T
        eye = torch.eye(n, dtype=t.dtype, device=t.device)
        down = torch.einsum("bc,ijr->ibrcj", eye, t).reshape(n * n * r, -1)[:, : self.view.in_features]
        up = torch.einsum("iab,icr->acibr", a, s).reshape(n * self.p, n * n * r)[: self.view.out_features]
        return down, up

    def delta_weight(self) -> torch.Tensor:
        a, s, t = self.rules.phm_rule, self.compacter_S, self.compacter_T
        fast = torch.einsum("icr,ijr->icj", s, t)  # S_i T_iᵀ: n × p × q
        w = torch.einsum("iab,icj->acbj", a, fast).reshape(self.n * self.p, self.n * self.q)
        return self.view.to_param(w[: self.view.out_features, : self.view.in_features])
