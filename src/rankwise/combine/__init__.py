"""Combine adapters into a new one: ``rw.combine(model, adapters, weights, name, method=..., **options)``.

    rw.load(model, "math/", names="math"); rw.import_peft(model, "code_peft/", name="code")
    rw.combine(model, ["math", "code"], [0.6, 0.4], "both", method="ties_svd", density=0.5, rank=16)
    rw.save(model, "both/", names="both"); rw.export_peft(model, "both_peft/", name="both")

The inputs are adapters already on ``model`` (any registered methods, any ranks). The result is a new
LoRA adapter ``name`` (scale 1) whose ``ΔW`` is exactly what the chosen combination gives, made
active like a freshly adapted one; the inputs stay as they were. Nothing changes on the model when
any input is bad: unknown adapter or method, empty list, weights of the wrong length, ``density``
outside ``(0, 1]``, an option the method does not take, or adapters that do not fit their modules.

Methods (:func:`methods` lists them with a summary; each module's docstring gives the math and
the paper): ``linear``, ``cat``, ``svd``, ``peft_linear`` (``linear.py``); ``ties``, ``dare_linear``,
``dare_ties``, ``magnitude_prune``, their ``_svd`` forms and ``peft_*`` factor-wise variants
(``ties.py``); ``iso_c``, ``iso_cts`` (``iso.py``); ``knots`` (``knots.py``); ``lora_lego``
(``lora_lego.py``); ``soup``, ``greedy_soup`` (``soups.py``).

Options common to several methods: ``rank`` (target rank of the ``_svd``-style re-factoring),
``density`` (fraction of entries kept by TIES / DARE / magnitude pruning, in ``(0, 1]``),
``majority_sign_method`` (``"total"`` or ``"frequency"``), and for every method ``generator`` /
``seed`` (random draws: DARE, k-means; default torch's global generator, as PEFT) and ``progress``.
``modules_to_save`` of the inputs (classifier heads) are combined by task arithmetic,
``θ_orig + Σ_t w_t (θ_t − θ_orig)``, whatever the method.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ..core.api import adapted_layers
from ..errors import ConfigError, close_names
from . import eigenlora, iso, knots, linear, lora_lego, soups, ties
from .engine import REQUIRED, build_lora, check_inputs, head_states, layer_inputs

_FAMILIES = (linear, ties, iso, knots, lora_lego, soups, eigenlora)
METHODS: dict[str, tuple] = {}
for _mod in _FAMILIES:
    METHODS.update(_mod.METHODS)

SIGN_METHODS = ("total", "frequency")

__all__ = ["combine", "methods"]


def methods() -> dict[str, str]:
    """Combination method names and one-line summaries."""
    return {name: spec[2] for name, spec in METHODS.items()}


# ---- validation ---------------------------------------------------------------------------------
def _check_options(method: str, defaults: dict, given: dict) -> dict:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"combine method '{method}' takes no option(s) {unknown}; its options are "
                          f"{sorted(defaults) or 'none'}." + close_names(unknown[0], defaults))
    opts = {**defaults, **given}
    missing = sorted(k for k, v in opts.items() if v is REQUIRED)
    if missing:
        raise ConfigError(f"combine method '{method}' needs {missing}, e.g. density=0.5 (the fraction of "
                          "entries each update keeps).")
    if "density" in opts:
        d = opts["density"]
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0 < d <= 1:
            raise ConfigError(f"density={d!r}: give the fraction of entries to keep, a number in (0, 1] "
                              "(1 keeps everything).")
    if opts.get("rank") is not None:
        r = opts["rank"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError(f"rank={r!r}: give the target rank as an integer ≥ 1, or leave it out.")
    if "majority_sign_method" in opts and opts["majority_sign_method"] not in SIGN_METHODS:
        raise ConfigError(f"majority_sign_method={opts['majority_sign_method']!r}: use one of {SIGN_METHODS}.")
    for mod in _FAMILIES:
        check = getattr(mod, "check_options", None)
        if check is not None:
            check(method, opts)
    return opts


def _check_inputs(model, adapters, weights, name, method, spec) -> tuple[list[str], list[float] | None]:
    if method not in METHODS:
        raise ConfigError(f"unknown combine method {method!r}; choose one of {sorted(METHODS)}."
                          + close_names(str(method), METHODS))
    adapters = check_inputs(model, adapters, name, "combine", "an input", "['task_a', 'task_b']")
    if weights is None:
        if not spec[3:4] == ("uniform",):
            raise ConfigError(f"method '{method}' needs weights, one number per adapter (e.g. "
                              f"{[round(1 / len(adapters), 3)] * len(adapters)}).")
        return adapters, None
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
        raise ConfigError(f"weights={weights!r}: give a list with one number per adapter.")
    weights = list(weights)
    if len(weights) != len(adapters):
        raise ConfigError(f"got {len(weights)} weights for {len(adapters)} adapters {adapters}; give one weight "
                          "per adapter.")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ConfigError(f"weights={weights}: every weight must be a finite number; got {w!r}.")
    return adapters, [float(w) for w in weights]


def _generator(model, generator, seed):
    if generator is not None or seed is None:
        return generator
    dev = next((layer.base.weight.device for _, layer in adapted_layers(model)), torch.device("cpu"))
    return torch.Generator(device=dev).manual_seed(int(seed))


def adapter_rank(layer, adapter: str) -> int:
    """The rank an input adapter has on one layer (LoRA's factor count; else the method's ``rank``)."""
    ad = layer.adapters[adapter]
    a = getattr(ad, "lora_A", None)
    if isinstance(a, torch.Tensor) and a.dim() == 2:
        return a.shape[0]
    r = getattr(ad, "rank", None) or getattr(ad.config, "rank", None)
    return int(r) if isinstance(r, int) and r > 0 else min(layer.view.shape)


def max_rank(model, adapters) -> int:
    return max((adapter_rank(layer, a) for _, layer in adapted_layers(model) for a in adapters
                if a in layer.adapters), default=1)


# ---- the entry point ----------------------------------------------------------------------------
def combine_layers(model, adapters, weights, name, layer_fn, opts, generator=None, progress=False,
                   record=None) -> nn.Module:
    """Run ``layer_fn`` on every module the inputs adapt and add the result as LoRA ``name``."""
    from tqdm.auto import tqdm

    opts = {**opts, "max_rank": max_rank(model, adapters)}
    total = sum(1 for _, layer in adapted_layers(model) if any(a in layer.adapters for a in adapters))
    results = {}
    with torch.no_grad():
        for inp in tqdm(layer_inputs(model, adapters, weights), total=total, disable=not progress,
                        desc=f"combine {name}"):
            results[inp.name] = layer_fn(inp, opts, generator)
        heads = head_states(model, adapters, weights)
    return build_lora(model, name, results, heads, record)


def combine(model: nn.Module, adapters, weights=None, name: str = "combined", *, method: str = "linear",
            generator: torch.Generator | None = None, seed: int | None = None, progress: bool = False,
            **options) -> nn.Module:
    """Add adapter ``name`` to ``model``: the combination of its adapters ``adapters`` with ``weights``
    by ``method`` (see the module docstring and :func:`methods`); return ``model``.

    The result is a LoRA adapter whose update is exactly the combination's; it becomes the active
    adapter (as with ``rw.adapt``) and saves, reloads and exports to PEFT like any LoRA. A bad input
    raises a :mod:`rankwise.errors` exception and leaves the model unchanged.
    """
    spec = METHODS.get(method) if isinstance(method, str) else None
    adapters, weights = _check_inputs(model, adapters, weights, name, method, spec or ())
    opts = _check_options(method, spec[1], options)
    generator = _generator(model, generator, seed)
    record = {"method": method, "adapters": list(adapters), "weights": weights,
              "options": {k: v for k, v in opts.items() if isinstance(v, (int, float, str, type(None)))}}
    if len(spec) > 3:  # a method over whole adapters (soups): it calls combine_layers itself
        return spec[0](model, adapters, weights, name, opts, generator=generator, progress=progress, record=record)
    return combine_layers(model, adapters, weights, name, spec[0], opts, generator, progress, record)
