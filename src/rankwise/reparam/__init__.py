"""Weight reparameterizations on ``torch.nn.utils.parametrize``: the trained tensor is not the weight.

    import rankwise as rw
    rw.reparam.apply(model, "weight_compander", gain=2.0, learn=True)   # W = α tanh(γ V / α), V trained
    ...train...
    rw.reparam.save(model, "out/")         # reparam.json + model.safetensors (the whole state dict)
    rw.reparam.load(fresh_model, "out/")   # applies the same reparameterization, then loads the tensors
    rw.reparam.remove(model)               # bakes W = f(V) into plain weights (a model without parametrizations)

A reparameterization is an elementwise (or per-tensor) map ``W = f(V)`` registered with
``parametrize.register_parametrization(module, "weight", f)``: ``module.weight`` stays readable (and
``right_inverse`` makes ``module.weight = W`` assignable), the trained tensor lives at
``<module>.parametrizations.weight.original`` and ``f``'s own tensors at
``<module>.parametrizations.weight.0.*``. Those state-dict keys are the same after ``copy.deepcopy``,
pickling, ``torch.compile`` (whose wrapper only adds its ``_orig_mod.`` prefix) and save → load;
``remove`` brings back the plain ``<module>.weight`` key, holding ``f(V)``.

Reparameterizations here (one file each): ``weight_compander`` (:mod:`.weight_compander`). The methods
of the same section that keep a frozen base plus a trainable update are adapter methods instead
(``rw.adapt(model, "intrinsic", ...)``: ``rankwise/methods/intrinsic.py``; likewise ``sara``, ``pego``,
``mask_tuning`` and ``pst`` in ``rankwise/methods/``).
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn
from torch.nn.utils import parametrize as _p

from ..core.layers import kind_of
from ..errors import ConfigError, TargetError, close_names
from . import weight_compander
from .init import aligned_low_rank_, low_rank_

__all__ = ["REPARAMS", "aligned_low_rank_", "apply", "load", "low_rank_", "picklable", "remove", "reparametrized",
           "save", "weight_compander"]

#: name -> (config dataclass, builder(weight, config) -> parametrization module)
REPARAMS = {"weight_compander": (weight_compander.WeightCompanderConfig, weight_compander.build)}
_RECORD = "_rankwise_reparam"  # on the model: {"name", "options", "modules"}
_KINDS = ("linear", "hf_conv1d", "conv1d", "conv2d")
CONFIG_NAME, TENSORS_NAME = "reparam.json", "model.safetensors"


def _targets(model: nn.Module, targets, kinds) -> list[str]:
    kinds = tuple(kinds)
    bad = set(kinds) - {"linear", "hf_conv1d", "conv1d", "conv2d", "embedding"}
    if bad or not kinds:
        raise ConfigError(f"reparam: kinds={kinds!r}; use a non-empty subset of linear, hf_conv1d, conv1d, conv2d, "
                          "embedding.")
    try:
        rx = None if targets is None else re.compile(targets)
    except (re.error, TypeError) as e:
        raise ConfigError(f"reparam: targets={targets!r} is not a valid regular expression ({e}).") from None
    names = [n for n, m in model.named_modules() if n and kind_of(m) in kinds and (rx is None or rx.search(n))]
    if not names:
        shown = ", ".join(n for n, m in model.named_modules() if kind_of(m))[:300] or "none"
        raise TargetError(f"reparam: no {'/'.join(kinds)} layer of {type(model).__name__} matches targets={targets!r}; "
                          f"its layers are: {shown}.")
    return names


def apply(model: nn.Module, name: str, targets: str | None = None, kinds=_KINDS, **options) -> nn.Module:
    """Reparameterize the ``weight`` of every layer of ``kinds`` whose name matches the regex ``targets``
    (default: all of them) with reparameterization ``name`` and its ``options``. Everything is checked
    before the first layer changes (unknown name/option, bad value, no match, a weight already
    parametrized or not floating point), so an error leaves the model unchanged. Returns the model."""
    if name not in REPARAMS:
        raise ConfigError(f"reparam: unknown reparameterization {name!r}; available: {', '.join(REPARAMS)}."
                          + close_names(name, REPARAMS))
    cfg_cls, build = REPARAMS[name]
    fields = [f.name for f in dataclasses.fields(cfg_cls)]
    unknown = [k for k in options if k not in fields]
    if unknown:
        raise ConfigError(f"reparam: {name} has no option {unknown[0]!r}; its options are {', '.join(fields)}."
                          + close_names(unknown[0], fields))
    config = cfg_cls(**options)
    names = _targets(model, targets, kinds)
    if getattr(model, _RECORD, None) is not None:
        raise ConfigError(f"reparam: {type(model).__name__} is already reparameterized with "
                          f"{getattr(model, _RECORD)['name']!r}; call rw.reparam.remove(model) first.")
    mods = {n: model.get_submodule(n) for n in names}
    for n, m in mods.items():
        if _p.is_parametrized(m, "weight"):
            raise ConfigError(f"reparam: module '{n}' already has a parametrization of its weight; remove it first.")
        if not m.weight.is_floating_point():
            raise ConfigError(f"reparam: module '{n}' has a {m.weight.dtype} weight (quantized?); reparameterize a "
                              "floating-point model.")
    built = {n: build(m.weight, config) for n, m in mods.items()}
    for n, m in mods.items():  # the inverse of every layer first: refuse before any layer changes
        built[n].right_inverse(m.weight)
    for n, m in mods.items():
        _p.register_parametrization(m, "weight", built[n])
        picklable(m)
    setattr(model, _RECORD, {"name": name, "options": dataclasses.asdict(config), "modules": names,
                             "kinds": list(kinds)})
    return model


# ---- pickling -------------------------------------------------------------------------------------
# ``parametrize`` gives every parametrized module a class of its own (``ParametrizedLinear``, made at
# registration) whose ``__getstate__`` refuses to pickle (pytorch/pytorch issues on pickling and
# multiprocessing of parametrized modules). ``picklable`` sets ``__reduce_ex__`` on that class: the module
# is pickled as its plain class and state, plus each parametrized tensor's parametrization modules and
# its ``original``; unpickling registers them again and puts ``original`` back bit for bit (the
# parametrizations' ``right_inverse`` is not run: ``original`` is the trained tensor, not a weight).


def _skip_inverse(*_args):
    raise NotImplementedError  # ParametrizationList takes this as "right_inverse is the identity"


def _rebuild(cls, state: dict, tensors: dict):
    module = cls.__new__(cls)
    module.__dict__.update(state)
    for tname, (plist, original) in tensors.items():
        saved = original.detach().clone()
        module._parameters[tname] = original
        for p in plist:
            p.right_inverse = _skip_inverse
            try:
                _p.register_parametrization(module, tname, p, unsafe=True)
            finally:
                del p.right_inverse
        with torch.no_grad():
            module.parametrizations[tname].original.copy_(saved)
    return picklable(module)


def _reduce(self, protocol):
    plain_cls = type(self).__bases__[0]
    state = dict(self.__dict__)
    modules = dict(state["_modules"])
    plists = modules.pop("parametrizations")
    state["_modules"] = modules
    tensors = {}
    for tname, plist in plists.items():
        if not plist.is_tensor:
            raise TypeError(f"rankwise.reparam: cannot pickle {plain_cls.__name__}.{tname}, whose parametrization keeps "
                            "several original tensors; save it with state_dict().")
        tensors[tname] = (list(plist), plist.original)
    return _rebuild, (plain_cls, state, tensors)


def picklable(module: nn.Module) -> nn.Module:
    """Let ``pickle`` (and ``torch.save`` of whole models, ``multiprocessing``) handle a parametrized module."""
    if _p.is_parametrized(module):
        type(module).__reduce_ex__ = _reduce
    return module


def reparametrized(model: nn.Module) -> dict | None:
    """The record of ``apply`` on ``model`` (name, options, module names) or None."""
    return getattr(model, _RECORD, None)


def remove(model: nn.Module) -> nn.Module:
    """Bake ``W = f(V)`` into each reparameterized layer's plain ``weight`` and drop the parametrizations."""
    rec = reparametrized(model)
    if rec is None:
        raise ConfigError(f"reparam: {type(model).__name__} has no reparameterization to remove.")
    for n in rec["modules"]:
        m = model.get_submodule(n)
        if _p.is_parametrized(m, "weight"):
            _p.remove_parametrizations(m, "weight", leave_parametrized=True)
    delattr(model, _RECORD)
    return model


def save(model: nn.Module, path) -> None:
    """Write ``reparam.json`` (name, options, modules) and ``model.safetensors`` (the model's state dict,
    the stable keys above) to folder ``path``, atomically."""
    from ..io.atomic import atomic_dir, save_tensors, write_json

    rec = reparametrized(model)
    if rec is None:
        raise ConfigError(f"reparam.save: {type(model).__name__} has no reparameterization; save it with "
                          "torch/safetensors, or rw.reparam.apply(...) first.")
    with atomic_dir(path, (CONFIG_NAME, TENSORS_NAME), "reparameterized model") as tmp:
        write_json(tmp / CONFIG_NAME, rec)
        save_tensors(tmp / TENSORS_NAME, dict(model.state_dict()))


def load(model: nn.Module, path) -> nn.Module:
    """Apply the saved reparameterization to ``model`` (a fresh one of the same architecture) and load
    the saved tensors into it. Checks the file against the model before changing it."""
    from pathlib import Path

    from ..io.atomic import read_json, read_tensors

    fix = "pass a folder written by rw.reparam.save."
    rec = read_json(Path(path) / CONFIG_NAME, fix)
    tensors = read_tensors(Path(path) / TENSORS_NAME, fix)
    missing = [n for n in rec.get("modules", []) if n not in dict(model.named_modules())]
    if missing:
        raise TargetError(f"reparam.load: {path} was saved from a model with module(s) {missing[:3]} that "
                          f"{type(model).__name__} lacks; load it onto the architecture it was saved from.")
    rx = "^(" + "|".join(re.escape(n) for n in rec["modules"]) + ")$"
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    apply(model, rec["name"], targets=rx, kinds=rec.get("kinds", _KINDS), **rec["options"])
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:  # load_state_dict copies what fits before it raises: put everything back
        _restore(model, rec["modules"], before)
        raise TargetError(f"reparam.load: the tensors in {path} do not fit {type(model).__name__} ({e}); load them "
                          "onto the architecture they were saved from.") from None
    return model


@torch.no_grad()
def _restore(model: nn.Module, names: list[str], state: dict[str, torch.Tensor]) -> None:
    """Undo ``apply`` and put back the exact state of before (a failed ``load`` changes nothing)."""
    for n in names:
        m = model.get_submodule(n)
        if _p.is_parametrized(m, "weight"):
            _p.remove_parametrizations(m, "weight", leave_parametrized=False)
    delattr(model, _RECORD)
    model.load_state_dict(state, strict=True)
