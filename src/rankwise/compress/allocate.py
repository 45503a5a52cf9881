"""Per-layer rank: uniform parameter ratio, bytes stored, energy threshold, user table, and the
non-uniform allocations (SVD-LLM-V2-style truncation loss, WeLore, ASVD sensitivity).

Conventions: ``ratio`` is the fraction of a layer's parameters **kept** (``0.6`` = 40 % compression;
the papers' "compression ratio 20 %" is ``ratio=0.8``). A factored layer of rank ``r`` stores
``r (m + n)`` numbers (+ ``r²`` with a CUR core) against ``m n`` dense, so the uniform rank for ratio
``p`` is the largest ``r`` with ``cost(r) ≤ p m n`` (at least 1).

Non-uniform allocations keep the same total budget ``Σ cost(r_i) ≤ p Σ m_i n_i``:

* ``"heterogeneous"`` (SVD-LLM V2, Wang et al. NAACL 2025, arXiv:2503.12340, §3.1): layers are grouped
  by type (the last part of the module name and the shape: every ``q_proj`` together) and each group's
  budget is spread by the *theoretical truncation loss* — the discarded ``σ_i²`` of the method's own
  spectrum, which for ``svd_llm`` is exactly the output loss. rankwise allocates it by the exact greedy
  optimum of ``min Σ_layers Σ_{i>r} σ_i²`` subject to the group budget (components ranked by
  ``σ_i² / cost per rank``; optimal because each layer's gains decrease). The paper instead scales
  uniform ratios by normalized log-losses; this is a deviation toward the loss it states.
* ``"welore"`` (Jaiswal et al. 2024, "From GaLore to WeLore", arXiv:2407.11239): layers whose singular
  values decay fast (the ones with low-rank gradients during training) are reduced more. One global
  threshold ``τ`` on the normalized singular values ``σ_i / σ_1`` — each layer keeps ``σ_i ≥ τ σ_1`` —
  set by bisection so the kept parameters meet the budget. Layers reduced by more than half are the
  paper's low-rank components (``lrc`` in the report).
* ``"sensitivity"`` (ASVD §3.3): for each layer and kept ratio in ``(0.1, …, 0.9)`` the calibration loss
  with only that layer truncated; then a bisection on a loss threshold: each layer takes the smallest
  ratio whose loss stays under it, and the threshold is lowered until the budget is met.
"""

from __future__ import annotations

import heapq
import math
import re

from ..errors import ConfigError


def cost(m: int, n: int, rank: int, core: bool = False) -> int:
    """Numbers stored by a rank-``rank`` factorization of an ``m × n`` matrix."""
    return rank * (m + n) + (rank * rank if core else 0)


def rank_for_ratio(m: int, n: int, ratio: float, core: bool = False) -> int:
    """Largest rank whose factors keep at most ``ratio`` of the ``m n`` numbers (≥ 1, ≤ min(m, n))."""
    budget = ratio * m * n
    if core:
        r = int((-(m + n) + math.sqrt((m + n) ** 2 + 4 * budget)) / 2)
    else:
        r = int(budget // (m + n))
    return max(1, min(r, min(m, n)))


def rank_for_energy(spectrum, energy: float) -> int:
    """Smallest ``r`` with ``Σ_{i≤r} σ_i² ≥ energy · Σ σ_i²``."""
    e = spectrum.double() ** 2
    total = float(e.sum())
    if total <= 0:
        return 1
    cum = (e.cumsum(0) / total).tolist()
    for i, c in enumerate(cum):
        if c >= energy - 1e-12:
            return i + 1
    return len(cum)


def check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ConfigError(f"compress: ratio={ratio!r} must be in (0, 1]: the fraction of each compressed layer's "
                          "parameters kept (0.6 keeps 60 %, i.e. 40 % compression).")
    return float(ratio)


def table_rank(table: dict, name: str):
    """The entry of a user rank table for module ``name``: an exact name, a name suffix or a regex."""
    if name in table:
        return table[name]
    for key, r in table.items():
        if name.endswith("." + key):
            return r
    for key, r in table.items():
        try:
            if re.fullmatch(key, name):
                return r
        except re.error:
            continue
    return None


def heterogeneous(layers: dict, ratio: float, core: bool = False) -> dict[str, int]:
    """SVD-LLM-V2-style ranks: ``layers`` maps name → ``(m, n, spectrum)``; see the module docstring."""
    groups: dict[tuple, list[str]] = {}
    for name, (m, n, _) in layers.items():
        groups.setdefault((name.rsplit(".", 1)[-1], m, n), []).append(name)
    out = {}
    for (_, m, n), names in groups.items():
        budget = ratio * m * n * len(names)
        out.update(_greedy({k: layers[k] for k in names}, budget, core))
    return out


def _greedy(layers: dict, budget: float, core: bool) -> dict[str, int]:
    ranks = {k: 1 for k in layers}
    spent = sum(cost(m, n, 1, core) for m, n, _ in layers.values())
    energy = {k: (s.double() ** 2).tolist() for k, (_, _, s) in layers.items()}
    heap = []
    for k, (m, n, _) in layers.items():
        if len(energy[k]) > 1:
            heapq.heappush(heap, (-energy[k][1] / (m + n), k))
    while heap:
        _, k = heapq.heappop(heap)
        m, n, _ = layers[k]
        step = cost(m, n, ranks[k] + 1, core) - cost(m, n, ranks[k], core)
        if spent + step > budget:
            continue
        spent += step
        ranks[k] += 1
        nxt = ranks[k]
        if nxt < min(len(energy[k]), m, n):
            heapq.heappush(heap, (-energy[k][nxt] / (m + n), k))
    return ranks


def welore(layers: dict, ratio: float, core: bool = False, iters: int = 60) -> dict[str, int]:
    """WeLore's ranks: one threshold ``τ`` on ``σ_i / σ_1`` for all layers, bisected to meet the budget."""
    budget = ratio * sum(m * n for m, n, _ in layers.values())
    norm = {k: (s.double() / max(float(s[0]), 1e-300)) for k, (_, _, s) in layers.items()}

    def ranks_at(tau: float) -> dict[str, int]:
        return {k: max(1, min(int((norm[k] >= tau).sum()), m, n)) for k, (m, n, _) in layers.items()}

    def spent(rs) -> float:
        return sum(cost(m, n, rs[k], core) for k, (m, n, _) in layers.items())

    lo, hi = 0.0, 1.0 + 1e-9  # τ = hi keeps rank 1 everywhere
    if spent(ranks_at(lo)) <= budget:
        return ranks_at(lo)
    for _ in range(iters):
        mid = (lo + hi) / 2
        if spent(ranks_at(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    return ranks_at(hi)


SENSITIVITY_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def sensitivity(losses: dict[str, dict[float, float]], shapes: dict[str, tuple[int, int]], ratio: float,
                core: bool = False, iters: int = 40) -> dict[str, int]:
    """ASVD's allocation from a sensitivity table ``losses[name][kept ratio] = calibration loss``."""
    budget = ratio * sum(m * n for m, n in shapes.values())

    def ranks_at(tau: float) -> dict[str, int]:
        out = {}
        for k, table in losses.items():
            ok = [p for p in sorted(table) if table[p] <= tau]
            p = ok[0] if ok else 1.0
            m, n = shapes[k]
            out[k] = min(m, n) if p >= 1.0 else rank_for_ratio(m, n, p, core)
        return out

    def spent(rs) -> float:
        return sum(min(cost(*shapes[k], rs[k], core), shapes[k][0] * shapes[k][1]) for k in rs)

    values = sorted({v for t in losses.values() for v in t.values()})
    lo, hi = -math.inf, math.inf
    # τ = +inf: every layer at the smallest ratio; τ below every loss: nothing truncated
    if spent(ranks_at(values[-1])) > budget:
        return ranks_at(values[-1])
    lo, hi = values[0] - 1.0, values[-1]
    for _ in range(iters):
        mid = (lo + hi) / 2
        if spent(ranks_at(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    return ranks_at(hi)
