"""The machinery every combination method shares: read the adapters layer by layer, build the result.

A combination method sees one adapted module at a time, through :class:`LayerInputs`: for every
input adapter that adapts the module, its update as factors in the canonical ``(out × in)``
layout (``core/layers.py``)::

    ΔW_t = B_t A_t,     B_t (out × r_t) with the adapter's scale folded in,  A_t (r_t × in)

LoRA adapters give their own factors (``B_t = s · lora_B``, ``A_t = lora_A``), so nothing
``out × in`` is formed for the methods that work in factor space (``cat``, ``svd``, Iso-C,
KnOTS …). Any other method is read through its weight view ``delta_weight()`` and factored
once by a thin SVD at its numerical rank (exact to float rounding), so adapters of different
methods combine. Methods that act element-wise on ``ΔW`` (TIES, DARE …) ask for the dense
update of one layer at a time (:meth:`LayerInputs.dense`), never for all layers at once.

A method returns :class:`Factors` ``(B, A)`` with ``ΔW = B A``. The result is a LoRA adapter
(method ``"lora"``) with ``alpha = rank``, i.e. scale ``s = 1``, holding ``lora_B = B`` and
``lora_A = A`` — so its ``delta_weight()`` is exactly the combination, and it saves, reloads
and exports to PEFT like any LoRA. Modules where the combination has a lower rank than the
adapter's are padded with zero rank-1 terms (``ΔW`` unchanged). A module whose size caps the
rank below the adapter's rank gets that rank as a per-module override (``rw.save`` / ``rw.load``
keep it; PEFT's format needs one rank, so such an adapter exports only once every module allows
the common rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.adapted import AdaptedLayer
from ..core.api import adapt, adapted_layers, adapter_state, exact_targets, trained_copies
from ..core.layers import LayerView
from ..core.registry import get_method
from ..errors import AdapterExistsError, AdapterNotFoundError, ConfigError, ShapeMismatchError, close_names
from ..linalg import compute_dtype


def check_inputs(model: nn.Module, adapters, name, caller: str, role: str, example: str) -> list[str]:
    """The checks ``rw.combine`` and ``rw.compose.mixture`` share, before anything changes: a model,
    a non-empty list of existing adapter names (``role``: what they are used as), and a free,
    valid ``name`` for the result. Returns the list of names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}() needs the nn.Module that holds the adapters; got {type(model).__name__}.")
    if isinstance(adapters, str) or not hasattr(adapters, "__iter__"):
        raise ConfigError(f"adapters={adapters!r}: give a list of adapter names, e.g. {example}.")
    adapters = list(adapters)
    state = adapter_state(model)
    if not adapters:
        raise ConfigError(f"{caller}() got an empty list of {role}s; name at least one adapter on the model "
                          f"(it has {sorted(state) or 'none'}).")
    for a in adapters:
        if a not in state:
            raise AdapterNotFoundError(f"model has no adapter '{a}' to use as {role}; it has "
                                       f"{sorted(state) or 'none'}." + close_names(str(a), state))
    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise ConfigError(f"name {name!r} of the result of {caller}() must be a non-empty string without '.' or '/'.")
    if name in state:
        raise AdapterExistsError(f"model already has an adapter named '{name}'; pick another name for the "
                                 f"result of {caller}(), or rw.delete(model, '{name}') first.")
    return adapters

REQUIRED = object()  # an option a method cannot do without (``density`` for TIES / DARE)


@dataclass
class Factors:
    """``ΔW = B @ A`` in the canonical layout: ``B (out × k)``, ``A (k × in)``."""

    B: torch.Tensor
    A: torch.Tensor

    @property
    def rank(self) -> int:
        return self.B.shape[1]


def to2d(view: LayerView, t: torch.Tensor) -> torch.Tensor:
    """A tensor in the base parameter's layout → the canonical ``(out, in)`` matrix (inverse of ``to_param``)."""
    if view.kind in ("hf_conv1d", "embedding"):
        return t.t()
    if view.kind in ("conv1d", "conv2d"):
        return t.reshape(view.out_features, -1)
    return t


def numerical_rank(s: torch.Tensor, shape) -> int:
    """Singular values above ``σ_max · max(m, n) · ε`` (``torch.linalg.matrix_rank``'s default tolerance)."""
    if s.numel() == 0:
        return 0
    tol = s.max() * max(shape) * torch.finfo(s.dtype).eps
    return int((s > tol).sum())


def svd_of_product(B: torch.Tensor, A: torch.Tensor):
    """Thin SVD ``U diag(S) Vh`` of ``B @ A`` without forming it: ``B = Q_b R_b``, ``Aᵀ = Q_a R_a``,
    ``B A = Q_b (R_b R_aᵀ) Q_aᵀ``, and the small core ``R_b R_aᵀ`` is decomposed instead.
    Exact (orthogonal transforms only); ``O((m + n) k²)`` for ``k`` = the inner dimension."""
    qb, rb = torch.linalg.qr(B, mode="reduced")
    qa, ra = torch.linalg.qr(A.t(), mode="reduced")
    uc, s, vch = torch.linalg.svd(rb @ ra.t(), full_matrices=False)
    return qb @ uc, s, vch @ qa.t()


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int | None, shape) -> Factors:
    """``B = U_k diag(S_k)``, ``A = Vh_k`` (PEFT's convention) for ``k = rank``, or the numerical
    rank when ``rank`` is ``None`` (exact)."""
    k = numerical_rank(s, shape) if rank is None else min(rank, s.numel())
    return Factors(u[:, :k] * s[:k], vh[:k])


def refactor(B: torch.Tensor, A: torch.Tensor, rank: int | None, shape) -> Factors:
    """``B @ A`` at ``rank`` (truncated SVD, Eckart–Young optimal) or exactly (``rank=None``)."""
    return truncate(*svd_of_product(B, A), rank, shape)


def from_dense(d: torch.Tensor, rank: int | None) -> Factors:
    """A dense ``(out, in)`` update as factors: truncated at ``rank``, or exact at its numerical rank."""
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return truncate(u, s, vh, rank, d.shape)


@dataclass
class LayerInputs:
    """What a method sees of one module: the input adapters that adapt it, their weights and factors."""

    name: str
    view: LayerView
    names: list[str]          # input adapters present here, in the order given
    weights: list[float]      # their weights
    factors: list[Factors]    # their updates, canonical layout, in ``dtype``
    dtype: torch.dtype        # compute dtype: float32 (float64 for float64 weights)
    raw: list[tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=list, repr=False)
    # per adapter ``(B, A, s)`` with ``ΔW = s·B A`` as the adapter stores it (LoRA: lora_B, lora_A, its
    # scale; other methods: the SVD factors and 1) — PEFT's factor-wise variants act on these

    @property
    def shape(self) -> tuple[int, int]:
        return self.view.shape

    def dense(self, i: int) -> torch.Tensor:
        """``ΔW_i`` in the base parameter's own layout (as PEFT's ``get_delta_weight``), contiguous, so
        element-wise random draws follow PEFT's order. Formed on demand for this layer only."""
        f = self.factors[i]
        return self.view.to_param(f.B @ f.A).contiguous()

    def to2d(self, t: torch.Tensor) -> torch.Tensor:
        return to2d(self.view, t)


def _adapter_factors(layer: AdaptedLayer, adapter: str, dtype: torch.dtype) -> tuple[Factors, tuple]:
    """``(B, A)`` of one adapter on one layer (LoRA's own factors, else a thin SVD of its weight view),
    and the raw ``(B, A, s)``."""
    ad = layer.adapters[adapter]
    view = layer.view
    if type(ad) is get_method("lora"):
        a, b = ad.lora_A.detach(), ad.lora_B.detach()
        if a.shape[1] != view.in_features or b.shape[0] != view.out_features:
            raise ShapeMismatchError(
                f"module '{view.name}': adapter '{adapter}' has factors A {tuple(a.shape)}, B {tuple(b.shape)}, "
                f"which do not fit the base weight {view.out_features}x{view.in_features}. It was made for "
                "another model; combine adapters of one base model.")
        b, a = b.to(dtype), a.to(dtype)
        return Factors(b * ad.scale, a), (b, a, float(ad.scale))
    d = layer._delta(adapter).detach()
    if tuple(d.shape) != tuple(layer.base.weight.shape):
        raise ShapeMismatchError(
            f"module '{view.name}': adapter '{adapter}' (method {ad.config.method}) has an update of shape "
            f"{tuple(d.shape)}, but the base weight is {tuple(layer.base.weight.shape)}. Combine adapters of "
            "one base model.")
    f = from_dense(to2d(view, d.to(dtype)), None)
    return f, (f.B, f.A, 1.0)


def layer_inputs(model: nn.Module, adapters: list[str], weights: list[float]):
    """Yield :class:`LayerInputs` for every module any of ``adapters`` adapts, in module order (PEFT's)."""
    for lname, layer in adapted_layers(model):
        present = [i for i, a in enumerate(adapters) if a in layer.adapters]
        if not present:
            continue
        dtype = compute_dtype(layer.base.weight) if layer.base.weight.is_floating_point() else torch.float32
        got = [_adapter_factors(layer, adapters[i], dtype) for i in present]
        yield LayerInputs(lname, layer.view, [adapters[i] for i in present], [float(weights[i]) for i in present],
                          [f for f, _ in got], dtype, raw=[r for _, r in got])


# ---- the result ---------------------------------------------------------------------------------
def head_states(model: nn.Module, adapters: list[str], weights: list[float]) -> dict[str, dict[str, torch.Tensor]]:
    """``modules_to_save`` of the inputs, combined by task arithmetic:
    ``θ = θ_orig + Σ_t w_t (θ_t − θ_orig)`` over the adapters that train a copy of the module
    (so weights ``(1, 0)`` give the first adapter's copy)."""
    out = {}
    for mname, tc in trained_copies(model):
        have = [(a, w) for a, w in zip(adapters, weights) if a in tc.copies]
        if not have:
            continue
        orig = tc.original.state_dict()
        new = {}
        for k, t0 in orig.items():
            if not t0.is_floating_point():
                new[k] = tc.copies[have[0][0]].state_dict()[k].clone()
                continue
            acc = t0.detach().to(compute_dtype(t0)).clone()
            for a, w in have:
                acc += w * (tc.copies[a].state_dict()[k].detach().to(acc.dtype) - t0.to(acc.dtype))
            new[k] = acc
        out[mname] = new
    return out


def build_lora(model: nn.Module, name: str, results: dict[str, Factors], heads: dict | None = None,
               record: dict | None = None) -> nn.Module:
    """Add LoRA adapter ``name`` holding ``results`` (module → factors, canonical layout) and the combined
    ``heads``; ``ΔW`` of every module equals ``B @ A`` exactly (scale 1, zero padding)."""
    from ..core.api import adapter_state
    from ..methods.lora import LoraConfig

    layers = dict(adapted_layers(model))
    caps = {m: min(layers[m].view.shape) for m in results}
    # more rank-1 terms than the module's size allows (cat of many adapters on a small layer): exact re-factor
    results = {m: refactor(f.B, f.A, None, layers[m].view.shape) if f.rank > caps[m] else f
               for m, f in results.items()}
    rank = max(1, max((f.rank for f in results.values()), default=1))
    overrides = {m: {"rank": caps[m]} for m in results if caps[m] < rank}
    cfg = LoraConfig(rank=rank, targets=exact_targets(list(results)), modules_to_save=sorted(heads or {}))
    # LoRA's random init is overwritten below; a private generator leaves the caller's RNG untouched
    adapt(model, cfg, name=name, generator=torch.Generator().manual_seed(0), module_overrides=overrides or None)
    layers = dict(adapted_layers(model))
    with torch.no_grad():
        for m, f in results.items():
            ad = layers[m].adapters[name]
            r = ad.lora_A.shape[0]
            ad.lora_A.zero_()
            ad.lora_B.zero_()
            k = min(r, f.rank)  # f.rank ≤ the module's cap ≤ r, so nothing is cut
            ad.lora_A[:k].copy_(f.A[:k].to(ad.lora_A))
            ad.lora_B[:, :k].copy_(f.B[:, :k].to(ad.lora_B))
        for mname, state in (heads or {}).items():
            copy = model.get_submodule(mname).copies[name]
            own = copy.state_dict(keep_vars=True)
            for k, t in state.items():
                own[k].copy_(t.to(own[k]))
    if record is not None:
        adapter_state(model)[name]["combine"] = record
    return model
