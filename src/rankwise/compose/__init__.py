"""Mixtures of low-rank experts on a model: build one over trained adapters, mask experts, collapse.

The mixture layer itself is the registered method ``"mole"`` (``rankwise/methods/mole.py``: the math,
the routers and the papers), so a mixture adapts, trains, saves and reloads like any method::

    rw.adapt(model, "mole", **compose.preset("mixlora"), rank=4, experts=8)   # fresh experts, top-2 routing
    rw.train(...)                                                              # adds the load-balance loss

    compose.mixture(model, ["math", "code", "prose"], "mole")   # MoLE: gates over three trained LoRAs
    compose.mask_experts(model, "mole", drop=["code"])          # inference without one: weights renormalized
    compose.collapse(model, "mole", "mole_lora")                # input-independent routing → a plain LoRA

:func:`mixture` reads each input adapter through ``rankwise.combine.engine.layer_inputs`` (LoRA's own
factors, any other method's weight view as exact SVD factors), so experts of any method and rank
join one mixture; a module some input does not adapt holds a zero expert for it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..combine.engine import Factors, build_lora, check_inputs, head_states, layer_inputs
from ..core.api import adapt, adapted_layers, adapter_state, exact_targets
from ..errors import AdapterExistsError, AdapterNotFoundError, ConfigError, close_names
from ..methods.mole import Mole, MoleConfig

__all__ = ["PRESETS", "collapse", "mask_experts", "mixture", "mixture_layers", "preset"]

#: Options of ``"mole"`` that reproduce each paper's mixture (combine with ``rank=``, ``experts=``).
PRESETS: dict[str, dict] = {
    "mole": {"router": "layer"},
    "xlora": {"router": "token"},
    "mixlora": {"router": "topk", "top_k": 2, "balance": 0.01},
    "hydralora": {"router": "token", "shared_a": True},
    "smora": {"router": "topk", "rank": 1, "experts": 16, "top_k": 4, "balance": 0.01},
    "mola": {"router": "topk", "top_k": 2, "expert_schedule": [2, 4, 6, 8], "balance": 0.01},
}


def preset(name: str, **overrides) -> dict:
    """The ``"mole"`` options of a named mixture (:data:`PRESETS`), with ``overrides`` on top."""
    if name not in PRESETS:
        raise ConfigError(f"unknown mixture preset {name!r}; choose one of {sorted(PRESETS)}." + close_names(name, PRESETS))
    return {**PRESETS[name], **overrides}


def mixture_layers(model: nn.Module, name: str) -> list[tuple[str, Mole]]:
    """``(module name, Mole adapter)`` of mixture adapter ``name``, in module order."""
    state = adapter_state(model)
    if name not in state:
        raise AdapterNotFoundError(f"model has no adapter '{name}'; it has {sorted(state) or 'none'}."
                                   + close_names(str(name), state))
    if state[name]["config"].method != "mole":
        raise ConfigError(f"adapter '{name}' is a {state[name]['config'].method} adapter, not a mixture (method "
                          "'mole'); build one with rw.adapt(model, 'mole', ...) or compose.mixture(...).")
    return [(n, layer.adapters[name]) for n, layer in adapted_layers(model) if name in layer.adapters]


# ---- MoLE over trained adapters ----------------------------------------------------------------
MIXTURE_OPTIONS = ("router", "top_k", "temperature", "balance", "train_experts", "dropout", "modules_to_save")


def mixture(model: nn.Module, adapters, name: str = "mixture", *, router: str = "layer",
            train_experts: bool = False, generator=None, seed: int | None = None, **options) -> nn.Module:
    """Add mixture adapter ``name`` whose experts are the trained adapters ``adapters`` (MoLE, Wu et al.
    2024): expert ``e`` of every module is exactly adapter ``adapters[e]``'s update there, and only the
    router trains (``train_experts=False``, as MoLE). ``router`` and ``options`` (``top_k``,
    ``temperature``, ``balance``, ``dropout``, ``modules_to_save``) are ``"mole"``'s. The mixture becomes
    the active adapter; the inputs stay as they were. With ``router="layer"`` it starts as the mean of
    the experts (gates ``0``: weights ``1/E``).

    Bad input — an empty list, an unknown adapter, a name in use, an option ``"mole"`` does not take
    here, ``top_k`` above the number of adapters, adapters that do not fit their modules (another
    base model) — raises before anything changes.
    """
    adapters = check_inputs(model, adapters, name, "mixture", "an expert", "['math', 'code']")
    if len(set(adapters)) != len(adapters):
        raise ConfigError(f"adapters={adapters} names an adapter twice; give each expert once.")
    bad = sorted(set(options) - set(MIXTURE_OPTIONS))
    if bad:
        raise ConfigError(f"mixture() takes no option(s) {bad} (the experts set rank, experts and shared A); "
                          f"its options are {sorted(MIXTURE_OPTIONS)}." + close_names(bad[0], MIXTURE_OPTIONS))
    # every input's factors, module by module (ShapeMismatchError for adapters of another model)
    per_module = {inp.name: inp for inp in layer_inputs(model, adapters, [1.0] * len(adapters))}
    ranks = {m: max(1, max(f.rank for f in inp.factors)) for m, inp in per_module.items()}
    rank = max(ranks.values())
    config = MoleConfig(rank=rank, experts=len(adapters), router=router, train_experts=train_experts,
                        expert_names=list(adapters), targets=exact_targets(list(per_module)), **options)
    overrides = {m: {"rank": r} for m, r in ranks.items() if r != rank}
    adapt(model, config, name=name, generator=generator, seed=seed, module_overrides=overrides or None)
    layers = dict(adapted_layers(model))
    with torch.no_grad():
        for m, inp in per_module.items():
            ad = layers[m].adapters[name]
            r = ad.rank
            ad.experts_A.zero_()
            ad.experts_B.zero_()
            for a, f in zip(inp.names, inp.factors):
                e = adapters.index(a)
                ad.experts_A[e * r:e * r + f.rank].copy_(f.A.to(ad.experts_A))
                ad.experts_B[:, e * r:e * r + f.rank].copy_(f.B.to(ad.experts_B))
    return model


# ---- inference-time masking ------------------------------------------------------------------------
def mask_experts(model: nn.Module, name: str, keep=None, drop=None) -> nn.Module:
    """Switch experts of mixture ``name`` on and off (MoLE's inference mode): ``keep`` (the experts to use)
    or ``drop`` (those to leave out), as indices or as the expert names :func:`mixture` recorded;
    neither turns every expert back on. The routing weights of the kept experts are renormalized to
    sum to 1 (``g'_e = g_e / Σ_kept g_j``), so no retraining is needed."""
    import torch

    layers = mixture_layers(model, name)
    if keep is not None and drop is not None:
        raise ConfigError("mask_experts: give keep= or drop=, not both.")
    plans = []
    for mname, ad in layers:
        e = ad.n_experts
        names = ad.config.expert_names or [str(i) for i in range(e)]

        def index(x, mname=mname, names=names, e=e):
            if isinstance(x, str) and x in names:
                return names.index(x)
            if isinstance(x, int) and not isinstance(x, bool) and 0 <= x < e:
                return x
            raise ConfigError(f"module '{mname}' of mixture '{name}' has experts {names} (indices 0..{e - 1}); "
                              f"{x!r} is neither.")

        chosen = keep if keep is not None else drop
        if chosen is not None and (isinstance(chosen, (str, int)) or not hasattr(chosen, "__iter__")):
            chosen = [chosen]
        idx = {index(x) for x in (chosen or [])}
        mask = [i in idx for i in range(e)] if keep is not None else [i not in idx for i in range(e)]
        if not any(mask):
            raise ConfigError(f"mask_experts would switch off every expert of module '{mname}' in mixture '{name}'; "
                              "keep at least one.")
        plans.append((ad, mask))
    for ad, mask in plans:
        ad.expert_mask.copy_(torch.tensor(mask, dtype=torch.bool, device=ad.expert_mask.device))
    return model


# ---- collapse --------------------------------------------------------------------------------------
def collapse(model: nn.Module, name: str, into: str | None = None) -> nn.Module:
    """Add LoRA adapter ``into`` (default ``"<name>_lora"``) equal to mixture ``name``
    where its routing does not depend on the input (``router="layer"``, or a router whose weight is
    zero and keeps every expert): per module ``ΔW = s · Σ_e g_e B_e A_e``, exactly, as LoRA factors
    (``combine.engine.build_lora``; rank ``E·r``, re-factored exactly where the module is smaller).
    The LoRA becomes the active adapter and merges, saves and exports to PEFT like any. A mixture that
    routes per token anywhere is refused (naming the modules), the model unchanged."""
    layers = mixture_layers(model, name)
    into = f"{name}_lora" if into is None else into
    state = adapter_state(model)
    if not isinstance(into, str) or not into or "." in into or "/" in into:
        raise ConfigError(f"into={into!r}: the LoRA's name must be a non-empty string without '.' or '/'.")
    if into in state:
        raise AdapterExistsError(f"model already has an adapter named '{into}'; pass another into=....")
    results, routed = {}, []
    with torch.no_grad():
        for mname, ad in layers:
            g = ad.constant_weights()
            if g is None:
                routed.append(mname)
                continue
            a, b = ad._folded(g)
            results[mname] = Factors(b.float() * ad.scale, a.float())
    if routed:
        raise ConfigError(f"mixture '{name}' routes per token on {len(routed)} module(s) ({routed[:3]}…), so it "
                          "is not one LoRA; only a mixture whose routing does not depend on the input collapses "
                          "(router='layer', or a zero router weight).")
    return build_lora(model, into, results, head_states(model, [name], [1.0]),
                      record={"method": "collapse", "adapters": [name], "weights": None, "options": {}})
