"""``analyze(base, adapted, batches)``: every measure of :mod:`rankwise.analysis` for every adapted layer.

Linear algebra is batched by shape: the thin SVDs of all ``W0`` of one shape are one call, and so
are those of ``W`` and of ``ΔW`` (``ΔW`` by default through the randomized path, which is exact to
the stated tolerance for low-rank updates and falls back to LAPACK otherwise; see
:mod:`rankwise.analysis.spectra`). Base decompositions can be cached across calls (``cache=``), so
analysing several fine-tunes of one base decomposes ``W0`` once.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.api import adapter_state, restore, set_active, snapshot
from ..errors import ConfigError
from . import spectra as S
from .representations import relative_weight_change, representation_measures
from .updates import (
    amplification_factor,
    check_intruder_args,
    intruder_dimensions,
    top_alignment,
    weight_pairs,
)


@dataclass
class Analysis:
    """Result of :func:`analyze`. ``layers``: one dict of measures per layer (see :data:`COLUMNS`);
    ``spectra``: singular values of ``W0``, ``W`` and ``ΔW`` per layer; ``similarity``:
    ``|U_Wᵀ U_W0|`` of the top singular vectors per layer (the intruder heatmap); ``bases``: top-``r``
    right singular vectors of ``ΔW`` per layer (for comparing two analyses); ``representations``:
    the data measures when batches were given; ``summary``: model-level numbers."""

    name: str
    layers: list[dict]
    spectra: dict[str, dict[str, torch.Tensor]]
    similarity: dict[str, torch.Tensor]
    bases: dict[str, torch.Tensor]
    summary: dict
    settings: dict
    representations: dict | None = None
    seconds: dict = field(default_factory=dict)
    intruder_cos: dict[str, torch.Tensor] = field(default_factory=dict)

    def intruders(self, eps: float | None = None, k: int | None = None) -> int:
        """Total intruder dimensions at another threshold ``eps`` (and top ``k`` ≤ the analysed k)."""
        eps = self.settings["eps"] if eps is None else eps
        k = self.settings["k"] if k is None else k
        check_intruder_args(k, eps)
        if k > self.settings["k"]:
            raise ConfigError(f"intruders: k={k} exceeds the k={self.settings['k']} this analysis kept; "
                              "analyze again with a larger k.")
        return int(sum(int((c[:k] < eps).sum()) for c in self.intruder_cos.values()))

    def row(self, layer: str) -> dict:
        for r in self.layers:
            if r["layer"] == layer:
                return r
        raise KeyError(layer)


COLUMNS = {
    "layer": "module name",
    "shape": "out x in",
    "rel_change": "‖ΔW‖_F / ‖W0‖_F",
    "dW_rank": "numerical rank of ΔW (σ > σ1·max(m,n)·ε32)",
    "dW_erank": "effective rank of ΔW",
    "dW_stable_rank": "stable rank of ΔW",
    "dW_rank90": "rank holding 90% of ΔW's energy",
    "W0_erank": "effective rank of W0",
    "W_erank": "effective rank of W",
    "W0_stable_rank": "stable rank of W0",
    "W_stable_rank": "stable rank of W",
    "W0_spectral": "σ1(W0)",
    "W_spectral": "σ1(W)",
    "intruders": "intruder dimensions among W's top k",
    "min_best_cos": "min over W's top k of max |cos| to W0's singular vectors",
    "amplification": "‖ΔW‖_F / ‖Uᵀ W0 V‖_F (U, V: ΔW's top r)",
    "alignment": "‖U0ᵀ ΔW V0‖_F / ‖ΔW‖_F (U0, V0: W0's top r)",
    "alignment_random": "alignment for random subspaces, r/√(mn)",
    "cka": "linear CKA of the layer's outputs, base vs adapted",
}


def _int(x, name, lo=1):
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise ConfigError(f"analyze: {name}={x!r} must be an int ≥ {lo}.")


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """The model with no adapter active (merged ones unmerged); restored afterwards."""
    snap = snapshot(model)
    set_active(model, None)
    try:
        yield model
    finally:
        restore(model, snap)


def analyze(base_model: nn.Module, adapted_model: nn.Module | None = None, batches=None, *,
            name: str = "adapted", layers: str | None = None, exclude=None, k: int = 10, eps: float = 0.5,
            r: int = 8, method: str = "auto", max_tokens: int = 1024, ntk_examples: int = 8, probes: int = 4,
            kernel: bool = True, sim_k: int = 20, seed: int = 0, embed_fn=None, cache: dict | None = None,
            progress: bool = False) -> Analysis:
    """Analyze what fine-tuning changed.

    ``base_model``: the pre-trained model; ``adapted_model``: the fine-tuned one (a full model or the
    base with adapters), or ``None`` when ``base_model`` itself carries the adapters (``W0`` is then
    the base weight, ``ΔW`` the adapters' weight view, and the base forward runs with adapters off).
    ``batches``: optional list of model inputs (dicts such as tokenizer output, ``labels`` optional)
    for the representation measures.

    ``k``, ``eps``: intruder dimensions among the top ``k`` at cosine threshold ``eps``; ``r``: the
    rank for the amplification factor, alignment and saved update bases; ``method``: SVD of ``ΔW``
    (``"auto"``, ``"full"`` or ``"randomized"``; ``W0`` and ``W`` always use the full SVD, which the
    intruder count needs). ``cache``: a dict reused across calls to keep ``W0``'s SVD.
    """
    check_intruder_args(k, eps)
    _int(r, "r")
    _int(sim_k, "sim_k")
    _int(max_tokens, "max_tokens")
    _int(ntk_examples, "ntk_examples", 2)
    if method not in S.METHODS:
        raise ConfigError(f"analyze: method={method!r}; choose one of {S.METHODS}.")
    t0 = time.perf_counter()
    toggle = adapted_model is None or adapted_model is base_model
    if toggle and not adapter_state(base_model):
        raise ConfigError(f"analyze: {type(base_model).__name__} carries no adapters and no fine-tuned model "
                          "was given; pass analyze(base, finetuned) or load adapters first.")
    with S.linalg_threads():  # LINALG_THREADS (default: torch's setting; 1 on oversubscribed cores)
        pairs = weight_pairs(base_model, None if toggle else adapted_model, layers=layers, exclude=exclude)
        t_pairs = time.perf_counter()
        rows, spec_out, sims, bases, best = _weight_measures(pairs, k, eps, r, method, sim_k, seed, cache,
                                                             _bar(len(pairs), progress, name))
    t_weights = time.perf_counter()

    reps = None
    if batches is not None:
        batches = list(batches)
        if toggle:
            run_base, run_adapted = (lambda: adapters_off(base_model)), (lambda: contextlib.nullcontext(base_model))
        else:
            run_base = lambda: contextlib.nullcontext(base_model)  # noqa: E731
            run_adapted = lambda: contextlib.nullcontext(adapted_model)  # noqa: E731
        reps = representation_measures(run_base, run_adapted, batches, list(pairs), max_tokens=max_tokens,
                                       ntk_examples=ntk_examples, probes=probes, seed=seed, embed_fn=embed_fn,
                                       kernel=kernel)
        for n, v in reps["cka"].items():
            rows[n]["cka"] = v
    t_reps = time.perf_counter()

    ordered = [rows[n] for n in pairs]
    summary = summarize(ordered, pairs, reps)
    return Analysis(
        name=name, layers=ordered, spectra=spec_out, similarity=sims, bases=bases, summary=summary,
        settings={"k": k, "eps": eps, "r": r, "method": method, "mode": "adapters" if toggle else "two models",
                  "skipped": dict(getattr(pairs, "skipped", {}))},  # layers without a weight view, and why
        representations=reps, intruder_cos=best,
        seconds={"pairs": t_pairs - t0, "weights": t_weights - t_pairs, "representations": t_reps - t_weights,
                 "total": t_reps - t0},
    )


def _weight_measures(pairs, k, eps, r, method, sim_k, seed, cache, bar):
    best_cos: dict[str, torch.Tensor] = {}
    rows: dict[str, dict] = {}
    spec_out: dict[str, dict] = {}
    sims: dict[str, torch.Tensor] = {}
    bases: dict[str, torch.Tensor] = {}
    groups = S.group_by_shape({n: w for n, (w, _) in pairs.items()})
    for shape, names in groups.items():
        w0s = {n: pairs[n][0] for n in names}
        dws = {n: pairs[n][1] for n in names}
        base_svd, base_spec = _base_svd(w0s, cache)
        w_svd, w_spec = S.svd({n: w0s[n] + dws[n] for n in names})
        d_svd, d_spec = S.svd(dws, method=method, q=max(32, 2 * r), seed=seed)
        u0 = torch.stack([base_svd[n][0] for n in names])
        vh0 = torch.stack([base_svd[n][2] for n in names])
        u = torch.stack([w_svd[n][0] for n in names])
        counts, best = intruder_dimensions(u0, u, k, eps)
        w0 = torch.stack([w0s[n] for n in names])
        dw = torch.stack([dws[n] for n in names])
        align = top_alignment(dw, u0, vh0, r)
        for i, n in enumerate(names):
            sd, s0, sw = d_spec[n], base_spec[n], w_spec[n]
            rank_d = int(S.numerical_rank(sd.s, shape=shape))
            ud, _, vhd = d_svd[n]
            rr = max(1, min(r, rank_d, ud.shape[-1]))
            fro_d = sd.fro2 ** 0.5
            amp = float(amplification_factor(w0[i], ud, vhd, fro_d, rr)) if rank_d > 0 else 0.0
            row = {
                "layer": n,
                "shape": f"{shape[0]}x{shape[1]}",
                "rel_change": fro_d / max(s0.fro2 ** 0.5, 1e-30),
                "dW_rank": rank_d,
                "dW_erank": float(S.effective_rank(sd.s)),
                "dW_stable_rank": float(S.stable_rank(sd.s, sd.fro2)),
                "dW_rank90": int(S.rank_at_energy(sd.s, 0.9, sd.fro2)),
                "W0_erank": float(S.effective_rank(s0.s)),
                "W_erank": float(S.effective_rank(sw.s)),
                "W0_stable_rank": float(S.stable_rank(s0.s, s0.fro2)),
                "W_stable_rank": float(S.stable_rank(sw.s, sw.fro2)),
                "W0_spectral": float(s0.s[0]),
                "W_spectral": float(sw.s[0]),
                "intruders": int(counts[i]),
                "min_best_cos": float(best[i].min()),
                "amplification": amp,
                "alignment": float(align[i]),
                "alignment_random": min(r, min(shape)) / (shape[0] * shape[1]) ** 0.5,
                "dW_exact": sd.exact,
                "dW_tail_energy": sd.tail / sd.fro2 if sd.fro2 > 0 else 0.0,
            }
            rows[n] = row
            spec_out[n] = {"W0": s0.s.detach().clone(), "W": sw.s.detach().clone(), "dW": sd.s.detach().clone()}
            kk = min(sim_k, u.shape[-1])
            sims[n] = (u[i, :, :kk].mT @ u0[i, :, :kk]).abs()
            bases[n] = vhd[: min(r, rank_d, vhd.shape[0])].mT.contiguous()
            best_cos[n] = best[i].detach().clone()
        bar.update(len(names))
    bar.close()
    return rows, spec_out, sims, bases, best_cos


def summarize(rows: list[dict], pairs, reps) -> dict:
    def mean(key):
        return statistics.fmean(r[key] for r in rows) if rows else float("nan")

    out = {
        "layers": len(rows),
        "relative weight change": relative_weight_change(pairs),
        "mean ‖ΔW‖/‖W0‖": mean("rel_change"),
        "median rank ΔW": statistics.median(r["dW_rank"] for r in rows),
        "mean eff. rank ΔW": mean("dW_erank"),
        "intruders (total)": sum(r["intruders"] for r in rows),
        "layers with intruders": sum(r["intruders"] > 0 for r in rows),
        "mean amplification": mean("amplification"),
        "mean alignment": mean("alignment"),
    }
    if reps:
        out["mean CKA"] = statistics.fmean(reps["cka"].values()) if reps["cka"] else float("nan")
        out["embedding CKA"] = reps["embedding_cka"]
        out["RankMe base"] = reps["rankme_base"]
        out["RankMe adapted"] = reps["rankme_adapted"]
        for key, label in (("ntk_alignment", "NTK alignment base/adapted"),
                           ("ntk_label_alignment_base", "NTK-label alignment base"),
                           ("ntk_label_alignment_adapted", "NTK-label alignment adapted")):
            if key in reps:
                out[label] = reps[key]
    return out


def _base_svd(w0s: dict, cache: dict | None):
    """Full SVD of the base weights, reusing ``cache`` entries whose weight is unchanged."""
    if cache is None:
        return S.svd(w0s)
    todo = {n: w for n, w in w0s.items() if n not in cache or not torch.equal(cache[n][0], w)}
    if todo:
        dec, spec = S.svd(todo)
        for n in todo:
            cache[n] = (todo[n].clone(), dec[n], spec[n])
    return {n: cache[n][1] for n in w0s}, {n: cache[n][2] for n in w0s}


def cross_similarity(analyses: dict[str, Analysis], r: int | None = None) -> dict[tuple[str, str], dict]:
    """For every pair of analyses: per shared layer, the LoRA-paper ``φ(ΔW_a, ΔW_b, r, r)`` of their
    top-``r`` right singular subspaces (1: the same input directions; random: about ``r/n``)."""
    from .updates import subspace_similarity

    names = list(analyses)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = [n for n in analyses[a].bases if n in analyses[b].bases]
            per = {}
            for n in shared:
                ba, bb = analyses[a].bases[n], analyses[b].bases[n]
                rr = min(ba.shape[1], bb.shape[1]) if r is None else min(r, ba.shape[1], bb.shape[1])
                if rr == 0:
                    continue
                per[n] = subspace_similarity(ba[:, :rr], bb[:, :rr], rr, rr)
            out[(a, b)] = per
    return out


def _bar(total: int, progress: bool, desc: str):
    if progress:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"analyze {desc}", unit="layer", leave=False)

    class _Null:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Null()
