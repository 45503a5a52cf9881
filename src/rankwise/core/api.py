"""The public adapter API: adapt, set_active, disabled, delete, merge, unmerge, unadapt, summary,
parameter counts."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from ..errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    ConfigError,
    TargetError,
    UnsupportedLayerError,
    close_names,
)
from . import calibrate
from .adapted import AdaptedLayer, TrainedCopies
from .config import AdapterConfig
from .distributed import is_sharded
from .layers import KINDS, LayerView, kind_of
from .registry import get_method

STATE_ATTR = "rankwise_adapters"  # model.__dict__ entry: {adapter name: {"config", "modules"}}
HEAD_NAMES = {"lm_head", "classifier", "score", "cls", "head", "output_layer", "qa_outputs", "output_projection"}


# ---- configs -------------------------------------------------------------------------------
def make_config(method_or_config, **hyper) -> AdapterConfig:
    """A validated config from a method name plus options, or a config plus overrides."""
    if isinstance(method_or_config, AdapterConfig):
        cls = get_method(method_or_config.method)
    elif isinstance(method_or_config, str):
        cls = get_method(method_or_config)
    else:
        raise TypeError(
            f"adapt() takes a method name (one of rw.methods()) or a config such as rw.LoraConfig; "
            f"got {type(method_or_config).__name__}."
        )
    valid = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = set(hyper) - valid
    if unknown:
        raise ConfigError(
            f"method '{cls.name}' got unknown options {sorted(unknown)}; valid options: {sorted(valid)}."
            + close_names(sorted(unknown)[0], valid)
        )
    if isinstance(method_or_config, AdapterConfig):
        return dataclasses.replace(method_or_config, **hyper) if hyper else method_or_config
    return cls.Config(**hyper)


def adapter_state(model: nn.Module) -> dict:
    from .distributed import unwrap  # a DDP wrapper: the records live on the model inside

    return unwrap(model).__dict__.setdefault(STATE_ATTR, {})


def adapted_layers(model: nn.Module) -> Iterable[tuple[str, AdaptedLayer]]:
    for name, m in model.named_modules():
        if isinstance(m, AdaptedLayer):
            yield name, m


def trained_copies(model: nn.Module) -> Iterable[tuple[str, TrainedCopies]]:
    for name, m in model.named_modules():
        if isinstance(m, TrainedCopies):
            yield name, m


def saved_module(model: nn.Module, module_name: str, adapter: str) -> nn.Module:
    """The copy of ``module_name`` that adapter ``adapter`` trains (its ``modules_to_save``)."""
    return model.get_submodule(module_name).copies[adapter]


# ---- targets -------------------------------------------------------------------------------
def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module, not looking inside AdaptedLayer / TrainedCopies wrappers."""
    out, skip = [], None
    for name, m in model.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        if isinstance(m, (AdaptedLayer, TrainedCopies)):
            skip = name + "."
        out.append((name, m))
    return out


def _kind(m: nn.Module) -> str | None:
    return m.view.kind if isinstance(m, AdaptedLayer) else kind_of(m)


def exact_targets(names) -> str:
    """A ``targets`` regex that selects exactly the modules ``names`` (used to rebuild saved adapters)."""
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def _suffix_match(name: str, pats: list[str]) -> str | None:
    for p in pats:
        if name == p or name.endswith("." + p):
            return p
    return None


def _excluded(name: str, exclude) -> bool:
    if exclude is None:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return _suffix_match(name, list(exclude)) is not None


def _output_heads(model: nn.Module, cands) -> set[str]:
    heads = set()
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            emb = getter()
        except Exception:  # some HF models raise NotImplementedError here
            emb = None
        if emb is not None:
            heads |= {n for n, m in cands if m is emb or (isinstance(m, AdaptedLayer) and m.base is emb)}
    heads |= {n for n, _ in cands if n.rsplit(".", 1)[-1] in HEAD_NAMES}
    if not heads and not hasattr(model, "config"):
        # a head some adapter trains (TrainedCopies) is still the model's last layer
        linear = [n for n, m in cands
                  if _kind(m.original if isinstance(m, TrainedCopies) else m) in ("linear", "hf_conv1d")]
        if len(linear) > 1:
            heads.add(linear[-1])
    return heads


# PyTorch modules that read their sublayers' weights directly (F.multi_head_attention_forward,
# the fused inference fast path) instead of calling them: an adapter there would be ignored.
FUSED = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def resolve_targets(model: nn.Module, targets, exclude=None) -> list[str]:
    """Names of the modules ``targets`` selects (see :class:`AdapterConfig`)."""
    cands = _candidates(model)
    names = [n for n, _ in cands if n]
    fused = [(n, type(m).__name__) for n, m in cands if isinstance(m, FUSED)]

    def bypassed_by(n: str):
        inside = [f for f in fused if n.startswith(f[0] + ".") or not f[0]]
        return max(inside, key=lambda f: len(f[0])) if inside else None

    def kind_at(n: str, m: nn.Module) -> str | None:  # layers inside FUSED modules are not adaptable
        return None if bypassed_by(n) else _kind(m)

    if targets == "all-linear":
        heads = _output_heads(model, cands)
        found = [n for n, m in cands if n and kind_at(n, m) in ("linear", "hf_conv1d") and n not in heads]
    elif isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise TargetError(f"targets regex {targets!r} does not compile: {e}. Fix the pattern.") from None
        found = [n for n, m in cands if n and rx.fullmatch(n) and kind_at(n, m) is not None]
        matched = [f"'{n}' ({type(m).__name__})" for n, m in cands if n and rx.fullmatch(n)]
        if not found and matched:
            raise TargetError(
                f"targets regex {targets!r} matches only modules rankwise cannot adapt: "
                f"{', '.join(matched[:5])}{' …' if len(matched) > 5 else ''} (supported kinds: "
                f"{', '.join(KINDS)}). Point it at the layers inside them."
            )
    else:
        pats = list(targets)
        found = []
        by_name = dict(cands)
        for p in pats:
            hits = [n for n, _ in cands if _suffix_match(n, [p])]
            if not hits:
                suffixes = {n.rsplit(".", 1)[-1] for n in names} | set(names)
                raise TargetError(f"target '{p}' matches no module of {type(model).__name__}." + close_names(p, suffixes))
            for n in hits:
                m = by_name[n]
                bypass = bypassed_by(n)
                if bypass and _kind(m) is not None and not _excluded(n, exclude):
                    f, ftype = bypass
                    raise UnsupportedLayerError(
                        f"target '{p}' matched module '{n}' ({type(m).__name__}) inside '{f}', a {ftype}, "
                        "which reads its layers' weights directly instead of calling them, so an adapter "
                        "there would be ignored. Leave it out of targets (exclude=...)."
                    )
                if _kind(m) is None:
                    if any(c.startswith(n + ".") for c in names):
                        continue  # a container such as "attention": its layers may match other targets
                    raise UnsupportedLayerError(
                        f"target '{p}' matched module '{n}', a {type(m).__name__}; rankwise adapts "
                        f"{', '.join(KINDS)} layers. Name a layer of one of these kinds."
                    )
                found.append(n)
    found = [n for n in dict.fromkeys(found) if not _excluded(n, exclude)]
    if not found:
        hint = (" rw.adapt changes a model's submodules in place, so it cannot wrap the model itself: "
                "adapt a container such as nn.Sequential(layer)." if _kind(model) is not None else "")
        raise TargetError(
            f"targets={targets!r} (exclude={exclude!r}) selects no adaptable layer in {type(model).__name__}. "
            "Use 'all-linear', module-name suffixes such as ['query', 'value'], or a regex." + hint
        )
    return found


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ---- adapt ---------------------------------------------------------------------------------
def adapt(
    model: nn.Module,
    method_or_config,
    name: str = "default",
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    calibration=None,
    loss_fn=None,
    module_overrides: dict[str, dict | None] | None = None,
    **hyperparameters,
) -> nn.Module:
    """Add adapter ``name`` to ``model`` in place and return ``model``.

    ``method_or_config`` is a registered method name (``rw.methods()``) with its options as
    keyword arguments, or a config object (``rw.LoraConfig(...)``). The base weights are frozen;
    the new adapter (and ``modules_to_save``) are trainable and it becomes the active adapter.
    Randomness comes from ``generator`` (or ``seed``), so the same seed gives the same adapter.

    Data-driven inits (EVA, CorDA, LoRA-GA …) take ``calibration`` — an iterable of model inputs,
    a :class:`~rankwise.core.calibrate.Batches` with options, or a precomputed
    :class:`~rankwise.core.calibrate.Calibration` — and, for gradient-based ones,
    ``loss_fn(model, batch) -> loss`` (see ``core/calibrate.py``). ``module_overrides`` maps a
    module name to config overrides for that module (``{"layer.0.q": {"rank": 4}}``; ``None``
    leaves the module out); they are applied after the method's own ``plan`` and saved with
    the adapter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"adapt() needs an nn.Module; got {type(model).__name__}.")
    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise ConfigError(f"adapter name {name!r} must be a non-empty string without '.' or '/'.")
    config = make_config(method_or_config, **hyperparameters)
    cls = get_method(config.method)
    state = adapter_state(model)
    if name in state:
        raise AdapterExistsError(
            f"model already has an adapter named '{name}' (method {state[name]['config'].method}). "
            "Pass another name=..., or rw.delete(model, name) first."
        )
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)

    targets = resolve_targets(model, config.targets, config.exclude)
    save_mods = _resolve_modules_to_save(model, config.modules_to_save, targets)

    # Build every adapter before touching the model: a failure leaves it unchanged.
    found = []
    for tname in targets:
        m = model.get_submodule(tname)
        view = m.view if isinstance(m, AdaptedLayer) else LayerView(m, tname)
        view.check_supported(cls.name, cls.kinds)
        if is_sharded(view.weight):
            raise ConfigError(
                f"module '{tname}' is already sharded (FSDP2 fully_shard: its weight is a DTensor of shape "
                f"{tuple(view.weight.shape)}); an adapter added now would be a plain tensor that FSDP does not "
                "manage, so its gradients would not be averaged and the ranks would drift apart. Adapt before "
                "fully_shard (on the meta device for a large model; then rw.load(..., overwrite=True) after "
                "to_empty to load saved values, see docs/distributed.md)."
            )
        if view.quantization is not None and "grad" in cls.calibration_needs:
            raise UnsupportedLayerError(
                f"method '{cls.name}' initializes from the gradient of each target weight, but module '{tname}' "
                f"is a bitsandbytes {view.quantization} layer ({view.out_features}x{view.in_features}), whose packed "
                "weight has no gradient. Use a method that needs no gradient (lora, pissa, dora, eva …), or "
                "initialize on the unquantized model and rw.load the adapter onto the quantized one."
            )
        found.append((tname, m, view))
    # data-driven inits (core/calibrate.py): collect what the method needs, then its per-module plan
    calib = calibrate.prepare(model, cls, config, {t: v for t, _, v in found}, calibration, loss_fn)
    overrides = _module_overrides(cls, config, found, calib, module_overrides, generator)
    found = [f for f in found if not (f[0] in overrides and overrides[f[0]] is None)]
    if not found:
        raise TargetError(f"method '{cls.name}' left out every targeted module (its plan or module_overrides); "
                          "nothing to adapt. Check the calibration data, the rank budget or module_overrides.")
    targets = [t for t, _, _ in found]
    # parameters shared between layers (optional hook, see registry): built once, given to every layer
    share = cls.shared
    shared = None if share is None else share([v for _, _, v in found], config, generator)
    extra = {} if share is None else {"shared": shared}
    built = []
    for tname, m, view in found:
        cfg = config.replace(**overrides[tname]) if overrides.get(tname) else config
        layer_calib = calib[tname] if isinstance(calib, calibrate.Calibration) else calib
        adapter = cls(view, cfg, generator=generator, calibration=layer_calib, **extra)
        adapter.to(device=view.weight.device)
        built.append((tname, m, adapter))
        if isinstance(calib, calibrate.Calibration):
            calib.release(tname)  # e.g. the layer's calibration gradient: peak memory stays near one layer

    # Freeze the base; adapters already on the model (and their modules_to_save) keep their own flags.
    adapter_ids = {id(p) for _, layer in adapted_layers(model) for p in layer.adapters.parameters()}
    adapter_ids |= {id(p) for _, tc in trained_copies(model) for p in tc.copies.parameters()}
    for p in model.parameters():
        if id(p) not in adapter_ids:
            p.requires_grad_(False)
    for tname, m, adapter in built:
        if not isinstance(m, AdaptedLayer):
            m = AdaptedLayer(m, tname, adapter.view)
            _set_module(model, tname, m)
        m.add(name, adapter)
    for mname in save_mods:
        m = model.get_submodule(mname)
        if not isinstance(m, TrainedCopies):
            m = TrainedCopies(m)
            _set_module(model, mname, m)
        m.add(name)
    state[name] = {"config": config, "modules": targets, "modules_to_save": save_mods, "shared": shared,
                   "overrides": {t: dict(ov) for t, ov in overrides.items() if ov}}
    set_active(model, name)
    if _is_hf_model(model):  # model.save_pretrained / set_adapter / disable_adapters … act on these adapters
        from ..integrations.hf import install_hf_methods

        install_hf_methods(model)
    return model


def _is_hf_model(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def _forget_hf_methods(model: nn.Module) -> None:
    if _is_hf_model(model) and not adapter_state(model):
        from ..integrations.hf import uninstall_hf_methods

        uninstall_hf_methods(model)


def _module_overrides(cls, config, found, calib, given, generator=None) -> dict[str, dict | None]:
    """Per-module config overrides: the method's ``plan`` (not when loading a saved state), then
    ``given`` on top. ``None`` for a module leaves it out."""
    names = [t for t, _, _ in found]
    out: dict[str, dict | None] = {}
    plan = cls.plan
    if plan is not None and calib is not calibrate.LOAD_STATE:
        out = dict(plan({t: v for t, _, v in found}, config, calib, generator=generator) or {})
    for t, ov in (given or {}).items():
        if t not in names:
            raise TargetError(f"module_overrides names module '{t}', which this adapter does not target."
                              + close_names(t, names))
        out[t] = None if ov is None else {**(out.get(t) or {}), **ov}
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    for t, ov in out.items():
        bad = sorted(set(ov or {}) - fields)
        if bad:
            raise ConfigError(f"module '{t}': overrides {bad} are not options of method '{cls.name}' "
                              f"(valid: {sorted(fields)}).")
    return out


def _resolve_modules_to_save(model, pats, targets) -> list[str]:
    out = []
    names = [n for n, _ in _candidates(model) if n]
    adapted = list(targets) + [n for n, _ in adapted_layers(model)]
    for p in pats:
        hits = [n for n in names if _suffix_match(n, [p]) and not any(n.startswith(t + ".") for t in targets)]
        hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits if h != n)]
        if not hits:
            raise TargetError(f"modules_to_save entry '{p}' matches no module." + close_names(p, names))
        both = [(h, t) for h in hits for t in adapted if t == h or t.startswith(h + ".")]
        if both:
            h, t = both[0]
            raise ConfigError(
                f"module '{t}' is adapted and " + ("is" if t == h else f"inside '{h}', which is")
                + f" in modules_to_save (entry '{p}'); a module is either adapted or trained fully. "
                "Remove it from one of them."
            )
        out += hits
    return list(dict.fromkeys(out))


# ---- managing adapters ---------------------------------------------------------------------
def _names(model, names) -> list[str]:
    state = adapter_state(model)
    if names is None:
        return []
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in state:
            raise AdapterNotFoundError(
                f"model has no adapter '{n}'; it has {sorted(state) or 'none'}." + close_names(n, state)
            )
    return names


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Every parameter adapter ``name`` owns: its layers' adapters, its ``modules_to_save`` copies and
    the tensors it shares between layers (each once, in a fixed order)."""
    entry = adapter_state(model)[name]
    mods = [layer.adapters[name] for _, layer in adapted_layers(model) if name in layer.adapters]
    mods += [tc.copies[name] for _, tc in trained_copies(model) if name in tc.copies]
    if isinstance(entry.get("shared"), nn.Module):
        mods.append(entry["shared"])
    out, seen = [], set()
    for m in mods:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _park(model: nn.Module, name: str) -> None:
    """Freeze inactive adapter ``name``, keeping its own trainable flags (a method may have frozen some
    of its tensors itself, e.g. LaMDA's columns) to give back when it is active again."""
    entry = adapter_state(model)[name]
    params = adapter_parameters(model, name)
    if entry.get("parked") is None:
        entry["parked"] = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)


def _unpark(model: nn.Module, name: str) -> None:
    entry = adapter_state(model)[name]
    flags = entry.pop("parked", None)
    if flags is None:
        return
    params = adapter_parameters(model, name)
    if len(flags) != len(params):  # the adapter changed shape while inactive: every tensor trains again
        flags = [True] * len(params)
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)


def set_active(model: nn.Module, names) -> None:
    """Make ``names`` (a name, a list, or ``None`` for none) the active adapters everywhere.

    A merged adapter that becomes inactive is unmerged first, so the output never holds an
    inactive adapter (``None`` gives the base model's output).

    Only active adapters train, as after PEFT's ``set_adapter``: an adapter that becomes inactive
    is frozen (``requires_grad=False``), and one that becomes active again gets back the trainable
    flags it had (an adapter loaded with ``rw.load(..., trainable=False)`` stays frozen; PEFT's
    ``set_adapter`` would unfreeze it — use ``rw.load(..., trainable=True)`` to train a loaded one).
    """
    names = _names(model, names)
    for _, layer in adapted_layers(model):
        layer.unmerge([n for n in layer.merged if n not in names])
        layer.active = [n for n in names if n in layer.adapters]
    for _, tc in trained_copies(model):
        tc.active = next((n for n in names if n in tc.copies), None)
    for n in adapter_state(model):
        if n in names:
            _unpark(model, n)
        else:
            _park(model, n)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """``with rw.disabled(model):`` runs the base model — no adapter acts, ``modules_to_save`` give
    their original module — and puts everything back on exit, also after an exception (PEFT's
    ``model.disable_adapter()``). Merged adapters are unmerged inside and merged again after;
    trainable flags are not changed."""
    snap = snapshot(model)
    try:
        for _, layer in adapted_layers(model):
            layer.unmerge()
            layer.active = []
        for _, tc in trained_copies(model):
            tc.active = None
        yield model
    finally:
        restore(model, snap)


def snapshot(model: nn.Module):
    """Trainable flags and active adapters of ``model``, for :func:`restore` after a failed change."""
    return ([(p, p.requires_grad) for p in model.parameters()],
            {name: (list(layer.active), list(layer.merged)) for name, layer in adapted_layers(model)},
            {name: tc.active for name, tc in trained_copies(model)},
            {name: entry.get("parked") for name, entry in adapter_state(model).items()})


def restore(model: nn.Module, snap) -> None:
    flags, layers, heads, parked = snap
    for name, tc in trained_copies(model):
        tc.active = heads.get(name)
    for p, flag in flags:
        p.requires_grad_(flag)
    for name, entry in adapter_state(model).items():
        if parked.get(name) is None:
            entry.pop("parked", None)
        else:
            entry["parked"] = parked[name]
    for name, layer in adapted_layers(model):
        if name in layers:
            active, merged = layers[name]
            layer.merge([n for n in merged if n in layer.adapters and n not in layer.merged])
            layer.active = [n for n in active if n in layer.adapters]


def active_adapters(model: nn.Module) -> list[str]:
    act = []
    for _, layer in adapted_layers(model):
        act += [n for n in layer.active if n not in act]
    return act


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left without adapters get their plain base back."""
    _names(model, name)
    for lname, layer in list(adapted_layers(model)):
        if name in layer.adapters:
            layer.remove(name)
            if not layer.adapters:
                _set_module(model, lname, layer.base)
    still_active = [n for n in active_adapters(model) if n != name]
    for mname, tc in list(trained_copies(model)):
        if name in tc.copies:
            del tc.copies[name]
            if tc.active == name:  # the next active adapter with a copy takes over, as in set_active
                tc.active = next((n for n in still_active if n in tc.copies), None)
            if not tc.copies:
                _set_module(model, mname, tc.original)
    del adapter_state(model)[name]
    _forget_hf_methods(model)


def _check_untied(model: nn.Module, layers) -> None:
    """Refuse to merge into a weight another module shares (GPT-2's ``wte``/``lm_head``):
    the merge would change that module too, and the merged model would not match the unmerged one."""
    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(mname)
    for lname, layer in layers:
        others = [o for o in owners.get(id(layer.base.weight), []) if o != f"{lname}.base"]
        if others:
            raise ConfigError(
                f"module '{lname}' shares its weight {tuple(layer.base.weight.shape)} with {others} (tied "
                "weights); merging its adapter would change those modules too. Keep the adapter unmerged, "
                "or untie the weights before adapting."
            )


def _check_dense(layers) -> None:
    """Refuse to merge into a bitsandbytes-quantized base: its packed weight cannot take ΔW."""
    for lname, layer in layers:
        if layer.view.quantization is not None:
            raise ConfigError(
                f"module '{lname}' is a bitsandbytes {layer.view.quantization} layer; its packed weight cannot "
                "hold a merged adapter (and re-quantizing W0 + ΔW would change it). Keep the adapter unmerged, or "
                "rw.save it and rw.load it onto the unquantized base model, and merge there."
            )


def merge(model: nn.Module, names=None) -> None:
    """Fold the active adapters (or ``names``, which become active) into the base weights."""
    names = _names(model, names) if names is not None else None
    todo = []
    for lname, layer in adapted_layers(model):
        todo.append((lname, layer, None if names is None else [n for n in names if n in layer.adapters]))
    _check_dense([(lname, layer) for lname, layer, ns in todo
                  if any(n not in layer.merged for n in (layer.active if ns is None else ns))])
    _check_untied(model, [(lname, layer) for lname, layer, ns in todo
                          if any(n not in layer.merged for n in (layer.active if ns is None else ns))])
    for _, layer, ns in todo:
        layer.merge(ns)
        # a merged adapter is part of the output, so it counts as active (set_active unmerges it)
        layer.active += [n for n in layer.merged if n not in layer.active]
    if names is not None:  # adapters made active here come after those already active
        for _, tc in trained_copies(model):
            if tc.active is None:
                tc.active = next((n for n in names if n in tc.copies), None)


def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights again."""
    for _, layer in adapted_layers(model):
        layer.unmerge()


def unadapt(model: nn.Module, merge: bool = False) -> nn.Module:
    """Return the plain model: adapters removed, merged into the weights first if ``merge``.

    ``modules_to_save``: with ``merge`` the active adapter's trained copy takes the module's
    place; without, the original module comes back (the exact base model). Every parameter
    is made trainable again, as in a freshly built model.
    """
    if merge:
        pending = [(n, layer) for n, layer in adapted_layers(model) if any(a not in layer.merged for a in layer.active)]
        _check_dense(pending)
        _check_untied(model, pending)
    for lname, layer in list(adapted_layers(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _set_module(model, lname, layer.base)
    for mname, tc in list(trained_copies(model)):
        _set_module(model, mname, tc.current() if merge else tc.original)
    model.__dict__.pop(STATE_ATTR, None)
    _forget_hf_methods(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require gradients (each shared tensor once), ready for an optimizer:
    ``torch.optim.AdamW(rw.trainable_parameters(model), lr=...)``. Their number is
    :func:`parameter_count`'s ``trainable``."""
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _numel(p: torch.Tensor) -> int:
    """Number of weights a parameter holds: a bitsandbytes 4-bit weight packs two (or, in a wider
    storage dtype, ``2·itemsize``) per stored element, as PEFT counts them."""
    if type(p).__name__ == "Params4bit":
        return p.numel() * 2 * p.element_size()
    return p.numel()


class ParameterCount(NamedTuple):
    """``(trainable, total, percent)``; prints as PEFT's ``print_trainable_parameters`` line."""

    trainable: int
    total: int
    percent: float

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def parameter_count(model: nn.Module) -> ParameterCount:
    """Trainable and total parameters of ``model`` (adapters, base and ``modules_to_save`` copies;
    each shared tensor once; 4-bit weights counted unpacked) — PEFT's ``get_nb_trainable_parameters``."""
    trainable = total = 0
    for _, p in model.named_parameters():
        n = _numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return ParameterCount(trainable, total, 100.0 * trainable / total if total else 0.0)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: … || all params: … || trainable%: …`` (PEFT's line)."""
    print(parameter_count(model))


class Summary(list):
    """Rows (dicts) describing every adapted module; prints as a table."""

    columns = ("module", "kind", "shape", "adapter", "method", "rank", "params", "state")

    def __str__(self) -> str:
        from ..utils.table import format_table

        body = format_table([[r[c] for c in self.columns] for r in self], self.columns)
        tot = sum(r["params"] for r in self)
        return f"{body}\n{len(self)} adapted modules, {tot:,} adapter parameters"


def summary(model: nn.Module) -> Summary:
    """One row per (module, adapter); a tensor shared between layers counts in the first row only.
    ``params`` counts the tensors the adapter trains while active (also while it is inactive)."""
    rows = Summary()
    seen: set[int] = set()
    parked = set()  # an inactive adapter's tensors count as they train when it is active
    for aname, entry in adapter_state(model).items():
        if entry.get("parked") is not None:
            params = adapter_parameters(model, aname)
            if len(params) == len(entry["parked"]):
                parked |= {id(p) for p, flag in zip(params, entry["parked"]) if flag}
    for lname, layer in adapted_layers(model):
        for aname, ad in layer.adapters.items():
            cfg = ad.config
            own = [p for p in ad.parameters() if (p.requires_grad or id(p) in parked) and id(p) not in seen]
            seen.update(id(p) for p in own)
            rows.append({
                "module": lname,
                "kind": layer.view.kind,
                "shape": "x".join(map(str, layer.view.shape)),
                "adapter": aname,
                "method": cfg.method,
                "rank": getattr(ad, "rank", getattr(cfg, "rank", "-")),
                "params": sum(p.numel() for p in own),
                "state": "merged" if aname in layer.merged else ("active" if aname in layer.active else "off"),
            })
    return rows


