"""Calibration: how a method sees data before training (data-driven inits: EVA, CorDA, LoRA-GA …).

A method declares what it needs as a class attribute, and the engine collects exactly that::

    calibration_needs = ("input_cov",)    # streamed E[x xᵀ] and mean of each target layer's input
    calibration_needs = ("input_svd",)    # streamed (incremental) SVD / PCA of each layer's input
    calibration_needs = ("grad",)         # mean gradient of loss_fn w.r.t. each target weight W0

``rw.adapt(model, "eva", rank=16, calibration=batches)`` runs ``batches`` — any iterable of
model inputs: dicts (``model(**b)``), tuples/lists (``model(*b)``) or tensors (``model(b)``) —
through the model with forward hooks on the target layers (in eval mode, without gradients),
and each layer's ``__init__`` receives its :class:`LayerStats` as ``calibration``. Gradient
needs call ``loss_fn(model, batch) -> loss`` and ``backward`` (``rw.adapt(..., loss_fn=...)``).
Options (a custom forward, no progress bar, a memory budget for gradients) go in
:class:`Batches`. A method that needs calibration and gets none raises
:class:`~rankwise.errors.CalibrationError` naming the method; so does a target layer that never
runs during calibration.

Memory:

* activations are streamed: each batch's layer input is folded into a running statistic and
  dropped — :class:`~rankwise.linalg.StreamingMoments` (``in × in`` per layer, exact) or
  :class:`~rankwise.linalg.IncrementalSVD` (``(k + p) × in`` per layer). Layers that receive the
  very same input tensor (``q``/``k``/``v`` projections) share one statistic, computed once.
  Rows where ``attention_mask == 0`` (padding) are left out when the batch is a dict with an
  ``attention_mask`` whose shape matches the layer input's leading dimensions;
* gradients are collected lazily, when a layer's adapter asks for ``stats.grad``: one pass over
  the batches computes the gradients of a group of consecutive target layers, accumulating each
  in float32 as soon as autograd produces it (``.grad`` is freed at once); only those layers'
  weights require grad during the pass (a ``.grad`` the caller left on one of them is set aside
  for the pass, so it does not leak into the statistic, and put back afterwards).
  ``Batches(grad_bytes=...)`` bounds the group's memory (one layer per pass at the smallest, so
  peak memory stays near one layer's gradient; default: every target layer in one pass, like
  PEFT's LoRA-GA); the engine releases each gradient once the layer's adapter is built.

A method that must see all layers' statistics at once (EVA's rank redistribution) defines
``plan(views, config, calibration, generator=None) -> {module name: overrides or None}``: per-module config
overrides (e.g. ``{"rank": 5, "alpha": 10.0}``, recorded in saved files so ``rw.load`` rebuilds
them), or ``None`` to leave a module out. ``plan`` may also leave precomputed data for a layer in
``calibration[name].extra`` (batched SVDs of all layers, say); a method with ``plan`` but no
needs gets an empty :class:`Calibration` for that.

:data:`LOAD_STATE` is passed as ``calibration`` when the adapter's state is about to be
loaded (``rw.load``, ``rw.import_peft``): a method builds tensors of the right shapes and may
skip its init.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CalibrationError, UnsupportedLayerError
from ..linalg import IncrementalSVD, StreamingMoments
from .layers import LayerView

NEEDS = ("input_cov", "input_svd", "grad")
ACTIVATION_KINDS = ("linear", "hf_conv1d")


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"rankwise.core.calibrate.{self.name}"


LOAD_STATE = _Marker("LOAD_STATE")


def default_forward(model: nn.Module, batch):
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple/list, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def model_device(model: nn.Module) -> torch.device | None:
    """The device of all of ``model``'s parameters, or None when they are spread over several
    (a model dispatched over devices moves its inputs itself)."""
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    return devices.pop() if len(devices) == 1 else None


def to_device(batch, device: torch.device | None):
    """``batch`` with every tensor in it moved to ``device`` (dicts, tuples and lists recursed)."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Batches:
    """Calibration data plus how to run it.

    data: an iterable of model inputs (read once for activation statistics; gradient passes read
        it again, so a one-shot iterator is kept in a list then).
    loss_fn: ``loss_fn(model, batch) -> scalar loss``, needed for gradient statistics.
    forward: ``forward(model, batch)`` for activation statistics (default :func:`default_forward`).
    progress: show a tqdm progress bar.
    token_mask: leave out rows where ``batch["attention_mask"] == 0``.
    grad_bytes: memory budget for the gradients of one pass (``None``: all target layers at once).
    """

    def __init__(self, data: Iterable, *, loss_fn: Callable | None = None, forward: Callable | None = None,
                 progress: bool = True, token_mask: bool = True, grad_bytes: int | None = None):
        if isinstance(data, (torch.Tensor, Mapping)):
            raise CalibrationError(
                f"calibration got a single {type(data).__name__}; pass an iterable of batches, e.g. [batch] "
                "or a DataLoader."
            )
        if not isinstance(data, Iterable):
            raise CalibrationError(
                f"calibration={type(data).__name__} is not iterable; pass an iterable of model inputs "
                "(dicts, tensors or tuples), e.g. a list of batches or a DataLoader."
            )
        if grad_bytes is not None and grad_bytes <= 0:
            raise CalibrationError(f"Batches.grad_bytes={grad_bytes}: give a positive number of bytes or None.")
        self.data = data
        self.loss_fn = loss_fn
        self.forward = forward or default_forward
        self.progress = progress
        self.token_mask = token_mask
        self.grad_bytes = grad_bytes

    def reusable(self) -> None:
        """Make ``data`` safe to iterate more than once (a one-shot iterator becomes a list)."""
        if isinstance(self.data, Iterator) or iter(self.data) is self.data:
            self.data = list(self.data)

    def iterate(self, desc: str) -> Iterable:
        n = len(self.data) if hasattr(self.data, "__len__") else None
        if not self.progress:
            return self.data
        from tqdm.auto import tqdm

        return tqdm(self.data, total=n, desc=desc, leave=False)

    def mask_of(self, batch):
        if not self.token_mask or not isinstance(batch, Mapping):
            return None
        m = batch.get("attention_mask")
        return m.bool() if isinstance(m, torch.Tensor) and m.dim() == 2 else None


@dataclass(eq=False)
class LayerStats:
    """What calibration collected for one target layer (``name``), as the method asked.

    moments: :class:`~rankwise.linalg.StreamingMoments` (or :class:`MaxNormalizedGram`) of the
        layer input (``input_cov``);
    svd: :class:`~rankwise.linalg.IncrementalSVD` of the layer input (``input_svd``);
    extra: data a method's ``plan`` left for this layer.
    """

    name: str
    view: LayerView
    moments: StreamingMoments | MaxNormalizedGram | None = None
    svd: IncrementalSVD | None = None
    extra: dict = field(default_factory=dict)
    _owner: Calibration | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        """Input rows (tokens) the statistics were computed from."""
        st = self.moments if self.moments is not None else self.svd
        return 0 if st is None else st.n

    @property
    def cov(self) -> torch.Tensor:
        """Uncentered second moment of the layer input, ``(in, in)`` float32: ``E[x xᵀ]`` over rows,
        or CorDA's per-call max-normalized Gram (option ``cov_normalize``)."""
        if self.moments is None:
            raise CalibrationError(f"module '{self.name}': no input covariance was collected "
                                   "(the method must declare calibration_needs = ('input_cov',)).")
        return self.moments.second

    @property
    def mean(self) -> torch.Tensor:
        """Mean of the layer input rows, ``(in,)``."""
        st = self.moments if self.moments is not None else self.svd
        if st is None or st.mean is None:
            raise CalibrationError(f"module '{self.name}': no input statistics were collected.")
        return st.mean

    @property
    def grad(self) -> torch.Tensor:
        """Mean over the calibration batches of ``∂ loss / ∂ W0`` in canonical ``(out, in)`` layout."""
        if self._owner is None or "grad" not in self._owner.needs:
            raise CalibrationError(f"module '{self.name}': no gradient was collected "
                                   "(the method must declare calibration_needs = ('grad',)).")
        return self._owner._grad(self.name)


class Calibration(Mapping):
    """Per-layer :class:`LayerStats` for the target layers of one ``rw.adapt`` call.

    A :class:`Calibration` can be computed once with :func:`collect` and passed to several
    ``rw.adapt`` calls (``calibration=calib``) as long as it covers their targets and needs.
    """

    def __init__(self, layers: dict[str, LayerStats], needs: tuple[str, ...] = (), options: dict | None = None,
                 model: nn.Module | None = None, source: Batches | None = None, method: str = "?"):
        self.layers = layers
        self.needs = tuple(needs)
        self.options = dict(options or {})
        self.method = method
        self._model = weakref.ref(model) if model is not None else None
        self._source = source
        self._grads: dict[str, torch.Tensor] = {}
        self._done: set[str] = set()
        for st in layers.values():
            st._owner = self

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def release(self, name: str) -> None:
        """Free what is held for ``name`` only during the build (its gradient)."""
        self._grads.pop(name, None)

    # ---- gradients (lazy, in passes of bounded memory) ----------------------------------------
    def _grad(self, name: str) -> torch.Tensor:
        if name not in self._grads:
            if name in self._done:
                raise CalibrationError(f"module '{name}': its calibration gradient was already released.")
            order = [n for n in self.layers if n not in self._done]
            group, size = [], 0
            budget = self._source.grad_bytes if self._source is not None else None
            for n in order[order.index(name):]:
                b = self.layers[n].view.weight.numel() * 4
                if group and budget is not None and size + b > budget:
                    break
                group.append(n)
                size += b
            self._grads.update(_grad_pass(self._model_or_fail(), self, group))
            self._done.update(group)
        return self._grads[name]

    def _model_or_fail(self) -> nn.Module:
        model = self._model() if self._model is not None else None
        if model is None or self._source is None:
            raise CalibrationError("this Calibration has no model or batches attached to compute gradients from.")
        return model


# ---- collection -----------------------------------------------------------------------------------
def _needs_of(cls) -> tuple[str, ...]:
    needs = tuple(cls.calibration_needs)
    bad = [n for n in needs if n not in NEEDS]
    if bad:
        raise TypeError(f"method '{cls.name}' declares unknown calibration_needs {bad}; valid: {list(NEEDS)}.")
    return needs


def prepare(model: nn.Module, cls, config, views: dict[str, LayerView], calibration, loss_fn=None):
    """What ``rw.adapt`` passes on: a :class:`Calibration` for methods that need data or have a
    ``plan``, :data:`LOAD_STATE` unchanged (and for such methods on a meta-device model), otherwise
    ``calibration`` as given."""
    needs = _needs_of(cls)
    if calibration is LOAD_STATE:
        return LOAD_STATE
    if (needs or cls.plan is not None) and views and all(v.weight.device.type == "meta" for v in views.values()):
        # a meta-device model (FSDP, big-model loading) has no values to compute statistics from:
        # build the adapter's structure, as for loading a saved state; load or initialize after to_empty
        return LOAD_STATE
    if isinstance(calibration, Calibration):
        missing = [n for n in views if n not in calibration]
        lacking = [n for n in needs if n not in calibration.needs]
        if missing or lacking:
            raise CalibrationError(
                f"the Calibration passed to method '{cls.name}' lacks modules {missing[:5]} / needs {lacking}; "
                "collect it for the same targets and method."
            )
        return calibration
    if not needs:
        if cls.plan is not None:
            return Calibration({n: LayerStats(n, v) for n, v in views.items()}, method=cls.name)
        return calibration
    if calibration is None:
        what = "a loss_fn and " if "grad" in needs else ""
        raise CalibrationError(
            f"method '{cls.name}' initializes from data ({', '.join(needs)}) and needs {what}calibration batches: "
            f"rw.adapt(model, '{cls.name}', ..., calibration=batches"
            + (", loss_fn=lambda model, batch: ...)" if "grad" in needs else ")")
            + " with batches an iterable of model inputs (dicts, tensors or tuples), e.g. a few training batches."
        )
    source = calibration if isinstance(calibration, Batches) else Batches(calibration, loss_fn=loss_fn)
    if loss_fn is not None and source.loss_fn is None:
        source.loss_fn = loss_fn
    opts = cls.calibration_options(config) if cls.calibration_options is not None else {}
    return collect(model, views, needs, source, options=opts, method=cls.name)


def collect(model: nn.Module, views: dict[str, LayerView], needs: tuple[str, ...], source: Batches | Iterable,
            options: dict | None = None, method: str = "?") -> Calibration:
    """Run the calibration batches and collect ``needs`` for the layers ``views`` (name → view).

    options: ``svd_rank`` (components kept for ``input_svd``, default 8), ``svd_oversample``
    (extra components carried along, default ``svd_rank``), ``center`` (PCA: subtract the running
    mean, default True), ``cov_normalize`` for ``input_cov``: ``"rows"`` (default,
    ``E[x xᵀ]`` over input rows) or ``"max_per_call"`` (:class:`MaxNormalizedGram`, CorDA's).
    """
    source = source if isinstance(source, Batches) else Batches(source)
    options = dict(options or {})
    needs = tuple(needs)
    if "grad" in needs:
        if source.loss_fn is None:
            raise CalibrationError(
                f"method '{method}' computes gradients on the calibration batches; pass "
                "loss_fn=lambda model, batch: <scalar loss> to rw.adapt (or to Batches)."
            )
        source.reusable()
    stats = {n: LayerStats(n, v) for n, v in views.items()}
    calib = Calibration(stats, needs, options, model=model, source=source, method=method)
    act = [n for n in needs if n in ("input_cov", "input_svd")]
    if act:
        bad = [(n, v.kind) for n, v in views.items() if v.kind not in ACTIVATION_KINDS]
        if bad:
            raise UnsupportedLayerError(
                f"method '{method}' collects input statistics, which rankwise computes for "
                f"{', '.join(ACTIVATION_KINDS)} layers; module '{bad[0][0]}' is {bad[0][1]}. Exclude it from targets."
            )
        _activation_pass(model, calib, act, source, options, method)
    return calib


@dataclass(frozen=True, eq=False)
class MaxNormalizedGram:
    """``Σ_calls (X/|max X|)ᵀ (X/|max X|) / calls``: each forward call's input rows ``X`` divided by
    the absolute value of their largest entry — the covariance of CorDA's reference code and PEFT's
    ``preprocess_corda`` (where a call is one sample). Exact; ``update`` returns a new object."""

    n: int = 0
    calls: int = 0
    sum: torch.Tensor | None = None
    gram: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> MaxNormalizedGram:
        x = x.reshape(-1, x.shape[-1])
        x = x.double() if x.dtype == torch.float64 else x.float()
        if x.shape[0] == 0:
            return self
        s, g = x.sum(0), (x / x.max().abs()).t() @ (x / x.max().abs())
        if self.calls:
            s, g = self.sum + s, self.gram + g
        return MaxNormalizedGram(self.n + x.shape[0], self.calls + 1, s, g)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    @property
    def second(self) -> torch.Tensor:
        return self.gram / self.calls


def _activation_pass(model, calib: Calibration, act, source: Batches, options: dict, method: str) -> None:
    k = int(options.get("svd_rank", 8))
    norm = options.get("cov_normalize", "rows")
    if norm not in ("rows", "max_per_call"):
        raise TypeError(f"method '{method}': calibration option cov_normalize={norm!r}; use 'rows' or 'max_per_call'.")
    empty_m = StreamingMoments() if norm == "rows" else MaxNormalizedGram()
    empty_s = IncrementalSVD(k, int(options.get("svd_oversample", k)), bool(options.get("center", True)))
    for st in calib.layers.values():
        st.moments = empty_m if "input_cov" in act else None
        st.svd = empty_s if "input_svd" in act else None
    state = {"mask": None, "cache": {}}

    def rows_of(x: torch.Tensor) -> torch.Tensor:
        key = ("rows", id(x))
        hit = state["cache"].get(key)
        if hit is not None and hit[0]() is x:
            return hit[1]
        rows = x.detach()
        m = state["mask"]
        if m is not None and tuple(rows.shape[:-1]) == tuple(m.shape):
            rows = rows[m.to(rows.device)]
        rows = rows.reshape(-1, rows.shape[-1])
        state["cache"][key] = (weakref.ref(x), rows)
        return rows

    def advance(st: LayerStats, attr: str, x: torch.Tensor) -> None:
        prev = getattr(st, attr)
        key = (attr, id(x), id(prev))
        hit = state["cache"].get(key)
        if hit is not None and hit[0]() is x and hit[1] is prev:
            setattr(st, attr, hit[2])  # same input, same state so far: share the update
            return
        new = prev.update(rows_of(x))
        state["cache"][key] = (weakref.ref(x), prev, new)
        setattr(st, attr, new)

    def make_hook(st: LayerStats):
        def hook(module, args, output):
            if not args or not isinstance(args[0], torch.Tensor):
                raise CalibrationError(f"module '{st.name}' was called without a tensor input during calibration.")
            x = args[0]
            for attr in ("moments", "svd"):
                if getattr(st, attr) is not None:
                    advance(st, attr, x)
        return hook

    handles = [st.view.base.register_forward_hook(make_hook(st)) for st in calib.layers.values()]
    device = model_device(model)
    was_training = model.training
    model.eval()
    n = 0
    try:
        with torch.no_grad():
            for batch in source.iterate(f"calibrating {method}"):
                batch = to_device(batch, device)
                state["mask"] = source.mask_of(batch)
                source.forward(model, batch)
                state["cache"].clear()
                n += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        state["cache"].clear()
    if n == 0:
        raise CalibrationError(f"method '{method}': the calibration batches are empty; give at least one batch.")
    silent = [name for name, st in calib.layers.items() if st.rows == 0]
    if silent:
        raise CalibrationError(
            f"method '{method}': modules {silent[:5]} received no input rows during calibration ({n} batches); "
            "they are not used in forward, or every row was masked. Exclude them from targets."
        )


def _to2d(view: LayerView, t: torch.Tensor) -> torch.Tensor:
    """A tensor in the base parameter's layout → canonical ``(out, in)``."""
    if view.kind in ("hf_conv1d", "embedding"):
        return t.t()
    if view.kind in ("conv1d", "conv2d"):
        return t.reshape(view.out_features, -1)
    return t


def _grad_pass(model: nn.Module, calib: Calibration, names: list[str]) -> dict[str, torch.Tensor]:
    source = calib._source
    params: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for n in names:
        w = calib.layers[n].view.weight
        params.setdefault(id(w), (w, []))[1].append(n)
    acc: dict[int, torch.Tensor] = {}

    def make_hook(pid: int):
        def hook(p):
            g = p.grad.detach().float()
            acc[pid] = g if pid not in acc else acc[pid].add_(g)
            p.grad = None
        return hook

    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    # a .grad the caller left on a target weight would be added into the first batch's gradient by
    # autograd's accumulation: set it aside for the pass and give it back afterwards
    stale = {pid: w.grad for pid, (w, _) in params.items()}
    handles = []
    for pid, (w, _) in params.items():
        w.grad = None
        w.requires_grad_(True)
        handles.append(w.register_post_accumulate_grad_hook(make_hook(pid)))
    device = model_device(model)
    batches = 0
    part = f" ({len(names)} of {len(calib.layers)} layers)" if len(names) < len(calib.layers) else ""
    try:
        with torch.enable_grad():
            for batch in source.iterate(f"calibration gradients {calib.method}{part}"):
                batch = to_device(batch, device)
                loss = source.loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
                    raise CalibrationError(
                        f"method '{calib.method}': loss_fn must return a scalar tensor that depends on the model; "
                        f"got {type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}."
                    )
                if not math.isfinite(float(loss.detach())):
                    raise CalibrationError(f"method '{calib.method}': loss_fn returned {float(loss)} on a "
                                           "calibration batch; check the batch and the model.")
                loss.backward()
                batches += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        for pid, (w, _) in params.items():
            w.grad = stale[pid]
    if batches == 0:
        raise CalibrationError(f"method '{calib.method}': the calibration batches are empty; give at least one batch.")
    out = {}
    for pid, (_, ns) in params.items():
        if pid not in acc:
            raise CalibrationError(
                f"method '{calib.method}': module '{ns[0]}' got no gradient from loss_fn on the calibration batches; "
                "it does not affect the loss. Exclude it from targets."
            )
        for n in ns:
            out[n] = _to2d(calib.layers[n].view, acc[pid] / batches)
    return out
