"""``compress(model, method, ...)``: validate, collect calibration statistics, factor, allocate ranks,
then swap the new layers in — all in that order, so an error leaves the model unchanged.

Flow for the factoring methods (``svd``, ``asvd``, ``svd_llm``, ``fwsvd``, ``cur``, ``welore``)::

    targets  = every nn.Linear / HF Conv1D that ``targets`` selects (default: all but the output head)
    stats    = Calibration engine (core/calibrate.py): streamed E[x xᵀ] per layer (asvd, svd_llm, eora,
               cur's selection) or per-batch gradients (fwsvd's Fisher, sensitivity search)
    decomp   = one SVD of the method's transformed weight per layer (compress/svd.py)
    ranks    = rank rule (compress/allocate.py): rank | ratio | target_bytes | energy | ranks table,
               spread uniformly or by allocation="heterogeneous" | "welore" | "sensitivity"
    layers   = FactoredLinear(up, down[, core]) per layer (compress/factored.py); a layer whose factors
               would not be smaller than the dense weight stays dense (unless its rank was given)

``eora`` / ``lorc`` quantize (or prune) the weights in place and add the compensation as a LoRA adapter
(compress/quantized.py); ``extract`` and ``compeft`` make or shrink adapters (compress/adapters.py).

The report (:class:`CompressionReport`) has one row per layer — rank, parameters and bytes before and
after, kept energy of the truncated spectrum, relative weight error ``‖W − Ŵ‖_F / ‖W‖_F`` and, with
calibration, the relative output error ``√(tr(E C Eᵀ) / tr(W C Wᵀ))`` on the calibration inputs
(``E = W − Ŵ``, ``C = E[x xᵀ]``) — and the model's totals.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.api import adapted_layers, resolve_targets
from ..core.calibrate import Batches, collect
from ..core.layers import LayerView, kind_of
from ..errors import CalibrationError, ConfigError, TargetError, close_names
from . import allocate
from .factored import FactoredLinear, check_rank, factored_layers, set_module

RECORD = "rankwise_compress"  # model.__dict__ entry: what compress did (save/load read it)

FACTOR_METHODS = ("svd", "asvd", "svd_llm", "fwsvd", "cur", "welore")
QUANT_METHODS = ("eora", "lorc")
METHODS = FACTOR_METHODS + QUANT_METHODS + ("extract", "compeft")
ALLOCATIONS = ("uniform", "heterogeneous", "welore", "sensitivity")
#: method → its options and their defaults
OPTIONS = {
    "svd": {},
    "asvd": {"alpha": 0.5},
    "svd_llm": {"jitter": 1e-8},
    "fwsvd": {},
    "cur": {"select": "deim"},
    "welore": {},
    "eora": {"quant": "int4", "block_size": 64, "prune": None, "adapter_name": "eora", "jitter": 1e-8},
    "lorc": {"quant": "int4", "block_size": 64, "prune": None, "adapter_name": "lorc"},
    "extract": {"finetuned": None, "adapter_name": "extracted"},
    "compeft": {"adapter": None, "density": 0.1, "alpha": 1.0},
}
NEEDS_ACTIVATIONS = ("asvd", "svd_llm", "eora")


@dataclass
class CompressionReport:
    """What :func:`compress` did: ``layers`` (one dict per layer) and the model's totals."""

    method: str
    layers: list[dict] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    adapter: str | None = None
    notes: list[str] = field(default_factory=list)

    COLUMNS = ("module", "shape", "rank", "params before", "params after", "kept energy", "weight error",
               "output error")

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def ratio(self) -> float:
        """Parameters after / before over the whole model."""
        return self.params_after / max(1, self.params_before)

    def table(self, markdown: bool = False) -> str:
        from ..utils.table import format_table

        cols = [c for c in self.COLUMNS if any(c in row for row in self.layers)]
        rows = [[_fmt(row.get(c, "-")) for c in cols] for row in self.layers]
        return format_table(rows, cols, markdown=markdown)

    def summary(self) -> dict:
        return {"method": self.method, "layers": len(self.layers), "params before": self.params_before,
                "params after": self.params_after, "param ratio": round(self.ratio, 4),
                "bytes before": self.bytes_before, "bytes after": self.bytes_after,
                "bytes ratio": round(self.bytes_after / max(1, self.bytes_before), 4),
                "seconds": round(self.seconds, 2)}

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "summary": self.summary()}


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, (tuple, list)):
        return "x".join(str(x) for x in v)
    return v


# ---- model sizes ------------------------------------------------------------------------------------
def _unique_tensors(model: nn.Module):
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.data_ptr()) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        yield t


def parameter_total(model: nn.Module) -> int:
    return sum(t.numel() for t in {id(p): p for p in model.parameters()}.values())


def model_bytes(model: nn.Module) -> int:
    """Bytes the model stores (parameters and buffers, shared tensors once; quantized layers packed)."""
    record = model.__dict__.get(RECORD, {})
    total = sum(t.numel() * t.element_size() for t in _unique_tensors(model))
    for name, info in record.get("layers", {}).items():
        if info.get("type") in ("quantized", "pruned"):
            w = _base_weight(model, name)
            total += info["bytes"] - w.numel() * w.element_size()
    return total


def _base_weight(model: nn.Module, name: str) -> torch.Tensor:
    from ..core.adapted import AdaptedLayer

    m = model.get_submodule(name)
    return (m.base if isinstance(m, AdaptedLayer) else m).weight


# ---- validation -------------------------------------------------------------------------------------
def _check_options(method: str, options: dict) -> dict:
    if method not in METHODS:
        raise ConfigError(f"compress: unknown method {method!r}; use one of {', '.join(METHODS)}."
                          + close_names(str(method), METHODS))
    valid = OPTIONS[method]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"compress: method '{method}' got unknown options {unknown}; its options: "
                          f"{sorted(valid) or 'none'} (plus ratio, rank, energy, target_bytes, ranks, allocation, "
                          "targets, exclude, calibration, loss_fn, progress)." + close_names(unknown[0], valid))
    return {**valid, **options}


def _check_rule(ratio, rank, energy, target_bytes, ranks, allocation) -> None:
    given = [k for k, v in (("ratio", ratio), ("rank", rank), ("energy", energy), ("target_bytes", target_bytes))
             if v is not None]
    if len(given) > 1:
        raise ConfigError(f"compress: give one rank rule, not {' and '.join(given)} (a ranks table may come with one "
                          "of them as the default).")
    if not given and ranks is None:
        raise ConfigError("compress: say how much to keep: ratio=<fraction of parameters kept, in (0, 1]>, rank=<int>, "
                          "target_bytes=<int>, energy=<fraction of spectral energy> or ranks={module: rank}.")
    if ratio is not None:
        allocate.check_ratio(ratio)
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1):
        raise ConfigError(f"compress: energy={energy!r} must be in (0, 1]: the fraction of each layer's squared "
                          "singular values kept.")
    if target_bytes is not None and (isinstance(target_bytes, bool) or not isinstance(target_bytes, int)
                                     or target_bytes < 1):
        raise ConfigError(f"compress: target_bytes={target_bytes!r} must be a positive integer (bytes stored).")
    if ranks is not None and not isinstance(ranks, dict):
        raise ConfigError(f"compress: ranks={type(ranks).__name__}; give a dict {{module name, suffix or regex: rank}}.")
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"compress: allocation={allocation!r}; use one of {', '.join(ALLOCATIONS)}.")
    if allocation != "uniform" and ratio is None and target_bytes is None:
        raise ConfigError(f"compress: allocation='{allocation}' spreads a parameter budget; give ratio= or "
                          "target_bytes= with it.")


def _targets(model: nn.Module, targets, exclude) -> dict[str, LayerView]:
    if model.__dict__.get(RECORD) or factored_layers(model):
        raise ConfigError(f"compress: this {type(model).__name__} is compressed already; compress the original model "
                          "(or rankwise.compress.to_dense(model) first).")
    if any(True for _ in adapted_layers(model)):
        raise ConfigError("compress: the model has adapters; merge and remove them first (rw.unadapt(model, merge=True)) "
                          "or compress the base model.")
    has_linear = any(kind_of(m) in ("linear", "hf_conv1d") for m in model.modules())
    if not has_linear:
        raise TargetError(f"compress: {type(model).__name__} has no nn.Linear (or Hugging Face Conv1D) layer, so there "
                          "is nothing to factor; low-rank compression works on linear layers.")
    try:
        names = resolve_targets(model, targets, exclude)
    except TargetError as e:
        raise TargetError(f"compress: {e}") from None
    views = {}
    for n in names:
        m = model.get_submodule(n)
        if kind_of(m) in ("linear", "hf_conv1d"):
            views[n] = LayerView(m, n)
    if not views:
        raise TargetError(f"compress: targets={targets!r} select no nn.Linear / Conv1D layer (found only other kinds); "
                          "point them at linear layers.")
    return views


def _table_ranks(views, ranks) -> dict[str, int]:
    out = {}
    if ranks is None:
        return out
    for n in views:
        r = allocate.table_rank(ranks, n)
        if r is not None:
            out[n] = r
    unused = [k for k in ranks if not any(k == n or n.endswith("." + k) or _rx(k, n) for n in views)]
    if unused:
        raise TargetError(f"compress: ranks table entries {unused} match no compressed module."
                          + close_names(unused[0], list(views)))
    return out


def _rx(pattern: str, name: str) -> bool:
    import re

    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


# ---- calibration ------------------------------------------------------------------------------------
def _batches(calibration, loss_fn, progress: bool) -> Batches:
    if isinstance(calibration, Batches):
        if loss_fn is not None and calibration.loss_fn is None:
            calibration.loss_fn = loss_fn
        return calibration
    return Batches(calibration, loss_fn=loss_fn, progress=progress)


def _second_moments(model, views, source: Batches, method: str) -> dict[str, torch.Tensor]:
    calib = collect(model, views, ("input_cov",), source, method=f"compress {method}")
    return {n: calib[n].cov for n in views}


def _fisher(model, views, source: Batches, method: str) -> dict[str, torch.Tensor]:
    """``Σ_batches g_b²`` per layer, ``g_b`` the gradient of one batch's loss (the engine's grad pass per batch)."""
    if source.loss_fn is None:
        raise CalibrationError(f"compress: method '{method}' weighs by the Fisher information; pass "
                               "loss_fn=lambda model, batch: <scalar loss> with the calibration batches.")
    source.reusable()
    fisher: dict[str, torch.Tensor] = {}
    batches = list(source.iterate(f"compress {method}: Fisher"))
    if not batches:
        raise CalibrationError(f"compress: method '{method}': the calibration batches are empty.")
    for b in batches:
        one = Batches([b], loss_fn=source.loss_fn, forward=source.forward, progress=False)
        calib = collect(model, views, ("grad",), one, method=f"compress {method}")
        for n in views:
            g = calib[n].grad
            fisher[n] = g * g if n not in fisher else fisher[n].add_(g * g)
            calib.release(n)
    return fisher


def _mean_loss(model, batches: list, loss_fn) -> float:
    from ..core.calibrate import model_device, to_device

    dev = model_device(model)
    with torch.no_grad():
        vals = [float(loss_fn(model, to_device(b, dev))) for b in batches]
    return sum(vals) / len(vals)


# ---- errors -----------------------------------------------------------------------------------------
def _errors(w: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor | None) -> dict:
    dt = torch.float64
    w, e = w.to(dt), (w.to(dt) - approx.to(dt))
    out = {"weight error": float(e.norm() / w.norm().clamp_min(1e-300))}
    if cov is not None:
        c = cov.to(dt)
        num = float(((e @ c) * e).sum().clamp_min(0))
        den = float(((w @ c) * w).sum().clamp_min(1e-300))
        out["output error"] = (num / den) ** 0.5
    return out


# ---- the public entry point ---------------------------------------------------------------------------
def compress(model: nn.Module, method: str, *, ratio: float | None = None, rank: int | None = None,
             calibration=None, loss_fn=None, targets="all-linear", exclude=None, energy: float | None = None,
             target_bytes: int | None = None, ranks: dict | None = None, allocation: str = "uniform",
             progress: bool = True, **options) -> CompressionReport:
    """Compress ``model`` in place with ``method`` (one of :data:`METHODS`); return the per-layer report.

    Rank rule (one of): ``rank`` (every layer), ``ratio`` (fraction of each layer's parameters kept,
    in (0, 1]), ``target_bytes`` (bytes the whole model stores), ``energy`` (fraction of the spectrum's
    squared singular values kept), and/or ``ranks`` (a table ``{module name, suffix or regex: rank}``
    that overrides the rule for the layers it names). ``allocation`` spreads a ``ratio`` /
    ``target_bytes`` budget non-uniformly (``heterogeneous``, ``welore``, ``sensitivity``; see
    :mod:`rankwise.compress.allocate`). ``calibration``: an iterable of model inputs (or a
    :class:`~rankwise.core.calibrate.Batches`), needed by ``asvd``, ``svd_llm``, ``eora``, ``fwsvd`` (with
    ``loss_fn``) and the sensitivity search (with ``loss_fn``); optional for ``cur`` and ``svd`` (it adds
    the output error to the report). Method options: :data:`OPTIONS`.
    """
    t0 = time.perf_counter()
    opts = _check_options(method, options)
    if method == "extract":
        from .flows import extract_flow

        return extract_flow(model, rank=rank, ratio=ratio, targets=targets, exclude=exclude, progress=progress,
                            t0=t0, **opts)
    if method == "compeft":
        from .flows import compeft_flow

        return compeft_flow(model, t0=t0, **opts)
    if method in QUANT_METHODS:
        from .flows import quant_flow

        if rank is None or any(v is not None for v in (ratio, energy, target_bytes, ranks)):
            raise ConfigError(f"compress: '{method}' keeps every weight (quantized) and adds a rank-r compensation "
                              "saved as one LoRA adapter; give rank=<int> (and no ratio / energy / target_bytes / ranks).")
        return quant_flow(model, method, rank=rank, calibration=calibration, loss_fn=loss_fn, targets=targets,
                          exclude=exclude, progress=progress, t0=t0, **opts)
    if method == "welore":
        if allocation not in ("uniform", "welore"):
            raise ConfigError(f"compress: method 'welore' is SVD with WeLore's allocation; allocation={allocation!r} "
                              "conflicts with it.")
        allocation = "welore" if (ratio is not None or target_bytes is not None) else "uniform"
    _check_rule(ratio, rank, energy, target_bytes, ranks, allocation)
    views = _targets(model, targets, exclude)
    table = _table_ranks(views, ranks)
    for n, v in views.items():
        r = table.get(n, rank)
        if r is not None:
            check_rank(n, v.shape, r)
    if method == "cur" and opts["select"] not in ("deim", "leverage"):
        raise ConfigError(f"compress: cur select={opts['select']!r}; use 'deim' or 'leverage'.")
    if method in NEEDS_ACTIVATIONS and calibration is None:
        raise CalibrationError(f"compress: method '{method}' scales by the layers' input statistics; pass "
                               "calibration=<iterable of model inputs> (e.g. a few batches of real text).")
    if method == "fwsvd" and (calibration is None or loss_fn is None):
        raise CalibrationError("compress: method 'fwsvd' weighs rows by the Fisher information; pass calibration=<batches> "
                               "and loss_fn=lambda model, batch: <scalar loss>.")
    if allocation == "sensitivity" and (calibration is None or loss_fn is None):
        raise CalibrationError("compress: allocation='sensitivity' measures the calibration loss of each truncated layer; "
                               "pass calibration=<batches> and loss_fn=lambda model, batch: <scalar loss>.")

    source = _batches(calibration, loss_fn, progress) if calibration is not None else None
    if source is not None:
        source.reusable()
    covs = _second_moments(model, views, source, method) if source is not None else {}
    fisher = _fisher(model, views, source, method) if method == "fwsvd" else {}

    from . import svd as svdm
    from .cur import cur as cur_fn

    core = method == "cur"
    decomps, it = {}, _progress(views, progress, f"compress {method}: factoring")
    for n in it:
        w = views[n].weight2d().detach()
        if method == "asvd":
            decomps[n] = svdm.asvd(w, covs[n], opts["alpha"])
        elif method == "svd_llm":
            decomps[n] = svdm.svd_llm(w, covs[n], opts["jitter"])
        elif method == "fwsvd":
            decomps[n] = svdm.fwsvd(w, fisher[n])
        else:  # svd, welore, and cur's spectrum (for energy / allocation)
            decomps[n] = svdm.svd(w)

    # ---- ranks
    shapes = {n: v.shape for n, v in views.items()}
    chosen: dict[str, int] = {}
    explicit = set(table)
    if rank is not None:
        chosen = {n: rank for n in views}
        explicit |= set(views)
    elif energy is not None:
        chosen = {n: allocate.rank_for_energy(d.spectrum, energy) for n, d in decomps.items()}
    elif ratio is not None or target_bytes is not None:
        p = ratio if ratio is not None else _ratio_for_bytes(model, views, target_bytes, core)
        free = {n: v for n, v in views.items() if n not in table}
        if allocation == "uniform":
            chosen = {n: allocate.rank_for_ratio(*shapes[n], p, core) for n in free}
        elif allocation == "heterogeneous":
            chosen = allocate.heterogeneous({n: (*shapes[n], decomps[n].spectrum) for n in free}, p, core)
        elif allocation == "welore":
            chosen = allocate.welore({n: (*shapes[n], decomps[n].spectrum) for n in free}, p, core)
        else:
            losses = _sensitivity(model, free, decomps, source, core, progress)
            chosen = allocate.sensitivity(losses, {n: shapes[n] for n in free}, p, core)
    chosen.update(table)
    missing = [n for n in views if n not in chosen]
    if missing:
        raise ConfigError(f"compress: the ranks table leaves modules {missing[:5]} without a rank; add them, or give "
                          "a default rule (ratio=, rank=, energy= or target_bytes=).")

    # ---- build every new layer before touching the model
    report = CompressionReport(method, params_before=parameter_total(model), bytes_before=model_bytes(model))
    built = []
    for n, v in views.items():
        m, k = shapes[n]
        r = min(chosen[n], m, k)
        w = v.weight2d().detach()
        row = {"module": n, "shape": (m, k), "rank": r, "params before": m * k}
        if n not in explicit and allocate.cost(m, k, r, core) >= m * k:
            row.update({"rank": "dense", "params after": m * k, "kept energy": 1.0, "weight error": 0.0})
            report.layers.append(row)
            continue
        if core:
            scale = covs[n].diagonal().clamp_min(0).sqrt() if n in covs else None
            c, u, rr, rows_i, cols_i = cur_fn(w, r, opts["select"], scale)
            up, down, mid = c, rr, u
            approx = c @ u @ rr
        else:
            up, down = decomps[n].factors(r)
            mid, approx = None, up @ down
        bias = v.base.bias.detach() if v.base.bias is not None else None
        layer = FactoredLinear.from_factors(up.to(w.dtype), down.to(w.dtype), None if mid is None else mid.to(w.dtype),
                                            bias, dtype=w.dtype)
        layer.source_kind = v.kind
        row.update({"params after": allocate.cost(m, k, r, core), "kept energy": decomps[n].kept_energy(r)})
        row.update(_errors(w, approx, covs.get(n)))
        report.layers.append(row)
        built.append((n, layer))
    for n, layer in built:
        set_module(model, n, layer)
    model.__dict__[RECORD] = {
        "method": method,
        "layers": {n: {"type": "factored", "in": layer.in_features, "out": layer.out_features, "rank": layer.rank,
                       "core": layer.core is not None, "bias": layer.bias is not None, "source_kind": layer.source_kind}
                   for n, layer in built},
        "options": {k: v for k, v in opts.items() if isinstance(v, (int, float, str, type(None)))},
    }
    report.params_after, report.bytes_after = parameter_total(model), model_bytes(model)
    report.seconds = time.perf_counter() - t0
    return report


def _progress(items, progress: bool, desc: str):
    if not progress:
        return list(items)
    from tqdm.auto import tqdm

    return tqdm(list(items), desc=desc, leave=False)


def _ratio_for_bytes(model, views, target: int, core: bool) -> float:
    """The uniform kept-parameter ratio whose compressed model stores at most ``target`` bytes."""
    total = model_bytes(model)
    dense = {n: v.weight.numel() * v.weight.element_size() for n, v in views.items()}
    other = total - sum(dense.values())

    def size(p: float) -> int:
        s = other
        for n, v in views.items():
            m, k = v.shape
            es = v.weight.element_size()
            s += min(dense[n], es * allocate.cost(m, k, allocate.rank_for_ratio(m, k, p, core), core))
        return s

    if size(1e-9) > target:
        raise ConfigError(f"compress: target_bytes={target} is below the smallest reachable size {size(1e-9)} bytes "
                          f"(rank 1 everywhere; the uncompressed parts alone take {other} bytes). Raise it, or "
                          "compress more layers (targets=).")
    if size(1.0) <= target:
        return 1.0
    lo, hi = 1e-9, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if size(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def _sensitivity(model, views, decomps, source: Batches, core: bool, progress: bool) -> dict[str, dict[float, float]]:
    """ASVD's sensitivity list: calibration loss with one layer truncated at each kept ratio."""
    batches = list(source.data)
    was = model.training
    model.eval()
    out: dict[str, dict[float, float]] = {}
    try:
        for n in _progress(views, progress, "compress: sensitivity"):
            v = views[n]
            w = v.weight
            keep = w.detach().clone()
            out[n] = {}
            m, k = v.shape
            for p in allocate.SENSITIVITY_RATIOS:
                r = allocate.rank_for_ratio(m, k, p, core)
                up, down = decomps[n].factors(r)
                with torch.no_grad():
                    w.copy_(v.to_param((up @ down).to(w.dtype)))
                try:
                    out[n][p] = _mean_loss(model, batches, source.loss_fn)
                finally:
                    with torch.no_grad():
                        w.copy_(keep)
    finally:
        model.train(was)
    return out
