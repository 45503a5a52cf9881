"""TIES, DARE and magnitude pruning: element-wise merges of task updates.

Kernels (on a list of same-shaped task tensors ``τ_t`` with weights ``w_t``):

* **trim** (magnitude pruning): keep the ``k = ⌊density · numel⌋`` entries of largest ``|τ_t|``, zero the rest.
* **drop** (DARE, Yu et al. 2024, "Language Models are Super Mario", arXiv:2311.03099): keep each entry
  with probability ``density`` (a Bernoulli mask), rescale the kept ones by ``1 / density``.
* **elect** (TIES): ``γ = sign(Σ_t τ̂_t)`` ("total", the mass of each sign; ``0`` counts as ``+``) or
  ``sign(Σ_t sign τ̂_t)`` ("frequency").
* **disjoint merge** (TIES): ``τ_m = Σ_{t∈A} w_t τ̂_t / |A|`` with ``A = {t : sign τ̂_t = γ}`` (entries pruned
  to zero are in no ``A``; ``|A| = 0`` gives 0).

TIES-Merging (Yadav et al. 2023, arXiv:2306.01708) is trim → elect → disjoint merge. The paper scales the
merged vector by one ``λ``; here each task's weight ``w_t`` multiplies its trimmed update before the disjoint
mean (the sign is elected on the unweighted updates), as PEFT's ``add_weighted_adapter`` does — with equal
weights ``w_t = λ`` this is the paper's ``λ · τ_m``. DARE-linear is drop → ``Σ w_t τ̂_t``; DARE-TIES is drop →
elect → disjoint merge; magnitude_prune is trim → ``Σ w_t τ̂_t``. ``density = 1`` skips trimming / dropping
(no random numbers are drawn).

Methods (``rw.combine(..., method=...)``):

* ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` — the paper's merge of the dense updates
  ``ΔW_t`` of each module, then factored exactly (thin SVD at its numerical rank; ``rank=`` truncates).
  The result of trimming is in general of full rank ``min(out, in)``: for a compact adapter use the
  ``_svd`` forms.
* ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd`` — the same merge, truncated
  to ``rank`` (default: the largest input rank, PEFT's ``svd_rank`` default) — PEFT's combination types of
  these names. Random draws use ``torch``'s global generator unless ``generator=`` / ``seed=`` is given,
  one ``bernoulli`` per present adapter per module, in module order on ``ΔW`` in the weight's own layout:
  with ``torch.manual_seed(s)`` before each, PEFT and rankwise draw the same masks.
* ``peft_ties``, ``peft_dare_linear``, ``peft_dare_ties``, ``peft_magnitude_prune`` (and ``peft_linear``
  in ``linear.py``) — PEFT's non-svd variants, which merge the factors ``A_t`` and ``B_t`` separately with
  weights ``√|w_t s_t|`` (the sign on ``A``), not the update; the product of merged factors is not the merge
  of the products. Offered for compatibility with adapters combined by PEFT; all inputs need one rank.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .engine import REQUIRED, Factors, LayerInputs, from_dense

KERNELS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``⌊density · numel⌋`` largest-magnitude entries of ``t``."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def drop(t: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by ``1 / density``."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def elect(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Boolean mask ``sign(τ̂_t) == γ`` of the entries that agree with the elected sign."""
    signs = stacked.sign()
    mass = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    gamma = torch.where(mass >= 0, 1.0, -1.0).to(stacked.dtype)
    return signs == gamma


def merge_tensors(tensors: list[torch.Tensor], weights, how: str, density: float = 1.0,
                  sign_method: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """Merge same-shaped task tensors by kernel ``how`` (one of :data:`KERNELS`); see the module docstring."""
    if how in ("ties", "magnitude_prune"):
        tensors = [trim(t, density) for t in tensors]
    elif how in ("dare_linear", "dare_ties"):
        tensors = [drop(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    w = torch.as_tensor(list(weights), dtype=stacked.dtype, device=stacked.device).reshape(-1, *[1] * (stacked.dim() - 1))
    if how in ("ties", "dare_ties"):
        agree = elect(stacked, sign_method)
        return (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1).to(stacked.dtype)
    return (stacked * w).sum(0)


# ---- methods ------------------------------------------------------------------------------------
def dense_merge(how: str, default_rank: str | None):
    """A method merging the dense ``ΔW_t`` of each module by ``how``, factored at ``rank``."""

    def method(inp: LayerInputs, opts: dict, generator=None) -> Factors:
        merged = merge_tensors([inp.dense(i) for i in range(len(inp.factors))], inp.weights, how,
                               opts.get("density", 1.0), opts.get("majority_sign_method", "total"), generator)
        rank = opts.get("rank")
        if rank is None and default_rank == "max":
            rank = opts["max_rank"]
        return from_dense(inp.to2d(merged), rank)

    return method


def factorwise_merge(how: str):
    """PEFT's non-svd combination: merge the ``A_t`` and the ``B_t`` separately (see module docstring)."""

    def method(inp: LayerInputs, opts: dict, generator=None) -> Factors:
        ranks = {a.shape[0] for _, a, _ in inp.raw}
        if len(ranks) != 1:
            raise ConfigError(
                f"method 'peft_{how}' merges the factors A and B entry by entry, so every adapter needs the same "
                f"rank; module '{inp.name}' has ranks {[a.shape[0] for _, a, _ in inp.raw]} "
                f"(adapters {inp.names}). Use '{how}' or '{how}_svd', which merge the updates ΔW.")
        ws = [w * s for w, (_, _, s) in zip(inp.weights, inp.raw)]
        wa = [math.sqrt(abs(w)) * (1 if w >= 0 else -1) for w in ws]
        wb = [math.sqrt(abs(w)) for w in ws]
        density, sign = opts.get("density", 1.0), opts.get("majority_sign_method", "total")
        a = merge_tensors([a for _, a, _ in inp.raw], wa, how, density, sign, generator)
        b = merge_tensors([b for b, _, _ in inp.raw], wb, how, density, sign, generator)
        return Factors(b, a)

    return method


DENSITY = {"density": REQUIRED, "rank": None}
SIGNED = {"density": REQUIRED, "rank": None, "majority_sign_method": "total"}

METHODS = {
    "ties": (dense_merge("ties", None), SIGNED, "TIES on ΔW (trim, elect sign, disjoint mean), exact factors"),
    "dare_linear": (dense_merge("dare_linear", None), DENSITY, "DARE drop-and-rescale on ΔW, weighted sum"),
    "dare_ties": (dense_merge("dare_ties", None), SIGNED, "DARE drop-and-rescale on ΔW, then TIES sign election"),
    "magnitude_prune": (dense_merge("magnitude_prune", None), DENSITY, "top-k magnitude pruning of ΔW, weighted sum"),
    "ties_svd": (dense_merge("ties", "max"), SIGNED, "TIES on ΔW, truncated SVD at rank (PEFT's ties_svd)"),
    "dare_linear_svd": (dense_merge("dare_linear", "max"), DENSITY, "DARE-linear on ΔW, truncated SVD (PEFT)"),
    "dare_ties_svd": (dense_merge("dare_ties", "max"), SIGNED, "DARE-TIES on ΔW, truncated SVD (PEFT)"),
    "magnitude_prune_svd": (dense_merge("magnitude_prune", "max"), DENSITY,
                            "magnitude pruning on ΔW, truncated SVD (PEFT)"),
    "peft_ties": (factorwise_merge("ties"), {"density": REQUIRED, "majority_sign_method": "total"},
                  "PEFT's 'ties': TIES on the factors A and B separately"),
    "peft_dare_linear": (factorwise_merge("dare_linear"), {"density": REQUIRED}, "PEFT's 'dare_linear' on the factors"),
    "peft_dare_ties": (factorwise_merge("dare_ties"), {"density": REQUIRED, "majority_sign_method": "total"},
                       "PEFT's 'dare_ties' on the factors"),
    "peft_magnitude_prune": (factorwise_merge("magnitude_prune"), {"density": REQUIRED},
                             "PEFT's 'magnitude_prune' on the factors"),
}
