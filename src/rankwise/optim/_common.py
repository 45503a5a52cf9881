"""Pieces shared by the low-rank optimizers of :mod:`rankwise.optim`.

* :class:`LowRankOptimizer` — a ``torch.optim.Optimizer`` base: standard ``param_groups``; a
  parameter is *low-rank* (projected) when its group's ``rank`` is not ``None`` and it has ≥ 2
  dimensions (conv kernels are viewed as ``(out, -1)``); every other parameter takes the plain
  AdamW step of :func:`adamw_step_` in the same optimizer. It builds one projector per low-rank
  parameter from the group keys (:data:`GROUP_DEFAULTS`) and keeps its tensors in
  ``optimizer.state[p]`` so ``state_dict()`` round-trips through ``torch.load(weights_only=True)``.
* Adam arithmetic in two conventions (group key ``adam_style``):

  - ``"hf"`` — transformers' old ``AdamW``, which galore-torch, fira, apollo-torch and q-galore
    copy: ``p ← p − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v + ε)``, then decoupled decay ``p ← p − lr·λ·p``
    on the updated weight.
  - ``"torch"`` — ``torch.optim.AdamW`` / bitsandbytes: ``p ← p·(1 − lr·λ)`` first, then
    ``p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)``.

  The two differ only in where ``ε`` meets the bias correction and in the order of the decay.
* How moments are carried when a projector's subspace changes (group key ``subspace_change``):

  - ``"keep"`` (GaLore's choice) — keep ``m, v`` as they are; they now describe coordinates in the
    new basis, which is exact only if the bases agree.
  - ``"reset"`` — zero ``m, v`` and restart the bias correction, as at step 1.
  - ``"reproject"`` — rotate into the new basis: with ``R = P_newᵀ P_old`` (left; right uses
    ``Q_oldᵀ Q_new`` on the other side) ``m ← R m`` (exact for the part of ``m`` inside the new
    subspace) and ``v ← (R∘R) v`` (the second moment of ``R g`` if the coordinates of ``g`` were
    uncorrelated).
* 8-bit block-wise state (:func:`quantize_blockwise` / :func:`dequantize_blockwise`) with the
  dynamic data type of Dettmers et al. (2015, 2022).
* :func:`param_groups` — split a model into low-rank matrices and the rest.
* Defaults that depend on the device (group keys ``projector="auto"`` and ``stagger_refresh="auto"``,
  both the defaults). GaLore's exact SVD of every projected matrix, all on the same steps
  ``0, T, 2T, …``, made one step in ``T`` pay 3.8 s for 14 matrices of 2048 × 5632 on an H200
  (issue 18; ``randomized_svd`` 0.19 s). So, per parameter, on its device at its first step:

  - ``projector="auto"`` is ``"svd"`` (galore-torch's exact SVD) for a parameter on the CPU and
    ``"randomized_svd"`` (Halko et al., seeded per parameter, ``projector_options`` apply) on an
    accelerator (CUDA, XPU, MPS, …);
  - ``stagger_refresh="auto"`` is ``True`` for the SVD kinds (``svd``, ``randomized_svd``) on an
    accelerator, ``False`` otherwise (on the CPU, and for the cheap refreshes: ``random``, ``dct``, …).

  On the CPU the defaults therefore reproduce galore-torch's trajectory (the reference tests
  check it); set ``projector="svd", stagger_refresh=False`` for that trajectory on a GPU too. The
  choice is kept in ``optimizer.state[p]`` (``proj_randomized``, ``proj_offset``), so a run resumed on
  another device keeps the projector it started with.
* Staggered subspace refresh (``stagger_refresh=True``): the ``i``-th of the group's ``n`` projected
  parameters (in ``params`` order; under :func:`rankwise.optim.layerwise`, of all the projected
  parameters it steps) gets the offset ``o_i = ⌊i·T / n⌋`` and refreshes at the steps ``t`` with
  ``(t − o_i) mod T = 0`` — after its first basis, which is still built at the first step (a
  projector needs one). The offsets are spread over ``[0, T)``, so at most ``⌈n / T⌉`` matrices
  refresh on any later step. The offset is kept in ``optimizer.state[p]["proj_offset"]`` (saved
  with the optimizer, identical on every rank). No effect on ``online_pca`` (its basis moves at
  every step).
* FSDP2 (``fully_shard``): a low-rank parameter is a ``DTensor`` shard. Its step runs on the whole
  matrix (:func:`rankwise.core.distributed.whole_parameter`: the weight and its gradient are
  all-gathered, the single-process arithmetic runs, each rank keeps its shard of the result), so
  projections, norms and factored moments are those of one process, the projector is identical on
  every rank without a broadcast, and the low-rank state (bases, projected moments, counters) is
  replicated: ``optimizer.state_dict()`` on any rank holds all of it. Cost per step and matrix: two
  all-gathers of its size (what FSDP's forward already moves) and one whole matrix and gradient in
  memory at a time. The other parameters take their elementwise AdamW step on the shard.
  ``GaLoreAdamW`` (float32 moments, ``subspace_change="keep"``) projects the shard instead, with no
  gather between refreshes: see :meth:`rankwise.optim.GaLoreAdamW._sharded_low_rank_step`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

from ..core.distributed import is_sharded, whole_parameter
from ..errors import ConfigError, TargetError
from .projectors import KINDS, make_projector

ADAM_STYLES = ("hf", "torch")
SUBSPACE_CHANGES = ("keep", "reset", "reproject")

GROUP_DEFAULTS = {
    "rank": None,                # None: not projected (plain AdamW); int, or float in (0, 1) = fraction
    "update_proj_gap": 200,      # steps between subspace refreshes (T); online_pca: its basis lr is 1/T
    "scale": 1.0,                # α multiplying the projected-back update
    "proj_type": "std",          # side: std/auto (smaller dim), reverse_std, left, right
    "projector": "auto",         # projector kind (rankwise.optim.projectors.KINDS); auto: svd on CPU, else randomized_svd
    "projector_options": None,   # dict of kind options (seed, oversample, power_iters, pca_lr, ...)
    "subspace_change": "keep",   # keep | reset | reproject
    "stagger_refresh": "auto",   # True: parameter i of n refreshes at steps ≡ ⌊i·T/n⌋ (mod T); auto: SVD kinds on GPU
}


def on_accelerator(t: torch.Tensor) -> bool:
    """Whether ``t`` lives on an accelerator (anything but the CPU): decides the ``"auto"`` defaults."""
    return t.device.type != "cpu"


# ---------------------------------------------------------------------- validation
def check_adam_args(owner: str, lr, betas, eps, weight_decay) -> None:
    """Raise :class:`ConfigError` for out-of-range Adam hyperparameters."""
    if not isinstance(lr, (int, float, torch.Tensor)) or not float(lr) >= 0:
        raise ConfigError(f"{owner}: lr={lr!r} must be ≥ 0.")
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ConfigError(f"{owner}: betas={betas!r} must be a pair of floats in [0, 1).") from None
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ConfigError(f"{owner}: betas={betas!r} must both lie in [0, 1).")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ConfigError(f"{owner}: eps={eps!r} must be ≥ 0.")
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ConfigError(f"{owner}: weight_decay={weight_decay!r} must be ≥ 0.")


def check_group(owner: str, group: dict) -> None:
    """Validate the low-rank keys of one param group."""
    i = group.get("_index", "?")
    where = f"{owner} param group {i}"
    rank = group.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float)) or not rank > 0
                             or (isinstance(rank, float) and rank >= 1)):
        raise ConfigError(f"{where}: rank={rank!r} must be None (no projection), a positive int, or a float "
                          "in (0, 1) (that fraction of the projected dimension).")
    gap = group.get("update_proj_gap")
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ConfigError(f"{where}: update_proj_gap={gap!r} must be an int ≥ 1.")
    scale = group.get("scale")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ConfigError(f"{where}: scale={scale!r} must be a finite number > 0.")
    side = group.get("proj_type")
    if side not in ("std", "reverse_std", "auto", "reverse", "left", "right"):
        raise ConfigError(f"{where}: proj_type={side!r} must be 'std' (smaller side), 'reverse_std', 'left' or "
                          "'right' (two-sided 'full' projection is not supported).")
    kind = group.get("projector")
    if kind not in ("auto", *KINDS):
        raise ConfigError(f"{where}: projector={kind!r} must be 'auto' (svd on the CPU, randomized_svd on an "
                          f"accelerator) or one of {KINDS}.")
    opts = group.get("projector_options")
    if opts is not None and not isinstance(opts, dict):
        raise ConfigError(f"{where}: projector_options={opts!r} must be a dict or None.")
    stagger = group.get("stagger_refresh", "auto")
    if not isinstance(stagger, bool) and stagger != "auto":
        raise ConfigError(f"{where}: stagger_refresh={stagger!r} must be True (spread the subspace refreshes of "
                          "the group's matrices over the T steps), False (all on the same steps, as galore-torch) "
                          "or 'auto' (True for the SVD projectors on an accelerator, else False).")
    mode = group.get("subspace_change")
    if mode not in SUBSPACE_CHANGES:
        raise ConfigError(f"{where}: subspace_change={mode!r} must be one of {SUBSPACE_CHANGES}.")
    if mode == "reset" and kind == "online_pca":
        raise ConfigError(f"{where}: subspace_change='reset' with projector='online_pca' would zero the moments at "
                          "every step (Online Subspace Descent moves the basis at every step); use 'keep' (as the "
                          "official code) or 'reproject'.")
    style = group.get("adam_style", "hf")
    if style not in ADAM_STYLES:
        raise ConfigError(f"{where}: adam_style={style!r} must be one of {ADAM_STYLES}.")
    check_adam_args(where, group["lr"], group.get("betas", (0.9, 0.999)), group.get("eps", 0.0),
                    group.get("weight_decay", 0.0))


# ---------------------------------------------------------------------- Adam arithmetic
def adam_moments_(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, betas, style: str) -> None:
    """``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²`` in place (``lerp`` for the torch style, as torch does)."""
    beta1, beta2 = betas
    if style == "torch":
        exp_avg.lerp_(grad, 1 - beta1)
    else:
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def adam_direction(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, group: dict,
                   style: str) -> tuple[torch.Tensor, float]:
    """``(m / denom, step_size)`` so that the Adam update is ``−step_size · m / denom``."""
    beta1, beta2 = group["betas"]
    lr, eps = group["lr"], group["eps"]
    if not group.get("correct_bias", True):
        return exp_avg / exp_avg_sq.sqrt().add_(eps), lr
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    if style == "torch":
        denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)
        return exp_avg / denom, lr / bc1
    return exp_avg / exp_avg_sq.sqrt().add_(eps), lr * math.sqrt(bc2) / bc1


def apply_update_(p: torch.Tensor, direction: torch.Tensor, step_size: float, group: dict, decay: str) -> None:
    """``p ← p − step_size · direction`` with decoupled weight decay ``lr·λ`` applied ``"before"`` or
    ``"after"`` the update."""
    wd = group.get("weight_decay", 0.0)
    if wd and decay == "before":
        p.mul_(1 - group["lr"] * wd)
    p.add_(direction.view_as(p), alpha=-step_size)
    if wd and decay == "after":
        p.add_(p, alpha=-group["lr"] * wd)


def adamw_step_(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """One plain AdamW step on ``p`` (the fallback for non-matrix parameters), in the group's style.
    State: ``step`` (int), ``exp_avg``, ``exp_avg_sq`` (same shape as ``p``)."""
    style = group.get("adam_style", "hf")
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1
    if style == "torch" and group.get("weight_decay", 0.0):
        p.mul_(1 - group["lr"] * group["weight_decay"])
    adam_moments_(state["exp_avg"], state["exp_avg_sq"], grad, group["betas"], style)
    direction, step_size = adam_direction(state["exp_avg"], state["exp_avg_sq"], state["step"], group, style)
    apply_update_(p, direction, step_size, group, "after" if style == "hf" else "none")


# ---------------------------------------------------------------------- subspace change
def carry_moments_(state: dict, keys: Iterable[str], side: str, old_thin: torch.Tensor, new_thin: torch.Tensor,
                   mode: str, second_moment_keys: Iterable[str] = ("exp_avg_sq",)) -> None:
    """Move the low-rank moments ``state[k]`` from the old basis to the new one (see module docstring).

    ``old_thin`` / ``new_thin`` are the stored layouts (left: ``P`` m×r; right: ``Qᵀ`` r×n)."""
    if mode == "keep":
        return
    present = [k for k in keys if k in state]
    if mode == "reset":
        for k in present:
            state[k].zero_()
        state["moment_step_offset"] = state.get("step", 0)
        return
    second = set(second_moment_keys)
    if side == "left":
        rot = new_thin.t() @ old_thin.to(new_thin.dtype)          # (r × r): P_newᵀ P_old
        for k in present:
            t = state[k]
            r = rot.to(t.dtype)
            t.copy_((r * r) @ t if k in second else r @ t)
    else:
        rot = old_thin.to(new_thin.dtype) @ new_thin.t()          # (r × r): Q_oldᵀ Q_new
        for k in present:
            t = state[k]
            r = rot.to(t.dtype)
            t.copy_(t @ (r * r) if k in second else t @ r)


# ---------------------------------------------------------------------- base optimizer
def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D matrix (``(shape[0], -1)``) for projection."""
    return t if t.ndim == 2 else t.reshape(t.shape[0], -1)


class LowRankOptimizer(torch.optim.Optimizer):
    """Base class: validation, projector bookkeeping, and the step loop.

    Subclasses implement :meth:`_low_rank_step` and may override :meth:`_fallback_step`."""

    owner = "LowRankOptimizer"

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["_index"] = len(self.param_groups) - 1
        check_group(self.owner, group)
        self._check_group_extra(group)

    def _check_group_extra(self, group: dict) -> None:
        """Hook for subclass-specific group keys."""

    @staticmethod
    def is_low_rank(p: torch.Tensor, group: dict) -> bool:
        return group.get("rank") is not None and p.ndim >= 2

    # ------------------------------------------------------------------ projectors
    def _param_index(self, p) -> int:
        p = self._identity(p)
        index = getattr(self, "_pindex", None)
        if index is None:
            index = {}
            for g in self.param_groups:
                for q in g["params"]:
                    index.setdefault(id(q), len(index))
            self._pindex = index
        return index.setdefault(id(p), len(index))

    @staticmethod
    def projector_kind(p: torch.Tensor, group: dict, state: dict) -> str:
        """The projector kind of ``p``: the group's, with ``"auto"`` resolved on ``p``'s device the first
        time (``"svd"`` on the CPU, ``"randomized_svd"`` elsewhere) and kept as the bool
        ``state["proj_randomized"]`` (torch's ``load_state_dict`` would mangle a string)."""
        kind = group["projector"]
        if kind != "auto":
            return kind
        if "proj_randomized" not in state:
            state["proj_randomized"] = on_accelerator(p)
        return "randomized_svd" if state["proj_randomized"] else "svd"

    def projector_kwargs(self, p: torch.Tensor, group: dict, state: dict | None = None) -> dict:
        """Keyword options for the projector of ``p``; random kinds get a per-parameter seed
        ``projector_options['seed'] + index of p`` unless the options give one per parameter."""
        opts = dict(group.get("projector_options") or {})
        kind = group["projector"] if state is None else self.projector_kind(p, group, state)
        if kind in ("random", "randomized_svd"):
            opts["seed"] = int(opts.get("seed", 0)) + self._param_index(p)
        return opts

    def make_projector(self, p: torch.Tensor, group: dict, state: dict):
        return make_projector(self.projector_kind(p, group, state), group["rank"], side=group["proj_type"],
                              update_gap=group["update_proj_gap"], scale=group["scale"], state=state,
                              shape=as_matrix(p).shape, **self.projector_kwargs(p, group, state))

    def refresh_offset(self, p: torch.Tensor, group: dict, state: dict) -> int:
        """Step offset of ``p``'s subspace refreshes: ``⌊i·T / n⌋`` for the ``i``-th of the group's ``n``
        projected parameters when the group sets ``stagger_refresh`` (stored in ``state["proj_offset"]``
        the first time), else 0 (see the module docstring)."""
        if "proj_offset" in state:
            return int(state["proj_offset"])
        stagger = group.get("stagger_refresh", "auto")
        if stagger == "auto":  # the SVD kinds on an accelerator: the refreshes that cost
            stagger = on_accelerator(p) and self.projector_kind(p, group, state) in ("svd", "randomized_svd")
        if not stagger:
            state["proj_offset"] = 0
            return 0
        slot = self.__dict__.get("_stagger_slot")  # set by rw.optim.layerwise: (index, count) over its optimizers
        if slot is None:
            low = [q for q in group["params"] if self.is_low_rank(q, group)]
            slot = (next(k for k, q in enumerate(low) if q is self._identity(p)), len(low))
        i, n = slot
        state["proj_offset"] = i * int(group["update_proj_gap"]) // n
        return state["proj_offset"]

    def projector(self, p: torch.Tensor, group: dict, state: dict):
        """The projector of ``p``, bound to its current state dict (rebuilt after ``load_state_dict``)."""
        self.refresh_offset(p, group, state)  # the projector reads state["proj_offset"] in due()
        cache = self.__dict__.setdefault("_projectors", {})
        key = id(self._identity(p))
        proj = cache.get(key)
        if proj is None or proj.state is not state:
            proj = self.make_projector(p, group, state)
            cache[key] = proj
        return proj

    def refresh_projector(self, p, group, state, grad2d, moment_keys=("exp_avg", "exp_avg_sq")):
        """Refresh the projector if due and carry the moments per ``subspace_change``; returns it."""
        proj = self.projector(p, group, state)
        mode = group["subspace_change"]
        old = proj._thin() if mode != "keep" and proj._thin_known() else None
        changed = proj.update(grad2d, state["step"])
        if changed and old is not None:
            carry_moments_(state, moment_keys, proj.side, old, proj._thin(), mode)
        return proj

    @staticmethod
    def bias_step(state: dict) -> int:
        """Step count for the bias correction (restarts after a ``"reset"`` subspace change)."""
        return state["step"] - state.get("moment_step_offset", 0)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"{self.owner}: sparse gradients are not supported (parameter of shape "
                                    f"{tuple(p.shape)}); use dense embeddings.")
                state = self.state[p]
                if not self.is_low_rank(p, group):
                    self._fallback_step(p, group, state)  # elementwise: runs on an FSDP2 shard as it is
                    continue
                if is_sharded(p) and self._sharded_low_rank_step(p, group, state):
                    continue  # projected shard by shard (GaLoreAdamW)
                with whole_parameter(p) as w:  # FSDP2 shard: the whole matrix (see the module docstring)
                    self._whole = {id(w): p}
                    try:
                        self._low_rank_step(w, group, state)
                    finally:
                        self._whole = {}
        return loss

    def _sharded_low_rank_step(self, p, group, state) -> bool:
        """Step an FSDP2 shard ``p`` without gathering it, if this optimizer can; return whether it did
        (else the step runs on the whole matrix, see the module docstring)."""
        return False

    def _identity(self, p: torch.Tensor) -> torch.Tensor:
        """The parameter ``p`` stands for (itself, or the sharded parameter whose whole copy it is)."""
        return self.__dict__.get("_whole", {}).get(id(p), p)

    def _low_rank_step(self, p, group, state):  # pragma: no cover - abstract
        raise NotImplementedError

    def _fallback_step(self, p, group, state):
        adamw_step_(p, p.grad, state, group)

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but every state tensor keeps the dtype it was
        saved with (torch casts them all to the parameter's dtype, which would turn 8-bit codes and
        int64 indices into floats)."""
        saved = {pid: {k: v.dtype for k, v in st.items() if isinstance(v, torch.Tensor)}
                 for pid, st in state_dict.get("state", {}).items()}
        super().load_state_dict(state_dict)
        index = [p for g in self.param_groups for p in g["params"]]
        for pid, dtypes in saved.items():
            st = self.state.get(index[pid]) if isinstance(pid, int) and pid < len(index) else None
            if st is None:
                continue
            for k, dt in dtypes.items():
                if isinstance(st.get(k), torch.Tensor) and st[k].dtype != dt:
                    st[k] = st[k].to(dt)
        self.__dict__.pop("_projectors", None)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.pop("_projectors", None)
        self.__dict__.pop("_pindex", None)


# ---------------------------------------------------------------------- 8-bit block-wise state
_QMAPS: dict[tuple[bool, str], torch.Tensor] = {}


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256 sorted values of the 8-bit dynamic data type (Dettmers, 2015; bitsandbytes' ``dynamic``).

    With 7 non-sign bits and up to 7 exponent bits, exponent level ``i = 0..6`` covers the decade
    ``10^(i−6)`` with ``2^i`` (signed) or ``2^(i+1)`` (unsigned) linearly spaced fractions — the
    midpoints of ``linspace(0.1, 1, ·)``, scaled in float32 — mirrored for negatives when signed;
    plus 0 and 1. (The signed map therefore spans ``[−0.993, 1]``.)"""
    values = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        n = 2 ** i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1, n + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0 * (10 ** (i - 6))
        values += [mids, -mids] if signed else [mids]
    return torch.cat(values).sort().values


def qmap(signed: bool, device) -> torch.Tensor:
    """Cached :func:`dynamic_map` on ``device``."""
    key = (signed, str(device))
    if key not in _QMAPS:
        _QMAPS[key] = dynamic_map(signed).to(device)
    return _QMAPS[key]


_LUT_SIZE = 65536
_LUTS: dict[tuple[int, str], torch.Tensor] = {}


def _lut(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU lookup table: for each of 65536 evenly spaced points ``−1 + 2i/65535`` the
    index of the code whose midpoint interval holds it."""
    key = (hash(tuple(code.tolist())), str(code.device))
    if key not in _LUTS:
        mids = 0.5 * (code[:-1] + code[1:])
        grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)) / (_LUT_SIZE - 1)
        _LUTS[key] = torch.searchsorted(mids, grid, right=False).to(torch.uint8)
    return _LUTS[key]


ROUNDINGS = ("nearest", "lut")

_BUCKET_SHIFT = 14  # buckets = the top 18 bits of a float32 (sign, exponent, 9 mantissa bits)
_BUCKETS: dict[tuple[int, str], torch.Tensor | None] = {}


def _nearest_exact(x: torch.Tensor, code: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """``left`` or ``left + 1``, whichever code is nearer to ``x`` (ties: the lower one)."""
    left = left.clamp(0, code.numel() - 2)
    return left + ((x - code[left + 1]).abs() < (x - code[left]).abs())


def _bucket_table(code: torch.Tensor) -> torch.Tensor | None:
    """For each float32 bucket (top 18 bits) the nearest code of the bucket's smallest value, if the
    nearest code of every value in the bucket is that one or the next (true for the dynamic maps,
    whose codes are ≥ 0.7% apart relative to their magnitude while a bucket spans 0.2%); else ``None``."""
    key = (hash(tuple(code.tolist())), str(code.device))
    if key not in _BUCKETS:
        import numpy as np

        bits = np.arange(1 << (32 - _BUCKET_SHIFT), dtype=np.uint32) << _BUCKET_SHIFT
        ends = [torch.from_numpy(b.view(np.float32).copy()) for b in (bits, bits | ((1 << _BUCKET_SHIFT) - 1))]
        lo, hi = torch.minimum(*ends).clamp(-1, 1), torch.maximum(*ends).clamp(-1, 1)
        ok = ~(lo.isnan() | hi.isnan())
        c = code.cpu()

        def nearest(v):
            return _nearest_exact(v, c, torch.searchsorted(c, v, right=True) - 1)

        k_lo = torch.where(ok, nearest(torch.where(ok, lo, 0)), 0)
        k_hi = torch.where(ok, nearest(torch.where(ok, hi, 0)), 0)
        _BUCKETS[key] = k_lo.to(code.device) if bool(((k_hi - k_lo) <= 1).all()) else None
    return _BUCKETS[key]


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block_size: int,
                       rounding: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit block-wise quantization: each block of ``block_size`` consecutive values is divided by
    its absolute maximum and mapped to an index into ``code`` (256 sorted values).

    ``rounding="nearest"``: the nearest code value (ties to the lower one), as bitsandbytes' CUDA
    kernel. The round-trip error of a value is then at most half the gap between the two codes
    around it, times the block's absmax. (Found with a table over the top 18 bits of the float32
    value that narrows the choice to two neighbouring codes, then one exact comparison.)
    ``"lut"``: bitsandbytes' CPU kernel — the normalised value ``x·(1/absmax)`` is first snapped to
    a grid of 65536 points on ``[−1, 1]`` (spacing ``3.05e-5``) and the grid point's nearest code
    is taken; near zero, where codes are closer than the grid, this is coarser than ``"nearest"``.

    Returns ``(q uint8 same shape as x, absmax float32 (ceil(numel/block_size),))``."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // block_size)
    pad = blocks * block_size - n
    padded = torch.nn.functional.pad(flat, (0, pad)) if pad else flat
    view = padded.view(blocks, block_size)
    absmax = view.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    if rounding == "lut":
        normed = (view * (1.0 / safe).unsqueeze(1)).clamp_(-1, 1).reshape(-1)[:n]
        grid = ((normed + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int64)
        q = _lut(code)[grid].long()
    else:
        normed = (view / safe.unsqueeze(1)).clamp_(-1, 1).reshape(-1)[:n]
        table = _bucket_table(code)
        if table is not None:
            buckets = (normed.view(torch.int32) >> _BUCKET_SHIFT) & ((1 << (32 - _BUCKET_SHIFT)) - 1)
            q = _nearest_exact(normed, code, table[buckets.long()])
        else:
            q = _nearest_exact(normed, code, torch.searchsorted(code, normed, right=True) - 1)
    q = torch.where(absmax.repeat_interleave(block_size)[:n] > 0, q, torch.zeros_like(q))
    return q.to(torch.uint8).view(x.shape), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block_size: int,
                         dtype=torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[q] · absmax[block]``."""
    vals = code[q.reshape(-1).long()]
    n = vals.numel()
    if n % block_size == 0:
        return (vals.view(-1, block_size) * absmax.unsqueeze(1)).to(dtype).view(q.shape)
    scale = absmax.repeat_interleave(block_size)[:n]
    return (vals * scale).to(dtype).view(q.shape)


# ---------------------------------------------------------------------- param groups
def _target_match(targets, name: str) -> bool:
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.search(targets, name) is not None
    return any(t in name for t in targets)


#: The default ``targets`` of :func:`param_groups`: matrices inside attention and MLP blocks, by module
#: name (LLaMA ``self_attn`` / ``mlp``, GPT-2 ``attn`` / ``mlp``, BERT ``attention`` / ``intermediate`` /
#: ``layer.N.output``, T5 ``SelfAttention`` / ``DenseReluDense``, ``ffn`` / ``feed_forward``).
RECIPE_TARGETS = (r"(?i)(attn|attention|mlp|ffn|feed_?forward|intermediate|dense_?relu_?dense|"
                  r"\.\d+\.output)(\.|$)")


def default_targets(model: nn.Module):
    """:data:`RECIPE_TARGETS` if some projectable weight matrix of ``model`` is in an attention or MLP
    block (a transformer), else ``None`` — every matrix (an MLP, a CNN, a model with other names)."""
    if any(True for _ in matrix_parameters(model, targets=RECIPE_TARGETS)):
        return RECIPE_TARGETS
    return None


def matrix_parameters(model: nn.Module, *, targets=None, include_embeddings: bool = False):
    """``(name, parameter)`` for the weight matrices that low-rank optimizers project: weights of
    ``nn.Linear``, ``nn.Conv*`` and Hugging Face ``Conv1D`` modules whose name matches ``targets``
    (a regex, or a list of substrings; ``None`` or ``"all"`` = all), plus ``nn.Embedding`` weights when
    ``include_embeddings``. A weight tied to an embedding counts as an embedding."""
    if targets == "all":
        targets = None
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen = set()
    for mname, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, nn.Parameter) or not w.requires_grad or w.ndim < 2 or id(w) in seen:
            continue
        is_emb = id(w) in emb_ids
        kind_ok = is_emb and include_embeddings or (not is_emb and (
            isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or type(module).__name__ == "Conv1D"))
        if kind_ok and _target_match(targets, mname):
            seen.add(id(w))
            yield (f"{mname}.weight" if mname else "weight"), w


def param_groups(model: nn.Module, rank: int | float, *, targets="recipe", include_embeddings: bool = False,
                 update_proj_gap: int = 200, scale: float = 1.0, proj_type: str = "std", **group_options) -> list[dict]:
    """Two param groups for a low-rank optimizer: ``[{"params": rest}, {"params": matrices, "rank": rank, ...}]``.

    ``matrices`` are :func:`matrix_parameters` matching ``targets``; everything else trainable
    (biases, norms, embeddings unless ``include_embeddings``, the output head) goes to the first
    group and takes the AdamW fallback. ``targets="recipe"`` (default) projects the attention and
    MLP matrices only (:data:`RECIPE_TARGETS`), as the GaLore recipe (``target_modules_list =
    ["attn", "mlp"]``), Transformers' ``optim_target_modules`` examples and ``rankwise pretrain`` do;
    a model without attention / MLP module names (an MLP, a CNN) falls back to every weight matrix.
    ``targets=None`` or ``"all"``: every weight matrix, ``lm_head`` included; a regex or a list of
    substrings: those. ``group_options`` (e.g. ``projector="dct"``) are added to the low-rank group."""
    if isinstance(targets, str) and targets == "recipe":
        targets = default_targets(model)
    mats = [p for _, p in matrix_parameters(model, targets=targets, include_embeddings=include_embeddings)]
    if not mats:
        raise TargetError(f"param_groups: no weight matrix of {type(model).__name__} matches targets={targets!r} "
                          "(Linear / Conv / Conv1D weights, embeddings only with include_embeddings=True).")
    ids = {id(p) for p in mats}
    rest, seen = [], set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in ids and id(p) not in seen:
            seen.add(id(p))
            rest.append(p)
    low = {"params": mats, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
           "proj_type": proj_type, **group_options}
    return ([{"params": rest}] if rest else []) + [low]
