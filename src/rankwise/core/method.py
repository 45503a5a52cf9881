"""The method contract: what an adapter method is, written once as code.

A method is a subclass of :class:`Method` (an ``nn.Module``) registered by name with
``@register("name")`` (``core/registry.py``). It adapts one frozen base layer, seen through a
:class:`~rankwise.core.layers.LayerView` as the matrix ``W0 (out × in)``, and gives **two views
of one update**:

* ``forward(x, base_out)`` — the activation view: the adapted layer's output, computed the
  cheap way from the input ``x`` and the base layer's output ``base_out``;
* ``delta_weight()`` — the weight view ``W_adapted − W0``, dense, in the base parameter's layout.

The registry-wide tests check, for every method and every layer kind it declares, that the two
views agree in value *and* in gradient, that merge→unmerge restores ``W0`` within
``merge_atol``, and that the method trains in bfloat16, under autocast and adapts a meta-device
model. A minimal method::

    @dataclass
    class ScaleConfig(AdapterConfig):
        pass

    @register("row_scale")
    class RowScale(Method):
        '''ΔW = diag(d) W0 — a trainable scale per output row (d = 0 at init).'''
        Config = ScaleConfig
        summary = "ΔW = diag(d)·W0"
        reads_base = True

        def __init__(self, view, config, generator=None, calibration=None):
            super().__init__(view, config)
            self.d = nn.Parameter(torch.zeros(view.out_features, **view.factory_kwargs))

        @classmethod
        def num_params(cls, view, config):
            return view.out_features

        def forward(self, x, base_out):
            ...

        def delta_weight(self):
            return self.view.to_param(self.d[:, None] * self.view.weight2d())

Optional capabilities are small protocols (below). A class that implements one implements all of
its members — the registry checks that when the class registers:

* :class:`Calibrated` — data-driven inits: ``calibration_needs`` and ``calibration_options``
  say what ``adapt`` streams from the calibration batches (``core/calibrate.py``); ``plan`` sees
  every targeted layer at once and returns per-module config overrides.
* :class:`RankScheduled` — training-time hooks run by ``rw.rank_step`` / ``rw.rank_regularization``
  (rank allocation, gate pruning, freezing schedules, loss terms).
* :class:`SharedAcrossLayers` — parameters shared by all layers of one adapter (LoTR's factors,
  VeRA's random bases); ``shared`` is called once before the per-layer adapters are built.
* :class:`PeftCodec` — conversion to and from the PEFT adapter format (``io/peft.py``).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from .config import AdapterConfig
from .layers import KINDS, LayerView


class Method(nn.Module):
    """Base class of every adapter method: the defaults each method would otherwise repeat.

    Class attributes (override what differs):

    * ``Config`` — the method's config dataclass (a subclass of ``AdapterConfig``);
    * ``kinds`` — layer kinds it adapts (default: all of ``core.layers.KINDS``);
    * ``summary`` — one line for ``rankwise methods``;
    * ``identity_at_init`` — the adapted layer equals the base layer right after init;
    * ``merge_atol`` — float tolerance within which merge→unmerge restores ``W0``;
    * ``reads_base`` — ``delta_weight()`` reads ``W0`` (merge then keeps the ΔW it added);
    * ``computes_base`` — ``forward(x, None)`` returns the whole output from one product with
      ``W0 + ΔW``, so the layer skips the base matmul (see ``core/adapted.py``);
    * ``deterministic_init`` — the init is a function of ``W0`` alone (every seed gives the same
      adapter);
    * ``default_lr`` — the learning rate measured on the demo task; ``demo_options`` — the
      method's usual hyperparameters for the demo (VeRA's rank 256, say);
    * ``resizes`` — its parameters change shape while training (a rank that grows): it cannot
      train on an FSDP2-sharded model, whose shards are fixed (``rw.rank_step`` /
      ``rw.rank_regularization`` say so instead of failing inside a hook).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[AdapterConfig]]
    kinds: ClassVar[tuple[str, ...]] = KINDS
    summary: ClassVar[str] = ""
    identity_at_init: ClassVar[bool] = True
    merge_atol: ClassVar[float] = 1e-5
    reads_base: ClassVar[bool] = False
    computes_base: ClassVar[bool] = False
    deterministic_init: ClassVar[bool] = False
    default_lr: ClassVar[float] = 1e-3
    demo_options: ClassVar[dict[str, Any]] = {}

    # optional capabilities default to absent (None / empty); see the protocols below
    calibration_needs: ClassVar[tuple[str, ...]] = ()
    calibration_options = None
    plan = None
    resizes: ClassVar[bool] = False
    on_step = None
    rank_regularization = None
    shared = None
    peft_type: ClassVar[str | None] = None

    def __init__(self, view: LayerView, config: AdapterConfig):
        super().__init__()
        self.view, self.config = view, config

    # ---- the two views (required) -----------------------------------------------------------
    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def num_params(cls, view: LayerView, config: AdapterConfig) -> int:
        """Trainable parameters this method adds to one layer (shared tensors counted once)."""
        raise NotImplementedError

    # ---- optional per-adapter hooks (no-ops by default) ---------------------------------------
    def loaded(self) -> None:
        """Runs after ``rw.load`` copied this adapter's tensors (rebuild derived buffers)."""

    def finish_warmup(self) -> None:
        """Jump past a training-time schedule (SingLoRA's ramp); tests call it before comparing."""


# ---- optional capabilities ------------------------------------------------------------------
@runtime_checkable
class Calibrated(Protocol):
    """A data-driven init: what to collect, and a plan over all targeted layers."""

    calibration_needs: tuple[str, ...]  # "input_cov" | "input_svd" | "grad"

    @classmethod
    def calibration_options(cls, config) -> dict: ...


@runtime_checkable
class RankScheduled(Protocol):
    """Training-time hooks: ``on_step(model, name, step, optimizers, total_steps) -> info`` after
    each optimizer step, and/or ``rank_regularization(model, name) -> loss term``."""

    @classmethod
    def on_step(cls, model, name, step, optimizers, total_steps): ...


@runtime_checkable
class SharedAcrossLayers(Protocol):
    """``shared(views, config, generator) -> nn.Module | None``, built once per adapter."""

    @classmethod
    def shared(cls, views, config, generator): ...


@runtime_checkable
class PeftCodec(Protocol):
    """Export to the PEFT adapter format: ``peft_type`` with ``to_peft_config`` and ``peft_tensors``.
    Import (optional): ``peft_accepts`` with ``from_peft_config`` and ``load_peft_tensors``."""

    peft_type: str

    @classmethod
    def to_peft_config(cls, config, views) -> dict: ...
    def peft_tensors(self) -> dict[str, torch.Tensor]: ...


PEFT_EXPORT = ("to_peft_config", "peft_tensors")
PEFT_IMPORT = ("peft_accepts", "from_peft_config", "load_peft_tensors")
CALIBRATION_NEEDS = ("input_cov", "input_svd", "grad")


def check_contract(cls: type, name: str) -> None:
    """Raise ``TypeError`` naming what ``cls`` lacks to be registered as method ``name``."""

    def fail(msg: str):
        raise TypeError(f"method class {cls.__name__} registered as '{name}': {msg}")

    def has(members):
        return [m for m in members if callable(getattr(cls, m, None))]

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        fail("subclass rankwise.core.method.Method.")
    cfg = getattr(cls, "Config", None)
    if not (isinstance(cfg, type) and issubclass(cfg, AdapterConfig) and dataclasses.is_dataclass(cfg)):
        fail("set Config to a dataclass subclassing AdapterConfig.")
    for attr in ("forward", "delta_weight", "num_params"):
        if inspect.getattr_static(cls, attr) is inspect.getattr_static(Method, attr):
            fail(f"implement '{attr}'.")
    bad = set(cls.kinds) - set(KINDS)
    if not cls.kinds or bad:
        fail(f"kinds={cls.kinds!r}: use a non-empty subset of {KINDS}.")
    if not cls.summary or not inspect.getdoc(cls):
        fail("give a one-line `summary` and a docstring with the math and the paper.")
    if not (isinstance(cls.merge_atol, float) and cls.merge_atol >= 0):
        fail(f"merge_atol={cls.merge_atol!r} must be a float ≥ 0.")
    needs = tuple(cls.calibration_needs)
    if set(needs) - set(CALIBRATION_NEEDS):
        fail(f"calibration_needs={needs!r}: use entries of {CALIBRATION_NEEDS}.")
    if cls.calibration_options is not None and not needs:
        fail("defines calibration_options but no calibration_needs.")
    if cls.peft_type is None and has(PEFT_EXPORT + PEFT_IMPORT):
        fail(f"has PEFT codec members {has(PEFT_EXPORT + PEFT_IMPORT)} but no peft_type; set it or drop them.")
    if cls.peft_type is not None and len(has(PEFT_EXPORT)) != len(PEFT_EXPORT):
        fail(f"sets peft_type={cls.peft_type!r} but lacks {sorted(set(PEFT_EXPORT) - set(has(PEFT_EXPORT)))}.")
    if has(("peft_accepts",)) and len(has(PEFT_IMPORT)) < len(PEFT_IMPORT):
        fail(f"defines peft_accepts, so PEFT import needs all of {PEFT_IMPORT}; it has only {has(PEFT_IMPORT)}.")
