"""Save, load and export compressed models (all writes through :mod:`rankwise.io.atomic`).

A compressed folder (``save(model, dir)``)::

    compress_config.json   format, method, per-layer structure (factored rank/core, quantization),
                           the model class, the weights' sha256, the compression report
    model.safetensors      the model's tensors: factors as ``<layer>.down.weight`` / ``.up.weight`` /
                           ``.core.weight``; quantized weights packed (``<layer>.weight.qdata`` uint8 +
                           ``<layer>.weight.absmax`` float32); shared (tied) tensors once
    config.json            the Hugging Face config (HF models), so ``load(dir)`` rebuilds the model alone
    adapter/               the LoRA adapter (eora / lorc compensation, or one trained after compression),
                           written by ``rw.save``

``load(dir, model=None)`` rebuilds the model (from ``config.json`` through ``transformers``, or onto the
fresh uncompressed ``model`` you pass), puts the factored / quantized layers in place, loads the tensors
(``strict``), and the adapter. A missing or damaged file, a hash mismatch or a layer that does not fit is a
:class:`~rankwise.errors.CorruptFileError` / :class:`~rankwise.errors.ShapeMismatchError`, raised before the
model passed in is changed.

``to_dense(model)`` replaces every factored layer by a plain ``nn.Linear`` (or HF ``Conv1D``) holding
``U K D``; ``export(model, dir)`` writes a plain Hugging Face folder (``config.json`` +
``model.safetensors``, adapters merged, factors multiplied out) that ``from_pretrained`` loads
without rankwise.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..core.adapted import MERGED_KEY, AdaptedLayer, TrainedCopies
from ..core.api import adapter_state, unadapt
from ..errors import ConfigError, CorruptFileError, ShapeMismatchError
from ..io.atomic import atomic_dir, read_dir, read_json, read_tensors, save_tensors, write_json
from ..quant import dequantize, quantize
from .engine import RECORD
from .factored import FactoredLinear, dense_linear, factored_layers, set_module

FORMAT = "rankwise.compress/1"
CONFIG = "compress_config.json"
WEIGHTS = "model.safetensors"
ADAPTER = "adapter"
NAMES = (CONFIG, WEIGHTS, "config.json", ADAPTER, "README.md", "tokenizer*", "vocab*", "special_tokens_map.json",
         "merges.txt", "generation_config.json")
FIX = "the compressed folder is damaged; write it again with rankwise.compress.save (or `rankwise compress`)."


def _is_compressed_dir(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without adapters: an adapted layer's base under the layer's own name, a
    ``modules_to_save`` module's original. Refuses merged adapters (their ΔW is inside the weights)."""
    for name, layer in model.named_modules():
        if isinstance(layer, AdaptedLayer) and layer.merged:
            raise ConfigError(f"save: adapter(s) {layer.merged} are merged into module '{name}'; rw.unmerge(model) "
                              "first (the adapter is saved on its own).")
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, (AdaptedLayer, TrainedCopies))}
    out = {}
    for key, t in model.state_dict().items():
        owner = max((n for n in wrappers if key.startswith(n + ".")), key=len, default=None)
        if owner is None:
            out[key] = t
            continue
        rest = key[len(owner) + 1:]
        if isinstance(wrappers[owner], AdaptedLayer):
            if rest.startswith("base."):
                out[f"{owner}.{rest[5:]}"] = t
            elif not (rest.startswith("adapters.") or rest.startswith(MERGED_KEY)):
                out[key] = t
        elif rest.startswith("original."):
            out[f"{owner}.{rest[9:]}"] = t
    return out


def _dedupe(state: dict) -> tuple[dict, dict]:
    seen, tensors, aliases = {}, {}, {}
    for k, t in state.items():
        key = (t.device, t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = t
    return tensors, aliases


def save(model: nn.Module, path: str | Path, report=None) -> Path:
    """Write the compressed ``model`` to folder ``path`` (see the module docstring)."""
    from ..io.files import save as save_adapter
    from ..io.files import sha256

    record = model.__dict__.get(RECORD)
    if not record:
        raise ConfigError(f"save: this {type(model).__name__} was not compressed (rankwise.compress.compress); save a "
                          "plain model with save_pretrained / rw.save.")
    state = plain_state(model)
    for name, info in record["layers"].items():
        if info["type"] == "quantized":
            key = f"{name}.weight"
            w = state.pop(key)
            layer_w = w.t() if info.get("source_kind") == "hf_conv1d" else w
            q = quantize(layer_w, info["quant"], info["block_size"])
            state[key + ".qdata"], state[key + ".absmax"] = q.data, q.absmax
    tensors, aliases = _dedupe(state)
    cfg = getattr(model, "config", None)
    cls = type(model)
    meta = {
        "format": FORMAT,
        "method": record["method"],
        "layers": record["layers"],
        "options": record.get("options", {}),
        "adapters": sorted(adapter_state(model)),
        "aliases": aliases,
        "dtypes": {k: str(t.dtype).replace("torch.", "") for k, t in state.items() if k.endswith(".weight")
                   and k[:-7] in record["layers"]},
        "model_class": f"{cls.__module__}.{cls.__qualname__}",
        "report": None if report is None else report.summary(),
    }
    with atomic_dir(path, NAMES, "rankwise.compress.save: folder", _is_compressed_dir) as tmp:
        save_tensors(tmp / WEIGHTS, tensors, metadata={"format": "pt"})
        meta["weights_sha256"] = sha256(tmp / WEIGHTS)
        if cfg is not None and hasattr(cfg, "to_dict"):
            write_json(tmp / "config.json", cfg.to_dict())
        if adapter_state(model):
            save_adapter(model, tmp / ADAPTER)
        write_json(tmp / CONFIG, meta)
    return Path(path)


def _read(path: Path):
    from ..io.files import sha256

    meta = read_json(path / CONFIG, FIX)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("layers"), dict):
        raise CorruptFileError(f"{path / CONFIG} is not a rankwise compressed-model config (format {FORMAT}); {FIX}")
    tensors = read_tensors(path / WEIGHTS, FIX)
    if meta.get("weights_sha256") and sha256(path / WEIGHTS) != meta["weights_sha256"]:
        raise CorruptFileError(f"{path / WEIGHTS} does not match the hash in {CONFIG} (changed or damaged); {FIX}")
    hf = read_json(path / "config.json", FIX) if (path / "config.json").exists() else None
    return meta, tensors, hf


def _build_model(path: Path, meta: dict, hf: dict | None) -> nn.Module:
    if hf is None:
        raise ConfigError(f"load: {path} holds no config.json (the model was not a Hugging Face model); pass the fresh "
                          "uncompressed model: rankwise.compress.load(dir, model=<model>).")
    import transformers
    from transformers import AutoConfig

    arch = meta.get("model_class", "").rsplit(".", 1)[-1]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise ConfigError(f"load: transformers has no class {arch!r} to rebuild the model; pass model=<fresh model>.")
    cfg = AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "transformers_version"})
    return cls(cfg)


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a folder written by :func:`save`: onto ``model`` (the fresh uncompressed model, changed in
    place and returned) or, for Hugging Face models, a model rebuilt from its ``config.json``."""
    path = Path(path)
    if not path.is_dir():
        raise CorruptFileError(f"load: {path} is not a folder; give a folder written by rankwise.compress.save.")
    meta, tensors, hf = read_dir(path, _read)
    if model is None:
        model = _build_model(path, meta, hf)
    aliases = meta.get("aliases", {})
    if not isinstance(aliases, dict):
        raise CorruptFileError(f"{path / CONFIG}: 'aliases' is not an object; {FIX}")
    # plan every replacement and check it fits before changing the model
    plan = []
    for name, info in meta["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ShapeMismatchError(f"load: the compressed folder has layer '{name}', which this "
                                     f"{type(model).__name__} lacks; load onto the model it was made from.") from None
        if not isinstance(info, dict) or info.get("type") not in ("factored", "quantized", "pruned"):
            raise CorruptFileError(f"{path / CONFIG}: layer '{name}' has no valid type; {FIX}")
        w = getattr(old, "weight", None)
        if w is None:
            raise ShapeMismatchError(f"load: module '{name}' of {type(model).__name__} has no weight.")
        if info["type"] == "factored":
            try:
                n_in, n_out, _ = int(info["in"]), int(info["out"]), int(info["rank"])
            except (KeyError, TypeError, ValueError):
                raise CorruptFileError(f"{path / CONFIG}: layer '{name}' lacks in/out/rank; {FIX}") from None
            shape = tuple(w.shape) if info.get("source_kind") != "hf_conv1d" else tuple(w.shape)[::-1]
            if shape != (n_out, n_in):
                raise ShapeMismatchError(f"load: layer '{name}' is {n_out}x{n_in} in the folder but {shape[0]}x{shape[1]} "
                                         "in this model; load onto the model it was made from.")
            for part in ("down", "up") + (("core",) if info.get("core") else ()):
                if f"{name}.{part}.weight" not in tensors:
                    raise CorruptFileError(f"{path / WEIGHTS} lacks {name}.{part}.weight; {FIX}")
            plan.append((name, info, w))
        else:
            plan.append((name, info, w))
    state = dict(tensors)
    for k, v in aliases.items():
        if v not in state:
            raise CorruptFileError(f"{path / CONFIG}: alias {k} → {v} names no stored tensor; {FIX}")
        state[k] = state[v]
    for name, info, w in plan:
        if info["type"] == "quantized":
            key = f"{name}.weight"
            data, absmax = state.pop(key + ".qdata", None), state.pop(key + ".absmax", None)
            if data is None or absmax is None:
                raise CorruptFileError(f"{path / WEIGHTS} lacks the packed weight of '{name}'; {FIX}")
            conv = info.get("source_kind") == "hf_conv1d"
            try:
                wq = dequantize(data, absmax, tuple(w.shape)[::-1] if conv else tuple(w.shape), info["quant"],
                                int(info["block_size"]), w.dtype if w.dtype.is_floating_point else torch.float32)
                state[key] = wq.t().contiguous() if conv else wq
            except (RuntimeError, KeyError, ValueError) as e:
                raise CorruptFileError(f"{path / WEIGHTS}: the packed weight of '{name}' does not fit {tuple(w.shape)} "
                                       f"({e}); {FIX}") from None
    # now change the model
    for name, info, w in plan:
        if info["type"] == "factored":
            layer = FactoredLinear(int(info["in"]), int(info["out"]), int(info["rank"]), core=bool(info.get("core")),
                                   bias=bool(info.get("bias")), device=w.device, dtype=w.dtype)
            layer.source_kind = info.get("source_kind", "linear")
            set_module(model, name, layer)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ShapeMismatchError(f"load: the tensors in {path / WEIGHTS} do not fit this {type(model).__name__} "
                                 f"({str(e).splitlines()[0]}…); load onto the model it was made from.") from None
    model.__dict__[RECORD] = {"method": meta["method"], "layers": meta["layers"], "options": meta.get("options", {})}
    if (path / ADAPTER).is_dir():
        from ..io.files import load as load_adapter

        load_adapter(model, path / ADAPTER)
    return model


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every :class:`FactoredLinear` by a plain layer with weight ``U K D`` (in place).

    Adapters on the factors count (their active, unmerged ΔW is multiplied in); the model's adapter
    records for those factors are dropped, so call it on a model whose adapters you merged or saved."""
    dense = []
    for n, layer in factored_layers(model):
        lin = dense_linear(layer)
        if getattr(layer, "source_kind", "linear") == "hf_conv1d":
            from transformers.pytorch_utils import Conv1D

            conv = Conv1D(lin.out_features, lin.in_features).to(device=lin.weight.device, dtype=lin.weight.dtype)
            with torch.no_grad():
                conv.weight.copy_(lin.weight.t())
                if lin.bias is not None:
                    conv.bias.copy_(lin.bias)
                else:
                    conv.bias.zero_()
            lin = conv
        dense.append((n, lin))
    for n, lin in dense:
        set_module(model, n, lin)
    state = adapter_state(model)
    for aname in list(state):
        state[aname]["modules"] = [m for m in state[aname]["modules"]
                                   if not any(m.startswith(n + ".") for n, _ in dense)]
        if not state[aname]["modules"]:
            del state[aname]
    model.__dict__.pop(RECORD, None)
    return model


def export(model: nn.Module, path: str | Path) -> Path:
    """Write a plain Hugging Face folder (``config.json`` + ``model.safetensors``): a copy of ``model``
    with adapters merged and factors multiplied out; ``from_pretrained`` loads it without rankwise."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise ConfigError(f"export: {type(model).__name__} is not a Hugging Face model (no .config); use "
                          "rankwise.compress.to_dense(model) and save its state_dict yourself.")
    dense = copy.deepcopy(model)
    dense = to_dense(unadapt(dense, merge=True) if adapter_state(dense) else dense)
    state, _ = _dedupe(dense.state_dict())
    out = cfg.to_dict()
    out["architectures"] = [type(model).__name__]
    with atomic_dir(path, ("config.json", WEIGHTS, "generation_config.json", "tokenizer*", "vocab*",
                           "special_tokens_map.json", "merges.txt", "README.md"), "rankwise.compress.export: folder") as tmp:
        save_tensors(tmp / WEIGHTS, state, metadata={"format": "pt"})
        write_json(tmp / "config.json", out)
    return Path(path)
