"""Low-rank pretraining: replace a model's linear layers by a trained parametrization.

    import rankwise.pretrain as rp

    model = build_model(...)                                   # random weights
    rp.parametrize(model, "sltrain", rank=128, density=0.03)   # before the optimizer is built
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    train(model, ..., optimizer=optimizer)                     # rank_step runs merges / restarts
    rp.to_dense(model).save_pretrained("out/")                 # a plain Hugging Face model

One parametrization = one file (``relora.py``, ``sltrain.py``, ``cola.py`` …), a class registered
with :func:`register` that has ``name``, a ``Config`` dataclass (validated in ``__post_init__``),
``wrap(linear, config, generator) -> nn.Module`` (same ``in_features`` / ``out_features`` /
``forward(x)``), ``dense_weight(module) -> Tensor`` (the effective ``(out, in)`` weight) and
optionally ``on_step(model, layers, config, step, optimizers, total_steps) -> dict | None``, the
training-time event (ReLoRA's merge, a refactorization), run by :func:`pretrain_step`, which
:func:`rankwise.core.rank.rank_step` calls — so ``rankwise.train.train``, the Hugging Face callback
and user loops need no extra call.

Randomness: layer ``name`` is initialised from ``torch.Generator(weight.device)`` seeded with
``crc32(seed, name)``, so the same seed gives the same model whatever the other layers are, and a
re-initialisation at step ``t`` (ReLoRA) seeds from ``(seed, name, t)``: a run resumed from a
checkpoint draws the same numbers as an uninterrupted one.

Resume: every wrapped layer is marked ``checkpoint_frozen = True``, so
:func:`rankwise.train.save_checkpoint` keeps its whole state — frozen tensors that change during
training (ReLoRA's ``W`` after a merge, LoQT's re-quantized base, SST's swapped vectors) included —
and a resume is bit-exact. :func:`frozen_state` returns the same tensors for other checkpoint code.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import zlib

import torch
from torch import nn

from ..errors import ConfigError, TargetError, UnsupportedLayerError, close_names

__all__ = ["PARAMETRIZATIONS", "TARGETS", "export_dense", "frozen_state", "has_step_hook", "layer_generator",
           "load_pretrained", "parametrize", "pretrain_step", "register", "stored_parameters", "to_dense",
           "trainable_parameters_count", "wrapped_layers"]

#: name -> class, filled by :func:`register`.
PARAMETRIZATIONS: dict[str, type] = {}
#: Default targets: the attention and MLP projections of a transformer block (never embeddings or
#: the output layer). Same value as ``rankwise.cli.pretrain.TARGETS``.
TARGETS = r"(self_attn|mlp)\."
_RECORD = "_rankwise_pretrain"  # on the model: (name, config)
_LAYER = "_rankwise_pretrain_layer"  # on each wrapped module: the parametrization's name


def register(cls):
    """Class decorator: check the parametrization's interface and add it to :data:`PARAMETRIZATIONS`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"register: {cls.__name__} needs a class attribute name (a non-empty str).")
    if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
        raise TypeError(f"register: {cls.__name__}.Config must be a dataclass of its options.")
    for attr in ("wrap", "dense_weight"):
        if not callable(getattr(cls, attr, None)):
            raise TypeError(f"register: {cls.__name__} needs a static method {attr}.")
    if name in PARAMETRIZATIONS and PARAMETRIZATIONS[name] is not cls:
        raise TypeError(f"register: a parametrization named {name!r} exists already "
                        f"({PARAMETRIZATIONS[name].__module__}).")
    PARAMETRIZATIONS[name] = cls
    return cls


def _get(name: str):
    if name not in PARAMETRIZATIONS:
        raise ConfigError(f"pretrain: unknown parametrization {name!r}; registered: "
                          f"{', '.join(sorted(PARAMETRIZATIONS)) or 'none'}." + close_names(name, PARAMETRIZATIONS))
    return PARAMETRIZATIONS[name]


def _generator(device: torch.device, seed: int, *parts) -> torch.Generator:
    # one 32-bit key from everything: the CPU generator (mt19937) only uses a seed's low 32 bits
    return torch.Generator(device=device).manual_seed(zlib.crc32("/".join(map(str, (seed, *parts))).encode()))


def layer_generator(module: nn.Module, *parts) -> torch.Generator:
    """A generator for a re-initialisation of a wrapped layer, a pure function of the
    parametrize seed, the layer's name and ``parts`` (e.g. the step)."""
    device = next(module.parameters()).device
    return _generator(device, module._rankwise_seed, module._rankwise_name, *parts)


def parametrize(model: nn.Module, name: str, targets: str | None = None, seed: int = 0, **options) -> nn.Module:
    """Replace every ``nn.Linear`` whose qualified name matches the regex ``targets`` (default
    :data:`TARGETS`) by parametrization ``name`` with ``options`` (its ``Config`` fields).

    Everything is checked first (unknown name or option, invalid value, nothing matched, a rank
    that does not fit a layer), so an error leaves the model unchanged. The output layer
    (``model.get_output_embeddings()``) is never replaced. Records ``model._rankwise_pretrain``;
    a model takes one parametrization. Returns the model.
    """
    cls = _get(name)
    if getattr(model, _RECORD, None) is not None:
        raise ConfigError(f"pretrain: {type(model).__name__} is already parametrized with "
                          f"{getattr(model, _RECORD)[0]!r}; a model takes one parametrization (build a fresh model).")
    fields = [f.name for f in dataclasses.fields(cls.Config)]
    unknown = [k for k in options if k not in fields]
    if unknown:
        raise ConfigError(f"pretrain: {name} has no option {unknown[0]!r}; its options are {', '.join(fields)}."
                          + close_names(unknown[0], fields))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"pretrain: seed={seed!r} must be an int >= 0.")
    config = cls.Config(**options)
    try:
        pattern = re.compile(TARGETS if targets is None else targets)
    except (re.error, TypeError) as e:
        raise ConfigError(f"pretrain: targets={targets!r} is not a valid regular expression ({e}).") from None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n and m is not head]
    matched = [(n, m) for n, m in linears if pattern.search(n)]
    # a matched layer with a weight matrix that is not an nn.Linear (GPT-2's Conv1D, a convolution, an
    # embedding) would silently stay dense: refuse it
    other = [(n, m) for n, m in model.named_modules() if n and pattern.search(n) and not isinstance(m, nn.Linear)
             and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim >= 2 and m is not head]
    if other:
        n, m = other[0]
        raise UnsupportedLayerError(
            f"pretrain: targets={pattern.pattern!r} matches {n}, a {type(m).__name__} (weight shape "
            f"{tuple(m.weight.shape)}); {name} replaces nn.Linear layers only. Narrow targets to the nn.Linear "
            "layers (e.g. r'(self_attn|mlp)\\.') or convert the model's layers to nn.Linear first.")
    if not matched:
        shown = ", ".join(n for n, _ in linears[:8]) or "none"
        raise TargetError(f"pretrain: targets={pattern.pattern!r} matches no nn.Linear of {type(model).__name__} "
                          f"(its linear layers: {shown}); pass a regex that matches some of them.")
    rank = getattr(config, "rank", None)
    for n, m in matched:
        if rank is not None and rank >= min(m.in_features, m.out_features):
            raise ConfigError(f"pretrain: {name} rank={rank} is not below min(out, in) = "
                              f"{min(m.in_features, m.out_features)} of {n} (shape {tuple(m.weight.shape)}); "
                              "a factorization that large saves nothing. Lower rank.")
        if hasattr(cls, "check"):
            cls.check(n, m, config)
    wrapped = []
    for n, m in matched:  # build every replacement before touching the model
        new = cls.wrap(m, config, _generator(m.weight.device, seed, n))
        # checkpoint_frozen: rankwise.train's checkpoints keep the layer's whole state (merged W,
        # quantized base, sampled vectors), so a resume after a merge is exact
        new.__dict__.update({_LAYER: name, "_rankwise_seed": seed, "_rankwise_name": n, "checkpoint_frozen": True})
        wrapped.append((n, new))
    for n, new in wrapped:
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    model.__dict__[_RECORD] = (name, config)
    return model


def wrapped_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(qualified_name, module)]`` of the parametrized layers of ``model``."""
    return [(n, m) for n, m in model.named_modules() if _LAYER in m.__dict__]


def _optimizers(optimizers) -> list:
    if optimizers is None:
        return []
    if isinstance(optimizers, torch.optim.Optimizer) or hasattr(optimizers, "param_groups"):
        return [optimizers]
    return list(optimizers)


def pretrain_step(model: nn.Module, step: int, optimizers=(), total_steps: int | None = None) -> dict:
    """Run the parametrization's ``on_step`` for optimizer step ``step`` (1-based, after
    ``optimizer.step()``); ``optimizers`` (one or a list) hold the state that merges and restarts
    reset. Returns its info dict, ``{}`` if nothing happened or the model is not parametrized."""
    record = getattr(model, _RECORD, None)
    if record is None:
        return {}
    cls = _get(record[0])
    hook = getattr(cls, "on_step", None)
    if hook is None:
        return {}
    return hook(model, wrapped_layers(model), record[1], step, _optimizers(optimizers), total_steps) or {}


def has_step_hook(model: nn.Module) -> bool:
    """Whether ``model`` is parametrized by a class with an ``on_step`` hook."""
    record = getattr(model, _RECORD, None)
    return record is not None and getattr(_get(record[0]), "on_step", None) is not None


@torch.no_grad()
def to_dense(model: nn.Module) -> nn.Module:
    """Replace every parametrized layer by a plain ``nn.Linear`` holding ``cls.dense_weight(module)``
    (and its bias), so the model saves and loads without rankwise. All dense weights are computed
    before anything is replaced (CoLA, which has none, raises and leaves the model as it was)."""
    record = getattr(model, _RECORD, None)
    if record is None:
        raise ConfigError(f"to_dense: {type(model).__name__} is not parametrized (rankwise.pretrain.parametrize).")
    cls = _get(record[0])
    dense = []
    for n, m in wrapped_layers(model):
        w = cls.dense_weight(m)
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype)
        linear.weight.copy_(w)
        if m.bias is not None:
            linear.bias.copy_(m.bias)
        dense.append((n, linear))
    for n, linear in dense:
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    del model.__dict__[_RECORD]
    return model


def stored_parameters(model: nn.Module) -> int:
    """Numbers the model stores as parameters (trainable and frozen; buffers such as SLTrain's
    indices are not parameters and not counted)."""
    return sum(p.numel() for p in model.parameters())


def trainable_parameters_count(model: nn.Module) -> int:
    """Numbers the optimizer trains (``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of the parametrized layers that a checkpoint of trainable parameters misses:
    frozen parameters (ReLoRA's merged ``W``) and persistent buffers (SLTrain's indices), by their
    ``state_dict`` name. Save them next to a :func:`rankwise.train.save_checkpoint` and restore them
    with ``model.load_state_dict(tensors, strict=False)`` for a bit-exact resume after a merge."""
    out = {}
    for n, m in wrapped_layers(model):
        trainable = {id(p) for p in m.parameters() if p.requires_grad}
        for k, v in m.state_dict(keep_vars=True).items():
            if id(v) not in trainable:
                out[f"{n}.{k}"] = v.detach()
    return out


def load_pretrained(out_dir, dtype=None, device=None):
    """The model a ``rankwise pretrain`` run saved (see :func:`rankwise.pretrain.io.load_pretrained`)."""
    from .io import load_pretrained as load

    return load(out_dir, dtype=dtype, device=device)


def export_dense(out_dir, hf_dir):
    """A plain Hugging Face folder of a ``rankwise pretrain`` run (:func:`rankwise.pretrain.io.export_dense`)."""
    from .io import export_dense as export

    return export(out_dir, hf_dir)


def _load_builtins() -> None:
    for mod in ("relora", "sltrain", "cola", "sst", "loqt"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # a parametrization not written yet
            if e.name != f"{__name__}.{mod}":
                raise


_load_builtins()
