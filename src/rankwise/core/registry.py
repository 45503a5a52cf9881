"""The method registry: every adapter method registers itself under its name.

A method is an ``nn.Module`` class with:

* ``Config`` — a dataclass subclassing :class:`rankwise.core.config.AdapterConfig`;
* ``kinds`` — the layer kinds it supports (see :mod:`rankwise.core.layers`);
* ``__init__(view, config, generator=None, calibration=None)``;
* ``forward(x, base_out)`` — the activation view: the adapted layer's output;
* ``delta_weight()`` — the weight view ``W_adapted - W0`` in the base parameter's layout;
* ``num_params(view, config)`` (classmethod) — its trainable-parameter formula;
* ``merge_atol`` — the float tolerance within which merge→unmerge restores ``W0``;
* ``reads_base`` — True when ``delta_weight()`` reads ``W0`` (then merge keeps the ΔW it added);
* ``computes_base`` (optional) — True when ``forward(x, None)`` returns the whole layer output from one
  product with ``W0 + ΔW``; the layer then skips the base matmul (see ``core/adapted.py``);
* ``identity_at_init`` — whether the adapted layer equals the base layer right after init;
* ``deterministic_init`` (optional) — True when the init is a function of ``W0`` alone (SVD / LU of
  the base weight): every seed gives the same adapter, and the seed test checks that instead;
* ``finish_warmup()`` (optional method) — jump past a training-time schedule (SingLoRA's ramp-up);
  the property tests call it so the perturbed update is visible;
* ``summary`` (one line) and a docstring with the math and the paper.

Optional: ``shared(views, config, generator)`` (classmethod) — parameters shared between the
layers of one adapter (LoTR's factors, Compacter's Kronecker rules). ``adapt`` calls it once with
the views of all targeted layers, before the per-layer adapters are built, and passes the module
it returns (or None) to every layer's ``__init__`` as ``shared=``; an adapter registers the part it
uses as a submodule, so each shared tensor is one parameter object: the optimizer and
``rw.trainable_parameters`` see it once, ``rw.save`` writes it once and ``rw.load`` copies it once.
``num_params(view, config)`` counts the shared tensors a one-layer model trains with the layer.
``loaded()`` (optional method) runs after ``rw.load`` has copied an adapter's tensors.

Data-driven inits (see ``core/calibrate.py``): ``calibration_needs`` (``"input_cov"``,
``"input_svd"``, ``"grad"``) and optionally ``calibration_options(config)`` say what ``adapt``
collects from the calibration batches; each layer's ``__init__`` gets its ``LayerStats`` as
``calibration`` (``LOAD_STATE`` when its state is loaded right after). ``plan(views, config,
calibration, generator=None)`` (classmethod) sees all targeted layers at once and returns
per-module config overrides (``None`` leaves a module out), which are saved with the adapter.
"""

from __future__ import annotations

from ..errors import MethodNotFoundError, close_names

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: ``@register("lora")`` makes the method available by name."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name '{name}' is already registered by {_REGISTRY[name].__name__}")
        for attr in ("Config", "kinds", "forward", "delta_weight", "num_params"):
            if not hasattr(cls, attr):
                raise TypeError(f"method class {cls.__name__} registered as '{name}' lacks '{attr}'")
        # the very same Config class as another method (a subclass inherits ``method`` but is its own class)
        owner = next((n for n, other in _REGISTRY.items() if n != name and other.Config is cls.Config), None)
        if owner is not None:
            raise TypeError(
                f"method '{name}' reuses the Config class of method '{owner}'; give each method its own "
                "Config subclass (e.g. class MyConfig(LoraConfig): pass)."
            )
        cls.name = name
        cls.Config.method = name
        _REGISTRY[name] = cls
        return cls

    return deco


def get_method(name: str) -> type:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MethodNotFoundError(
            f"no adapter method named '{name}'. Registered: {', '.join(sorted(_REGISTRY))}."
            + close_names(name, _REGISTRY)
        ) from None


def methods() -> list[str]:
    """Names of all registered adapter methods, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    from .. import methods as _  # noqa: F401  (importing registers the built-in methods)
