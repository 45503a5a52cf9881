"""The PEFT adapter format (``adapter_config.json`` + ``adapter_model.safetensors``).

Generic over the registry: a method that PEFT also has provides ``peft_accepts``,
``to_peft_config``, ``from_peft_config``, ``peft_tensors``, ``load_peft_tensors`` and
``peft_suffixes``; nothing here names a method. Tensor keys follow PEFT:
``base_model.model.<module>.<suffix>``; ``modules_to_save`` tensors are
``base_model.model.<module>.<param>``. A method with tensors shared between layers (the engine's
``shared`` hook) that PEFT stores once per model (VeRA's ``base_model.vera_A``) adds
``peft_shared(shared) -> (tensors, config entries)``, ``peft_shared_keys()`` and
``load_peft_shared(shared, tensors)``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..core.api import adapt, adapted_layers, adapter_state, exact_targets, restore, saved_module, snapshot
from ..core.api import delete as delete_adapter
from ..core.calibrate import LOAD_STATE
from ..core.registry import get_method, methods
from ..errors import ConfigError, CorruptFileError, RankwiseError, ShapeMismatchError, TargetError
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

PREFIX = "base_model.model."


#: PEFT ``task_type`` by the suffix of the model's class name (first match in its MRO).
TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
              ("ForTokenClassification", "TOKEN_CLS"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
              ("ForQuestionAnswering", "QUESTION_ANS"))


#: Head modules PEFT's model class for a task adds to ``modules_to_save`` (and then expects in the file).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


def infer_task_type(model: nn.Module, modules_to_save=None) -> str | None:
    """PEFT's ``task_type`` for ``model`` from its class (``LlamaForCausalLM`` → ``CAUSAL_LM`` …), or None.

    With ``modules_to_save`` given, a task whose PEFT class saves a head (``SEQ_CLS``: the
    ``classifier`` / ``score``) is named only when the adapter saves that head too: PEFT would
    otherwise look for its weights in the file and fail to load it."""
    for cls in type(model).__mro__:
        for suffix, task in TASK_TYPES:
            if cls.__name__.endswith(suffix):
                if modules_to_save is not None and task in TASK_HEADS:
                    heads = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in TASK_HEADS[task]]
                    if not heads or not set(heads) <= set(modules_to_save):
                        return None
                return task
    return None


def export_peft(model: nn.Module, path: str | Path, name: str | None = None, base_model_name_or_path=None,
                task_type: str | None = None) -> Path:
    """Write adapter ``name`` (default: the only one) as a PEFT adapter directory.

    ``task_type`` (PEFT's, e.g. ``"CAUSAL_LM"``, ``"SEQ_CLS"``) defaults to the one the model's class
    implies (:data:`TASK_TYPES`; None for a bare encoder), so ``peft.AutoPeftModelFor*`` can load the
    folder; ``base_model_name_or_path`` (default: ``model.config._name_or_path``) is where those load
    the base model from."""
    state = adapter_state(model)
    if name is None:
        if len(state) != 1:
            raise TargetError(f"model has adapters {sorted(state)}; pass name=... to pick the one to export.")
        name = next(iter(state))
    if name not in state:
        raise TargetError(f"model has no adapter '{name}'; it has {sorted(state)}.")
    entry = state[name]
    cls = get_method(entry["config"].method)
    if cls.peft_type is None:
        raise ConfigError(
            f"method '{cls.name}' has no PEFT equivalent; save it with rw.save() instead."
        )
    layers = dict(adapted_layers(model))
    views, tensors = [], {}
    for mname in entry["modules"]:
        ad = layers[mname].adapters[name]
        views.append(layers[mname].view)
        for suffix, t in ad.peft_tensors().items():
            tensors[f"{PREFIX}{mname}.{suffix}"] = t
    for mname in entry["modules_to_save"]:
        for pname, t in saved_module(model, mname, name).state_dict().items():
            tensors[f"{PREFIX}{mname}.{pname}"] = t
    pcfg = cls.to_peft_config(entry["config"], views)
    patterns = getattr(cls, "peft_patterns", None)  # per-module ranks/alphas (EVA, module_overrides)
    if patterns is not None:
        pcfg.update(patterns(entry["config"], {m: layers[m].adapters[name] for m in entry["modules"]}))
    if entry.get("shared") is not None and hasattr(cls, "peft_shared"):
        shared_tensors, shared_cfg = cls.peft_shared(entry["shared"])
        tensors.update(shared_tensors)
        pcfg.update(shared_cfg)
    pcfg.update({
        "target_modules": list(entry["modules"]),
        "modules_to_save": list(entry["modules_to_save"]) or None,
        "base_model_name_or_path": base_model_name_or_path
        or getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "task_type": task_type or infer_task_type(model, entry["modules_to_save"]),
        "inference_mode": True,
    })
    with atomic_dir(path, ADAPTER_NAMES, "rw.export_peft: adapter folder", is_adapter_dir) as tmp:
        save_tensors(tmp / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
        write_json(tmp / "adapter_config.json", pcfg)
    return Path(path)


def _read_peft(path: Path) -> tuple[dict, dict]:
    pcfg = read_json(path / "adapter_config.json", "is this a PEFT adapter directory?")
    if isinstance(pcfg, dict) and "adapters" in pcfg and "peft_type" not in pcfg:
        raise ConfigError(f"{path} is a rankwise adapter (written by rw.save), not a PEFT one; load it with "
                          f"rw.load(model, '{path}').")
    tensors = read_tensors(path / "adapter_model.safetensors",
                           "rankwise reads safetensors only, never pickled .bin files.")
    return pcfg, tensors


def import_peft(model: nn.Module, path: str | Path, name: str = "default") -> nn.Module:
    """Load a PEFT adapter directory onto ``model`` (the plain base model) as adapter ``name``."""
    path = Path(path)
    pcfg, tensors = read_dir(path, _read_peft)
    wfile = path / "adapter_model.safetensors"

    matches = [m for m in methods() if callable(getattr(get_method(m), "peft_accepts", None)) and get_method(m).peft_accepts(pcfg)]
    if not matches:
        raise ConfigError(
            f"PEFT adapter type {pcfg.get('peft_type')!r} in {path} has no rankwise method yet "
            f"(methods with PEFT support: {[m for m in methods() if callable(getattr(get_method(m), 'peft_accepts', None))]})."
        )
    # a method that names the file's init (init_lora_weights="pissa", "eva" …) before the generic one
    matches.sort(key=lambda m: getattr(get_method(m), "peft_init", None) is None)
    cls = get_method(matches[0])
    suffixes = cls.peft_suffixes()
    shared_keys = set(cls.peft_shared_keys()) if hasattr(cls, "peft_shared_keys") else set()
    shared_tensors = {k: t for k, t in tensors.items() if k in shared_keys}
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    saved_mods: dict[str, dict[str, torch.Tensor]] = {}
    base_weights: dict[str, dict[str, torch.Tensor]] = {}  # PEFT saves targeted embeddings' base weights
    mod_names = {n for n, _ in model.named_modules()}
    for key, t in tensors.items():
        if key in shared_tensors:
            continue
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        k = re.sub(r"\.(?:modules_to_save\.[^.]+|original_module)\.", ".", k)
        suffix = next((s for s in suffixes if k.endswith("." + s)), None)
        if suffix is not None:
            per_module.setdefault(k[: -len(suffix) - 1], {})[suffix] = t
            continue
        based = re.fullmatch(r"(.+)\.base_layer\.([^.]+)", k)
        if based is not None:
            base_weights.setdefault(based.group(1), {})[based.group(2)] = t
            continue
        mod, _, pname = k.rpartition(".")
        if mod not in mod_names:
            raise ShapeMismatchError(
                f"PEFT file {wfile} holds '{key}', but {type(model).__name__} has no module '{mod}'. "
                "Import onto the base model the adapter was trained on."
            )
        saved_mods.setdefault(mod, {})[pname] = t
    if not per_module:
        raise CorruptFileError(f"{wfile} holds no {cls.name} tensors (expected keys ending in {suffixes}).")
    missing = sorted(set(per_module) - mod_names)
    if missing:
        raise ShapeMismatchError(
            f"PEFT adapter adapts modules {missing[:5]} that {type(model).__name__} does not have. "
            "Import onto the base model it was trained on."
        )
    stray = sorted(set(base_weights) - set(per_module))
    if stray:
        raise ShapeMismatchError(
            f"PEFT file {wfile} holds base-layer weights of {stray[:5]}, which it does not adapt. "
            "The file is not a LoRA adapter rankwise understands."
        )
    # modules_to_save and base-layer weights: check shapes before touching anything
    layers = dict(adapted_layers(model))
    for mod, params in [*saved_mods.items(), *base_weights.items()]:
        m = model.get_submodule(mod)
        own = (layers[mod].base if mod in layers and mod in base_weights else getattr(m, "original", m)).state_dict()
        for pname, t in params.items():
            if pname not in own or own[pname].shape != t.shape:
                raise ShapeMismatchError(
                    f"module '{mod}': PEFT tensor '{pname}' has shape {tuple(t.shape)}, the model's is "
                    f"{tuple(own[pname].shape) if pname in own else 'missing'}."
                )
    try:
        opts = cls.from_peft_config(pcfg)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, RankwiseError):
            raise
        what = (f"lacks the field {e.args[0]!r}" if isinstance(e, KeyError)
                else f"has a value rankwise cannot read ({e})")
        raise ConfigError(f"the PEFT adapter_config.json in {path} {what}; fix the file or re-export the adapter "
                          "from PEFT (numbers as numbers, e.g. \"r\": 8, \"lora_alpha\": 16).") from None
    targets = exact_targets(sorted(per_module))
    snap = snapshot(model)
    module_ov = getattr(cls, "peft_module_overrides", None)  # e.g. EVA's rank_pattern
    # a data-driven method cannot rerun its init here: the file holds its whole state
    adapt(model, cls.Config(targets=targets, modules_to_save=sorted(saved_mods), **opts), name=name,
          calibration=LOAD_STATE if cls.calibration_needs else None,
          module_overrides=module_ov(pcfg, sorted(per_module)) if module_ov else None)
    mod = None
    try:
        layers = dict(adapted_layers(model))
        for mod, ts in per_module.items():
            layers[mod].adapters[name].load_peft_tensors(ts)
        if shared_tensors:
            cls.load_peft_shared(adapter_state(model)[name]["shared"], shared_tensors)
    except Exception as e:
        delete_adapter(model, name)
        restore(model, snap)
        if isinstance(e, KeyError):  # a tensor the method needs is not in the file
            raise CorruptFileError(f"{wfile} lacks tensor {e.args[0]!r} of module '{mod}' (it has "
                                   f"{sorted(per_module.get(mod, {}))}); the file is incomplete: export the "
                                   "adapter again. The model is unchanged.") from None
        raise
    with torch.no_grad():
        for mod, params in base_weights.items():
            own = layers[mod].base.state_dict(keep_vars=True)
            for pname, t in params.items():
                own[pname].copy_(t)
        for mod, params in saved_mods.items():
            own = saved_module(model, mod, name).state_dict(keep_vars=True)
            for pname, t in params.items():
                own[pname].copy_(t)
    entry = adapter_state(model)[name]
    entry["config"] = entry["config"].replace(targets=sorted(per_module), modules_to_save=sorted(saved_mods))
    entry["modules_to_save"] = sorted(saved_mods)
    return model
