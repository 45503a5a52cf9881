"""LoRA-LEGO (Zhao et al. 2025, "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to
Extremes Through Rank-Wise Clustering", ICLR 2025, arXiv:2409.16167).

A LoRA update is a sum of rank-1 *minimal semantic units* (MSUs)::

    ΔW_t = Σ_j b_{t,j} a_{t,j}ᵀ        (b = column j of B_t, a = row j of A_t)

which can be permuted and concatenated freely ("concatenation–summation equivalence"). LoRA-LEGO pools the
MSUs of all adapters of a module, clusters them into ``k`` groups by k-means on the concatenated vectors
``[b; a]``, and rebuilds a rank-``k`` LoRA from the cluster centroids::

    ΔW = Σ_c b̄_c ā_cᵀ,      b̄_c, ā_c = means of the b's and a's of cluster c

``k = rank`` (default: the largest input rank). Each adapter's weight (and scale) multiplies its ``b``'s
before clustering. With ``k ≥`` the number of units every unit is its own cluster and the result is the
task-arithmetic sum ``Σ w_t ΔW_t`` exactly. k-means: k-means++ seeding, then Lloyd iterations until the
assignment stops changing (at most ``iters``); an emptied cluster restarts at the unit farthest from
its centroid; random draws come from ``generator`` / ``seed``.

Reweighting (``reweight=``). The paper follows the clustering with a *dual reweighting*: a parameter
reweighting against the norm decay of averaged centroids and an output reweighting against variance
expansion. Its equations could not be retrieved here (only the abstract and summaries were reachable), so
the default stays the plain centroid LoRA (``reweight="none"``) and the paper's exact form is not claimed.
``reweight="norm"`` offers the parameter step as its summaries describe it — each centroid factor is
rescaled to the mean norm of its cluster's members, undoing the shrinkage of averaging non-parallel
vectors::

    b̂_c = b̄_c · mean_{i∈c} ‖b_i‖ / ‖b̄_c‖,      â_c = ā_c · mean_{i∈c} ‖a_i‖ / ‖ā_c‖

(a cluster of one unit, or of equal units, is unchanged; a zero centroid stays zero). It is a
reconstruction from the description, not a transcription of the paper's equation; the output reweighting
is not implemented.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .engine import Factors, LayerInputs

REWEIGHTS = ("none", "norm")


def _cpu_generator(generator):
    if generator is None or generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(generator.initial_seed())


def kmeans(x: torch.Tensor, k: int, generator=None, iters: int = 100) -> torch.Tensor:
    """Cluster labels (``N``) of the rows of ``x`` (``N × d``) into ``k ≤ N`` clusters (k-means++ + Lloyd)."""
    g = _cpu_generator(generator)
    xc = x.detach().cpu()
    n = xc.shape[0]
    first = int(torch.randint(n, (1,), generator=g))
    centers = [xc[first]]
    d2 = ((xc - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / n)
        nxt = int(torch.multinomial(p, 1, generator=g))
        centers.append(xc[nxt])
        d2 = torch.minimum(d2, ((xc - xc[nxt]) ** 2).sum(1))
    c = torch.stack(centers)
    labels = None
    for _ in range(iters):
        new = torch.cdist(xc, c).argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = labels == j
            if members.any():
                c[j] = xc[members].mean(0)
            else:  # restart an empty cluster at the unit farthest from its own centroid
                far = int(((xc - c[labels]) ** 2).sum(1).argmax())
                c[j] = xc[far]
                labels[far] = j
    return labels.to(x.device)


def units(inp: LayerInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """All MSUs of the module: ``b``'s (``out × N``, weights folded in) and ``a``'s (``N × in``)."""
    return (torch.cat([w * f.B for w, f in zip(inp.weights, inp.factors)], dim=1),
            torch.cat([f.A for f in inp.factors], dim=0))


def lora_lego(inp: LayerInputs, opts: dict, generator=None) -> Factors:
    b, a = units(inp)
    n = a.shape[0]
    k = opts.get("rank") or opts["max_rank"]
    if k >= n:
        return Factors(b, a)
    labels = kmeans(torch.cat([b.t(), a], dim=1), k, generator, opts["iters"])
    onehot = torch.nn.functional.one_hot(labels, k).to(a.dtype)           # N × k
    counts = onehot.sum(0).clamp(min=1)
    bc, ac = (b @ onehot) / counts, (onehot.t() @ a) / counts[:, None]
    if opts.get("reweight", "none") == "norm":
        bc = bc * _norm_ratio(b.norm(dim=0) @ onehot / counts, bc.norm(dim=0))[None, :]
        ac = ac * _norm_ratio(onehot.t() @ a.norm(dim=1) / counts, ac.norm(dim=1))[:, None]
    return Factors(bc, ac)


def _norm_ratio(mean_norm: torch.Tensor, centroid_norm: torch.Tensor) -> torch.Tensor:
    """``mean ‖member‖ / ‖centroid‖``, 1 where the centroid is zero (nothing to rescale)."""
    ok = centroid_norm > torch.finfo(centroid_norm.dtype).tiny
    return torch.where(ok, mean_norm / torch.where(ok, centroid_norm, 1.0), 1.0)


def check_options(method: str, opts: dict) -> None:
    if method == "lora_lego":
        it = opts.get("iters")
        if isinstance(it, bool) or not isinstance(it, int) or it < 1:
            raise ConfigError(f"iters={it!r}: give the most k-means iterations as an integer ≥ 1.")
        if opts.get("reweight") not in REWEIGHTS:
            raise ConfigError(f"reweight={opts.get('reweight')!r}: use one of {REWEIGHTS} ('none': plain centroids; "
                              "'norm': centroids rescaled to their members' mean norm).")


METHODS = {
    "lora_lego": (lora_lego, {"rank": None, "iters": 100, "reweight": "none"},
                  "LoRA-LEGO: k-means over the rank-1 units of all LoRAs, one averaged unit per cluster"),
}
