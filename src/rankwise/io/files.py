"""Adapter files: ``adapter_model.safetensors`` + ``adapter_config.json``.

Layout of a directory written by :func:`save`::

    adapter_config.json       format, rankwise version, per adapter: method, config,
                              adapted modules with kind, base weight shape and any
                              per-module config overrides (e.g. EVA's ranks),
                              modules_to_save, and the SHA-256 of the weights file
    adapter_model.safetensors "<adapter>/<module>/<param>" for adapter tensors,
                              "<adapter>/modules_to_save/<module>/<param>" for saved modules,
                              "<adapter>/(shared)/<param>" once for tensors the method shares
                              between layers (the ``shared`` hook, see the registry)

Both files are written atomically (the directory is built under a temporary name and
swapped in). :func:`load` checks everything — file integrity, module names, kinds and
shapes — before it changes the model, so a failed load leaves the model as it was.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..core.api import (
    adapt,
    adapted_layers,
    adapter_parameters,
    adapter_state,
    exact_targets,
    restore,
    saved_module,
    set_active,
    snapshot,
)
from ..core.api import delete as delete_adapter
from ..core.calibrate import LOAD_STATE
from ..core.distributed import full, is_sharded, rank, shard_like, unwrap
from ..core.layers import weight_shape
from ..core.registry import get_method
from ..errors import AdapterExistsError, ConfigError, CorruptFileError, ShapeMismatchError, TargetError
from .atomic import (
    ADAPTER_NAMES,
    atomic_dir,
    is_adapter_dir,
    read_dir,
    read_json,
    read_tensors,
    save_tensors,
    write_json,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "rankwise-adapter/1"
SHARED = "(shared)"  # key segment of tensors shared between layers; no module name has parentheses


def _shared_ids(entry: dict) -> set[int]:
    """Ids of the tensors of an adapter's shared module (saved once, not per layer)."""
    shared = entry.get("shared")
    return set() if shared is None else {id(t) for t in shared.state_dict(keep_vars=True).values()}


def _own_state(module: nn.Module, skip: set[int]) -> dict[str, torch.Tensor]:
    """``module``'s state dict (the tensors themselves) without the shared tensors ``skip``."""
    return {k: t for k, t in module.state_dict(keep_vars=True).items() if id(t) not in skip}


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(model: nn.Module, path: str | Path, names=None) -> Path:
    """Save adapters ``names`` (default: all) of ``model`` to directory ``path``.

    ``model`` may be DDP-wrapped; an FSDP2-sharded model is saved by calling this on every rank
    (the shards are gathered; rank 0 writes the complete adapter)."""
    model = unwrap(model)
    state = adapter_state(model)
    names = list(state) if names is None else ([names] if isinstance(names, str) else list(names))
    if not names:
        raise TargetError(f"{type(model).__name__} has no adapters to save; call rw.adapt(...) first.")
    layers = dict(adapted_layers(model))
    tensors, meta = {}, {}
    for name in names:
        if name not in state:
            raise TargetError(f"model has no adapter '{name}'; it has {sorted(state)}.")
        entry = state[name]
        mods = {}
        skip = _shared_ids(entry)
        if entry.get("shared") is not None:
            for pname, t in entry["shared"].state_dict().items():
                tensors[f"{name}/{SHARED}/{pname}"] = t
        for mname in entry["modules"]:
            layer = layers[mname]
            mods[mname] = {"kind": layer.view.kind, "weight_shape": list(weight_shape(layer.base))}
            if entry.get("overrides", {}).get(mname):  # per-module config (EVA's ranks): load rebuilds it
                mods[mname]["overrides"] = entry["overrides"][mname]
            for pname, t in _own_state(layer.adapters[name], skip).items():
                tensors[f"{name}/{mname}/{pname}"] = t
        for mname in entry["modules_to_save"]:
            for pname, t in saved_module(model, mname, name).state_dict().items():
                tensors[f"{name}/modules_to_save/{mname}/{pname}"] = t
        meta[name] = {
            "method": entry["config"].method,
            "config": entry["config"].to_dict(),
            "modules": mods,
            "modules_to_save": entry["modules_to_save"],
        }
    if any(is_sharded(t) for t in tensors.values()):  # FSDP2: every rank gathers, rank 0 writes
        tensors = {k: full(t) for k, t in tensors.items()}
        if rank() != 0:
            return Path(path)
    with atomic_dir(path, ADAPTER_NAMES, "rw.save: adapter folder", is_adapter_dir) as tmp:
        save_tensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": FORMAT})
        write_json(tmp / CONFIG_NAME, {
            "format": FORMAT,
            "rankwise_version": __version__,
            "adapters": meta,
            "weights_sha256": sha256(tmp / WEIGHTS_NAME),
        })
    return Path(path)


def _check_layout(cfg, cfg_file: Path) -> None:
    """The JSON has the types ``save`` writes; otherwise name the field (a hand-edited or foreign file)."""

    def bad(where: str, want: str, got) -> CorruptFileError:
        return CorruptFileError(f"{cfg_file}: {where} should be {want}, got {got!r}; the file was edited or is not "
                                "a rankwise adapter config. Save the adapter again with rw.save().")

    if not isinstance(cfg, dict):
        raise bad("the top level", "a JSON object", type(cfg).__name__)
    if "peft_type" in cfg and "adapters" not in cfg:
        return  # a PEFT config: the format check names it
    if not isinstance(cfg.get("weights_sha256"), (str, type(None))):
        raise bad("'weights_sha256'", "a hex string", cfg.get("weights_sha256"))
    adapters = cfg.get("adapters")
    if adapters is None or adapters == {} or adapters == []:
        return  # "holds no adapter", said by load
    if not isinstance(adapters, dict):
        raise bad("'adapters'", "an object of named adapters", adapters)
    for name, info in adapters.items():
        at = f"adapters.{name}"
        if not isinstance(info, dict):
            raise bad(at, "an object", info)
        for key, typ, want in (("method", str, "a method name"), ("config", dict, "an object of options"),
                               ("modules", dict, "an object of module entries"),
                               ("modules_to_save", list, "a list of module names")):
            if not isinstance(info.get(key), typ):
                raise bad(f"{at}.{key}", want, info.get(key, "<missing>"))
        for mname, m in info["modules"].items():
            shape = m.get("weight_shape") if isinstance(m, dict) else None
            if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
                raise bad(f"{at}.modules.{mname}.weight_shape", "a list of integers", shape)


def read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify an adapter directory: (config dict, tensors). Touches no model. Safe while
    another process replaces the folder (it reads the old or the new adapter)."""
    return read_dir(path, _read)


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise CorruptFileError(f"{f} does not exist; is '{path}' a directory written by rw.save()?")
    cfg = read_json(cfg_file, "the file is damaged. Save the adapter again.")
    _check_layout(cfg, cfg_file)
    if cfg.get("format") != FORMAT:
        hint = " It looks like a PEFT adapter: use rw.import_peft()." if "peft_type" in cfg else ""
        hint = hint or " It was edited or comes from another tool: save the adapter again with rw.save()."
        raise CorruptFileError(f"{cfg_file} has format {cfg.get('format')!r}, expected {FORMAT!r}.{hint}")
    digest = sha256(w_file)
    if cfg.get("weights_sha256") not in (None, digest):
        raise CorruptFileError(
            f"{w_file} is corrupted or truncated: SHA-256 {digest[:12]}… does not match the "
            f"{cfg['weights_sha256'][:12]}… recorded at save time. Restore the file or save it again."
        )
    return cfg, read_tensors(w_file, "Save the adapter again.")


def load(model: nn.Module, path: str | Path, names=None, active=True, trainable: bool = False,
         overwrite: bool = False) -> nn.Module:
    """Load adapters saved by :func:`save` onto ``model`` (a fresh base model); return ``model``.

    ``trainable=False`` (default, for inference, as PEFT's ``is_trainable=False``): the loaded
    adapters and their ``modules_to_save`` are frozen; ``trainable=True`` to continue training
    them (each method's own frozen tensors stay frozen). All checks happen before the model
    changes: a module that is missing or has another shape fails with an error naming it and
    both shapes, and nothing is loaded.

    ``overwrite=True``: an adapter the model already has under a saved name takes the saved values
    in place — the same ``Parameter`` objects, so an optimizer built on them and FSDP2 sharding
    stay valid (into a ``DTensor`` each rank copies its own shard of the saved tensor: no
    communication). This loads a saved adapter into a model adapted on the meta device, sharded
    with ``fully_shard`` and materialized with ``to_empty`` (``docs/distributed.md``). The adapter
    must be the saved one's method, config and modules (else an error names what differs, before
    anything changes) and not merged; ``trainable=False`` freezes it as any loaded adapter,
    ``trainable=True`` keeps its trainable flags. Without ``overwrite`` an existing name is refused.
    (PEFT's ``load_adapter`` copies into an existing adapter name silently, with no config check.)
    """
    cfg, tensors = read(path)
    saved = cfg["adapters"]
    if not isinstance(saved, dict) or not saved:
        raise CorruptFileError(f"{path}: adapter_config.json holds no adapter ('adapters' is {saved!r}); nothing "
                               "would be loaded. Save the adapter again with rw.save(model, path).")
    names = list(saved) if names is None else ([names] if isinstance(names, str) else list(names))
    state = adapter_state(model)
    modules = dict(model.named_modules())
    layers = dict(adapted_layers(model))
    for name in names:
        if name not in saved:
            raise TargetError(f"{path} holds adapters {sorted(saved)}, not '{name}'.")
        if name in state and not overwrite:
            raise AdapterExistsError(f"model already has an adapter '{name}'; rw.delete(model, '{name}') first "
                                     "(or rw.load(..., overwrite=True) to load the saved values into it).")
        for mname, info in saved[name]["modules"].items():
            m = layers.get(mname) or modules.get(mname)
            if m is None:
                raise ShapeMismatchError(
                    f"adapter '{name}' in {path} adapts module '{mname}' (weight {tuple(info['weight_shape'])}), "
                    f"which this {type(model).__name__} does not have. Load it onto the model it was trained on."
                )
            base = m.base if mname in layers else m
            weight = getattr(base, "weight", None)
            if weight is not None and weight.device.type == "meta":
                raise ConfigError(
                    f"module '{mname}' is on the meta device (it has no storage), so the values of adapter "
                    f"'{name}' in {path} would be dropped. Materialize the model first (model.to_empty(device=...) "
                    "and load its base weights), then rw.load."
                )
            got = weight_shape(base)  # a quantized base: its dense (out, in), not the packed storage
            if got != tuple(info["weight_shape"]):
                raise ShapeMismatchError(
                    f"module '{mname}': the saved adapter '{name}' was made for weight shape "
                    f"{tuple(info['weight_shape'])}, but this model's weight is {got}. "
                    "Load it onto the same architecture it was trained on."
                )
        for mname in saved[name]["modules_to_save"]:
            if mname not in modules:
                raise ShapeMismatchError(f"adapter '{name}' saves module '{mname}', which this model lacks.")
            prefix = f"{name}/modules_to_save/{mname}/"
            m = modules[mname]
            own = getattr(m, "original", m).state_dict()
            for k, t in tensors.items():
                if k.startswith(prefix) and (k[len(prefix):] not in own
                                             or tuple(own[k[len(prefix):]].shape) != tuple(t.shape)):
                    got = tuple(own[k[len(prefix):]].shape) if k[len(prefix):] in own else "missing"
                    raise ShapeMismatchError(
                        f"module '{mname}' (modules_to_save of adapter '{name}'): '{k[len(prefix):]}' has "
                        f"shape {tuple(t.shape)} in the file, but {got} in this model."
                    )
        if name in state:  # overwrite=True
            _check_existing(model, name, saved[name], path)

    # Add the adapters, check every tensor against them, and only then copy: a failure
    # removes what was added and restores the model's flags, so the model is unchanged.
    snap = snapshot(model)
    existing = {name for name in names if name in state}  # overwrite=True: copied into in place
    added, plans = [], []
    try:
        for name in names:
            info = saved[name]
            if name in existing:
                plans.append((info, _plan(model, name, info, tensors)))
                continue
            cls = get_method(info["method"])
            config = cls.Config.from_dict(info["config"])
            exact = config.replace(targets=exact_targets(info["modules"]), exclude=None,
                                   modules_to_save=list(info["modules_to_save"]))
            per_module = {m: i["overrides"] for m, i in info["modules"].items() if i.get("overrides")}
            adapt(model, exact, name=name, calibration=LOAD_STATE, module_overrides=per_module)
            added.append(name)
            state[name]["config"] = config
            state[name]["modules_to_save"] = list(info["modules_to_save"])
            plans.append((info, _plan(model, name, info, tensors)))
    except Exception:
        for name in added:
            delete_adapter(model, name)
        restore(model, snap)
        raise
    for info, plan in plans:
        _copy(model, info, plan, tensors)
    layers = dict(adapted_layers(model))
    for name in names:
        for mname in saved[name]["modules"]:
            layers[mname].adapters[name].loaded()
    if not trainable:  # before set_active: an adapter loaded inactive stays frozen when it is activated
        for name in names:
            params = adapter_parameters(model, name)
            for p in params:
                p.requires_grad_(False)
            if state[name].get("parked") is not None:
                state[name]["parked"] = [False] * len(params)
    set_active(model, [n for n in names] if active else None)
    return model


def _plan(model, name, info, tensors) -> list:
    """(module, key prefix, module name, shared ids to skip) for adapter ``name``, every key and
    shape checked; the adapter's shared module (if any) is one entry, copied once."""
    layers = dict(adapted_layers(model))
    entry = adapter_state(model)[name]
    skip = _shared_ids(entry)
    plan = []
    if entry.get("shared") is not None:
        plan.append((entry["shared"], f"{name}/{SHARED}/", f"{SHARED} (tensors shared between layers)", set()))
    elif any(k.startswith(f"{name}/{SHARED}/") for k in tensors):
        raise ShapeMismatchError(
            f"adapter '{name}' in the file has tensors shared between layers, but method "
            f"'{info['method']}' builds none. The file comes from another version of the method."
        )
    for mname in info["modules"]:
        plan.append((layers[mname].adapters[name], f"{name}/{mname}/", mname, skip))
    for mname in info["modules_to_save"]:
        plan.append((saved_module(model, mname, name), f"{name}/modules_to_save/{mname}/", mname, set()))
    # check every key and shape first, then copy
    for module, prefix, mname, skip_ids in plan:
        own = _own_state(module, skip_ids)
        theirs = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if set(own) != set(theirs):
            raise ShapeMismatchError(
                f"module '{mname}' of adapter '{name}': saved tensors {sorted(theirs)} do not match the "
                f"expected {sorted(own)}. The file comes from another version or method settings."
            )
        for k, v in own.items():
            if tuple(v.shape) != tuple(theirs[k].shape):
                raise ShapeMismatchError(
                    f"module '{mname}' of adapter '{name}': '{k}' has shape {tuple(theirs[k].shape)} in the "
                    f"file but {tuple(v.shape)} in the model. Use the same method settings as when saving."
                )
    return plan


def _copy(model, info, plan, tensors) -> None:
    """Copy the saved tensors into the model's, in place. Into an FSDP2-sharded (``DTensor``) tensor
    each rank copies its own shard of the whole saved tensor (``shard_like``: every rank read the
    same file, so no data moves)."""
    with torch.no_grad():
        for module, prefix, _, skip_ids in plan:
            for k, v in _own_state(module, skip_ids).items():
                t = tensors[prefix + k]
                v.copy_(shard_like(t.to(device=v.device, dtype=v.dtype), v) if is_sharded(v) else t)


def _jsonable(obj):
    """``obj`` as it reads back from ``adapter_config.json`` (tuples become lists …), for comparing."""
    return json.loads(json.dumps(obj))


def _check_existing(model, name: str, info: dict, path) -> None:
    """``overwrite=True``: the model's adapter ``name`` is the saved one's method, config (but the
    target patterns: the adapted modules are compared instead) and modules, unmerged and not on
    the meta device — so copying the saved values into it in place is exact."""
    entry = adapter_state(model)[name]
    have = entry["config"]
    where = f"the model's adapter '{name}' and the one in {path}"
    fix = (f"Adapt the model as the adapter was saved, or rw.delete(model, '{name}') and rw.load it as a new "
           "adapter (before sharding the model).")
    if have.method != info["method"]:
        raise ConfigError(f"{where} differ in method: '{have.method}' in the model, '{info['method']}' in the "
                          f"file; overwrite=True copies values only into the same method. {fix}")
    mine = _jsonable(have.to_dict())
    theirs = _jsonable(get_method(info["method"]).Config.from_dict(info["config"]).to_dict())
    diff = [f"{k}={theirs.get(k)!r} in the file, {mine.get(k)!r} in the model"
            for k in sorted(set(mine) | set(theirs)) if k not in ("targets", "exclude", "modules_to_save")
            and mine.get(k) != theirs.get(k)]
    if diff:
        raise ConfigError(f"{where} differ in config: {'; '.join(diff)}. {fix}")
    extra = sorted(set(info["modules"]) - set(entry["modules"]))
    missing = sorted(set(entry["modules"]) - set(info["modules"]))
    if extra or missing:
        raise ConfigError(f"{where} adapt different modules: only in the file {extra}, only in the model {missing}. "
                          f"{fix}")
    for mname, m in info["modules"].items():
        if _jsonable(entry.get("overrides", {}).get(mname) or None) != (m.get("overrides") or None):
            raise ConfigError(f"{where} differ in the per-module config of module '{mname}': "
                              f"{m.get('overrides')} in the file, {entry.get('overrides', {}).get(mname)} in the "
                              f"model. {fix}")
    if sorted(entry["modules_to_save"]) != sorted(info["modules_to_save"]):
        raise ConfigError(f"{where} differ in modules_to_save: {sorted(info['modules_to_save'])} in the file, "
                          f"{sorted(entry['modules_to_save'])} in the model. {fix}")
    for lname, layer in adapted_layers(model):
        if name in layer.merged:
            raise ConfigError(f"adapter '{name}' is merged into module '{lname}'; overwriting its values would "
                              "leave the old ΔW in the base weight. rw.unmerge(model) first (on every rank).")
    meta = next((f"{lname}.adapters.{name}.{k}" for lname, layer in adapted_layers(model) if name in layer.adapters
                 for k, t in layer.adapters[name].state_dict(keep_vars=True).items() if t.device.type == "meta"), None)
    if meta is not None:
        raise ConfigError(f"'{meta}' is on the meta device (it has no storage), so the values of adapter '{name}' in "
                          f"{path} would be dropped. Materialize the model first (model.to_empty(device=...) and "
                          "load its base weights), then rw.load.")
