"""What fine-tuning changed in each weight matrix: update measures between ``W0`` and ``W = W0 + ΔW``.

Weights are compared in their canonical ``(out, in)`` layout (see :class:`rankwise.core.layers.LayerView`).
``ΔW`` comes from the adapters' weight view (``delta_weight()``: exact, never a difference of two
large matrices) or from two full checkpoints (``W_finetuned - W0``).

* relative update ``‖ΔW‖_F / ‖W0‖_F``; rank, effective rank and stable rank of ``ΔW`` (see
  :mod:`rankwise.analysis.spectra`).
* intruder dimensions (Shuttleworth, Andreas, Torralba & Sharma, "LoRA vs Full Fine-tuning: An
  Illusion of Equivalence", 2024): with ``W0 = U0 S0 V0ᵀ`` and ``W = U S Vᵀ`` (thin SVDs), the
  ``j``-th left singular vector ``u_j`` of ``W`` is an intruder dimension when
  ``max_i |⟨u_j, u0_i⟩| < ε`` over *all* left singular vectors of ``W0``; they are counted among
  the top ``k`` (the paper: ``k = 10``, ``ε`` swept, 0.5 in many plots).
* principal angles between subspaces: ``cos θ_i = σ_i(Q1ᵀ Q2)`` for orthonormal bases ``Q1, Q2``;
  and the subspace similarity of the LoRA paper (Hu et al. 2021, §7.2),
  ``φ(A1, A2, i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j) ∈ [0, 1]``, where ``U`` holds the top
  right singular vectors of the adapter factor ``A`` (of ``ΔW`` in general: ``side="right"``).
* amplification factor (Hu et al. 2021, §7.3): with ``U, V`` the top-``r`` singular vectors of
  ``ΔW``, ``‖ΔW‖_F / ‖Uᵀ W0 V‖_F`` — how strongly ``ΔW`` amplifies directions ``W0`` barely uses;
  and the alignment of ``ΔW`` with ``W0``'s own top-``r`` directions,
  ``‖U0_rᵀ ΔW V0_r‖_F / ‖ΔW‖_F``, next to its value for random subspaces, ``r / √(m·n)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from ..core.adapted import AdaptedLayer, TrainedCopies
from ..core.layers import LayerView, kind_of
from ..errors import ConfigError, ShapeMismatchError, TargetError

DEFAULT_KINDS = ("linear", "hf_conv1d", "conv1d", "conv2d")


# ---- weights of a model -------------------------------------------------------------------------
def canonical(view: LayerView, t: torch.Tensor) -> torch.Tensor:
    """A tensor in the base parameter's layout → the canonical ``(out, in)`` matrix."""
    if view.kind in ("hf_conv1d", "embedding"):
        return t.t()
    if view.kind in ("conv1d", "conv2d"):
        return t.reshape(view.out_features, -1)
    return t


def layer_modules(model: nn.Module, kinds: Iterable[str] = DEFAULT_KINDS) -> dict[str, nn.Module]:
    """Analysable layers by name: adapted layers, trained copies (``modules_to_save``) and plain
    layers of ``kinds``; nothing inside an adapted layer or a trained copy is listed again."""
    kinds = tuple(kinds)
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(m, AdaptedLayer):
            out[name] = m
            inside.append(name + ".")
        elif isinstance(m, TrainedCopies):
            if kind_of(m.current()) in kinds:
                out[name] = m
            inside.append(name + ".")
        elif kind_of(m) in kinds:
            out[name] = m
    return out


def _plain(m: nn.Module) -> nn.Module:
    return m.current() if isinstance(m, TrainedCopies) else m


@torch.no_grad()
def base_weight(m: nn.Module) -> torch.Tensor:
    """``W0`` of a layer as ``(out, in)``: an adapted layer without any adapter (merged ones subtracted)."""
    if isinstance(m, AdaptedLayer):
        w = m.view.weight2d().detach().float()
        if m.merged:
            w = w - canonical(m.view, m.delta_weight(list(m.merged)).detach().float())
        return w
    if isinstance(m, TrainedCopies):
        return LayerView(m.original).weight2d().detach().float()
    return LayerView(m).weight2d().detach().float()


@torch.no_grad()
def adapter_delta(m: AdaptedLayer) -> torch.Tensor:
    """``ΔW`` of the active adapters of an adapted layer, ``(out, in)``, from their weight view."""
    if not m.active:
        return torch.zeros(m.view.shape)
    return canonical(m.view, m.delta_weight(list(m.active)).detach().float())


@torch.no_grad()
def effective_weight(m: nn.Module) -> torch.Tensor:
    """The weight a layer computes with now, ``(out, in)``: base plus active unmerged adapters."""
    if isinstance(m, AdaptedLayer):
        w = m.view.weight2d().detach().float()
        live = [n for n in m.active if n not in m.merged]
        return w + canonical(m.view, m.delta_weight(live).detach().float()) if live else w.clone()
    return LayerView(_plain(m)).weight2d().detach().float()


class WeightPairs(dict):
    """:func:`weight_pairs`' result: ``{layer: (W0, ΔW)}``, and in ``skipped`` the layers left out with the
    reason (``{layer: message}``): layers whose active adapter has no weight view because its update depends
    on the input (a ``mole`` mixture with ``router="token"`` / ``"topk"``: ``delta_weight()`` raises)."""

    def __init__(self, pairs=(), skipped: dict[str, str] | None = None):
        super().__init__(pairs)
        self.skipped = dict(skipped or {})


def _delta_or_skip(name: str, m: AdaptedLayer, skipped: dict[str, str]) -> torch.Tensor | None:
    """``adapter_delta(m)``, or ``None`` with the reason recorded in ``skipped`` when an active adapter's
    weight view is undefined (its ``delta_weight()`` raises ``ConfigError``: routing per input)."""
    try:
        return adapter_delta(m)
    except ConfigError as e:
        skipped[name] = f"skipped: {e}"
        return None


def _select(names, layers, exclude) -> list[str]:
    if layers is not None:
        try:
            rx = re.compile(layers)
        except re.error as e:
            raise ConfigError(f"layers={layers!r} is not a valid regular expression ({e}).") from None
        names = [n for n in names if rx.search(n)]
    ex = set(exclude or ())
    return [n for n in names if n not in ex and not any(n.startswith(e + ".") for e in ex)]


def weight_pairs(base: nn.Module, adapted: nn.Module | None = None, layers: str | None = None,
                 exclude: Iterable[str] | None = None, kinds: Iterable[str] = DEFAULT_KINDS,
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer name: (W0, ΔW)}``, float32, ``(out, in)`` (a :class:`WeightPairs`: layers whose active
    adapter's update depends on the input — ``mole`` with per-token routing — are left out and listed with
    the reason in ``.skipped``; when that leaves no layer, a ``TargetError`` says so).

    * ``adapted`` is ``None`` or ``base`` itself: ``base`` carries adapters; ``W0`` is each adapted
      layer's base weight and ``ΔW`` the active adapters' weight view.
    * two models: layers are matched by name — the adapted layers of ``adapted`` if it has any,
      else every layer of ``kinds``. ``ΔW`` is exact where ``adapted`` holds the same base weight.

    ``layers``: a regex that names must contain (``re.search``); ``exclude``: names (and their
    children) to leave out, e.g. a classification head that the base model lacks.
    """
    if adapted is None or adapted is base:
        mods = {n: m for n, m in layer_modules(base, kinds).items() if isinstance(m, AdaptedLayer)}
        if not mods:
            raise TargetError(f"{type(base).__name__} has no adapters; pass the fine-tuned model as the "
                              "second argument, or adapt/load adapters onto it first.")
        names = _select(list(mods), layers, exclude)
        skipped: dict[str, str] = {}
        pairs = {}
        for n in names:
            d = _delta_or_skip(n, mods[n], skipped)
            if d is not None:
                pairs[n] = (base_weight(mods[n]), d)
    else:
        amods = layer_modules(adapted, kinds)
        adapted_only = {n: m for n, m in amods.items() if isinstance(m, AdaptedLayer)}
        cand = adapted_only or amods
        bmods = dict(base.named_modules())
        names = _select(list(cand), layers, exclude)
        pairs, skipped = {}, {}
        for n in names:
            bm = bmods.get(n)
            if bm is None or kind_of(_plain(bm.base if isinstance(bm, AdaptedLayer) else bm)) is None:
                raise ShapeMismatchError(
                    f"module '{n}' of the fine-tuned {type(adapted).__name__} has no counterpart in the base "
                    f"{type(base).__name__}; pass the base model it was trained from, or exclude '{n}'.")
            w0 = effective_weight(bm)
            am = cand[n]
            if isinstance(am, AdaptedLayer):
                own0 = base_weight(am)
                if own0.shape != w0.shape:
                    raise ShapeMismatchError(f"module '{n}': base weight {tuple(w0.shape)}, adapted model's "
                                             f"{tuple(own0.shape)}; compare models of the same architecture.")
                d = _delta_or_skip(n, am, skipped)
                if d is None:
                    continue
                dw = d if torch.equal(own0, w0) else d + (own0 - w0)
            else:
                w = effective_weight(am)
                if w.shape != w0.shape:
                    raise ShapeMismatchError(f"module '{n}': base weight {tuple(w0.shape)}, fine-tuned "
                                             f"{tuple(w.shape)}; compare models of the same architecture.")
                dw = w - w0
            pairs[n] = (w0, dw)
    if not pairs:
        why = (f"; every selected layer was skipped: {next(iter(skipped.values()))}" if skipped else "")
        raise TargetError(f"no layers to analyze (layers={layers!r}, exclude={sorted(exclude or [])}){why}; "
                          "pass a layers pattern (regex) that matches some adapted or changed layers, or none "
                          "to analyze them all.")
    return WeightPairs(pairs, skipped)


# ---- intruder dimensions --------------------------------------------------------------------------
def check_intruder_args(k, eps) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"intruder dimensions: k={k!r} must be a positive int (top-k singular vectors).")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps <= 1:
        raise ConfigError(f"intruder dimensions: eps={eps!r} must be a cosine-similarity threshold in (0, 1].")


def intruder_dimensions(u0: torch.Tensor, u: torch.Tensor, k: int = 10, eps: float = 0.5):
    """Count intruder dimensions among the top ``k`` left singular vectors ``u`` of ``W`` against
    all left singular vectors ``u0`` of ``W0`` (columns; leading batch dims allowed).

    Returns ``(counts, best)`` where ``best[..., j] = max_i |⟨u_j, u0_i⟩|``.
    """
    check_intruder_args(k, eps)
    k = min(k, u.shape[-1])
    best = (u[..., :k].mT @ u0).abs().amax(-1)
    return (best < eps).sum(-1), best


def intruder_count(w0: torch.Tensor, w: torch.Tensor, k: int = 10, eps: float = 0.5) -> int:
    """Intruder dimensions of ``W`` relative to ``W0`` (two ``(out, in)`` matrices)."""
    if w0.shape != w.shape or w0.dim() != 2:
        raise ShapeMismatchError(f"intruder_count: W0 {tuple(w0.shape)} and W {tuple(w.shape)} must be "
                                 "matrices of one shape.")
    u0 = torch.linalg.svd(w0.detach().float(), full_matrices=False)[0]
    u = torch.linalg.svd(w.detach().float(), full_matrices=False)[0]
    return int(intruder_dimensions(u0, u, k, eps)[0])


# ---- subspaces --------------------------------------------------------------------------------------
def _basis(x: torch.Tensor, orthonormal: bool) -> torch.Tensor:
    if x.dim() != 2:
        raise ShapeMismatchError(f"subspace basis has shape {tuple(x.shape)}; pass a (d, r) matrix of columns.")
    return x if orthonormal else torch.linalg.qr(x.double())[0]


def principal_angles(x1: torch.Tensor, x2: torch.Tensor, orthonormal: bool = False) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of ``x1 (d, r1)`` and ``x2 (d, r2)``."""
    q1, q2 = _basis(x1, orthonormal), _basis(x2, orthonormal)
    if q1.shape[0] != q2.shape[0]:
        raise ShapeMismatchError(f"principal_angles: bases live in R^{q1.shape[0]} and R^{q2.shape[0]}; "
                                 "they must share the ambient dimension.")
    c = torch.linalg.svdvals(q1.double().mT @ q2.double()).clamp(-1.0, 1.0)
    return torch.arccos(c)


def subspace_similarity(u1: torch.Tensor, u2: torch.Tensor, i: int | None = None, j: int | None = None):
    """``φ(i, j) = ‖u1[:, :i]ᵀ u2[:, :j]‖_F² / min(i, j)`` for orthonormal columns ``u1, u2``
    (ordered by singular value). With ``i, j`` omitted: the whole ``(r1, r2)`` grid."""
    if u1.shape[0] != u2.shape[0]:
        raise ShapeMismatchError(f"subspace_similarity: bases live in R^{u1.shape[0]} and R^{u2.shape[0]}.")
    m2 = (u1.double().mT @ u2.double()) ** 2
    grid = m2.cumsum(0).cumsum(1)
    r1, r2 = grid.shape
    mins = torch.minimum(torch.arange(1, r1 + 1)[:, None], torch.arange(1, r2 + 1)[None, :]).double()
    grid = grid / mins
    if i is None and j is None:
        return grid
    i, j = i or r1, j or r2
    if not (1 <= i <= r1 and 1 <= j <= r2):
        raise ConfigError(f"subspace_similarity: i={i}, j={j} must be in 1..{r1} and 1..{r2}.")
    return float(grid[i - 1, j - 1])


def update_basis(dw: torch.Tensor, r: int, side: str = "right") -> torch.Tensor:
    """Top-``r`` singular vectors of ``ΔW (out, in)`` as columns: ``side="right"`` the input space
    (the row space of LoRA's ``A``), ``"left"`` the output space."""
    if side not in ("left", "right"):
        raise ConfigError(f"side={side!r}; choose 'left' (output space) or 'right' (input space).")
    u, _, vh = torch.linalg.svd(dw.detach().double(), full_matrices=False)
    return (u[:, :r] if side == "left" else vh[:r].mT).contiguous()


def adapter_similarity(dw1: torch.Tensor, dw2: torch.Tensor, r1: int | None = None, r2: int | None = None,
                       side: str = "right"):
    """LoRA-paper ``φ`` grid between two updates of one layer (e.g. rank 8 vs rank 64): top-``r1``
    singular vectors of ``dw1`` against top-``r2`` of ``dw2``; ``r`` defaults to the numerical rank."""
    from .spectra import numerical_rank

    def rank_of(d):
        s = torch.linalg.svdvals(d.detach().double())
        return max(1, int(numerical_rank(s, shape=tuple(d.shape))))

    r1 = r1 or rank_of(dw1)
    r2 = r2 or rank_of(dw2)
    return subspace_similarity(update_basis(dw1, r1, side), update_basis(dw2, r2, side))


# ---- alignment with W0 ----------------------------------------------------------------------------
def amplification_factor(w0: torch.Tensor, u: torch.Tensor, vh: torch.Tensor, dw_fro: torch.Tensor | float,
                         r: int) -> torch.Tensor:
    """``‖ΔW‖_F / ‖U_rᵀ W0 V_r‖_F`` with ``U, Vh`` the singular vectors of ``ΔW`` (batched)."""
    proj = u[..., :, :r].mT @ w0 @ vh[..., :r, :].mT
    den = torch.linalg.matrix_norm(proj.double())
    return torch.as_tensor(dw_fro, dtype=torch.float64) / den.clamp_min(torch.finfo(torch.float64).tiny)


def top_alignment(dw: torch.Tensor, u0: torch.Tensor, vh0: torch.Tensor, r: int) -> torch.Tensor:
    """``‖U0_rᵀ ΔW V0_r‖_F / ‖ΔW‖_F``: the share of ``ΔW`` inside ``W0``'s top-``r`` singular
    subspaces (batched); random subspaces give ``r / √(m·n)`` on average."""
    proj = u0[..., :, :r].mT @ dw @ vh0[..., :r, :].mT
    num = torch.linalg.matrix_norm(proj.double())
    den = torch.linalg.matrix_norm(dw.double())
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(den))
