"""Hugging Face ``Trainer`` support for adapters that act during training.

Some methods do more than train their parameters: AdaLoRA, IncreLoRA, DyLoRA and AfLoRA
reallocate or freeze rank, SoRA takes a proximal step on its gates and prunes them, LaMDA freezes
its projection column by column (the ``on_step`` hooks, run by :func:`rankwise.rank_step`), and
AdaLoRA, IncreLoRA, SORSA and HRA add a term to the loss (the ``rank_regularization`` hooks,
summed by :func:`rankwise.rank_regularization`). ``rankwise.train`` runs both; with the Hugging
Face ``Trainer`` use one of::

    from rankwise.integrations.hf_trainer import RankCallback, RankwiseTrainer

    trainer = RankwiseTrainer(model=model, args=args, train_dataset=ds)   # both hooks
    trainer = Trainer(..., callbacks=[RankCallback()])                   # on_step hooks only

:class:`RankCallback` calls ``rw.rank_step(model, step, optimizer, total_steps=max_steps)`` in
``on_optimizer_step`` — after ``optimizer.step()``, while the step's gradients are still in
``.grad`` and before the scheduler moves the learning rate, as the hooks require (``step`` is
the number of optimizer steps taken, from 1). :class:`RankwiseTrainer` adds the callback and
adds the loss terms to the training loss in ``compute_loss`` (not to evaluation losses); with
gradient accumulation each step counts the terms once, whether the Trainer divides the
micro-batch loss by the accumulation steps or the loss is already normalized over them.

A model without such adapters trains exactly as with the plain ``Trainer`` (both hooks are then
no-ops). This module imports ``transformers``; the rest of rankwise does not need it.

**Checkpoints.** ``rw.adapt`` makes ``save_pretrained`` of a Hugging Face model write its adapters
(:func:`rankwise.integrations.hf.save_pretrained`: ``adapter/`` in rankwise format, ``peft/`` in
PEFT format where the method has one, ``modules_to_save`` included) instead of the wrapped base, so
every ``Trainer`` checkpoint and ``save_model`` folder holds the adapters only, next to the
Trainer's optimizer, scheduler, RNG and ``trainer_state.json``. Load one in one call::

    model = rw.from_pretrained(base_model_or_folder, "out/checkpoint-100")   # logits equal the live model

:class:`RankwiseTrainer` also resumes from such a checkpoint (``train(resume_from_checkpoint=...)``):
the adapter tensors are copied into the live adapters (rebuilt when rank allocation changed their
shapes), the Trainer restores optimizer, scheduler and RNG, and the adapters' rank-allocation state
kept outside parameters and buffers (AdaLoRA's / IncreLoRA's importance averages …) comes back from
``rankwise_rank_state.safetensors``. ``load_best_model_at_end`` works the same way. The plain
``Trainer`` writes the same checkpoints, but its resume reads full model weights only: resume with
:class:`RankwiseTrainer`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..core.api import active_adapters, adapted_layers, adapter_state, set_active
from ..core.rank import has_rank_hooks, rank_regularization, rank_step
from .hf import ADAPTER_DIR, save_pretrained

RANK_STATE = "rankwise_rank_state.safetensors"
_SKIP = {"view", "config", "training"}  # attributes of an adapter that are not training state


# ---- rank-allocation state kept outside parameters and buffers ----------------------------------------
def _walk(obj, path: str, out: dict, depth: int = 0) -> None:
    """Tensors reachable from ``obj`` through dicts, lists and rankwise's own plain objects."""
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        out[path] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and "/" not in k and "." not in k:
                _walk(v, f"{path}.{k}", out, depth + 1)
    elif (not isinstance(obj, nn.Module) and type(obj).__module__.startswith("rankwise")
          and hasattr(obj, "__dict__")):
        for k, v in vars(obj).items():
            _walk(v, f"{path}.{k}", out, depth + 1)


def rank_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<adapter>/<module>/<attr path>": tensor}`` for every tensor an adapter keeps in plain
    attributes (not parameters or buffers, which the adapter folder holds)."""
    out: dict[str, torch.Tensor] = {}
    for lname, layer in adapted_layers(model):
        for aname, ad in layer.adapters.items():
            for k, v in vars(ad).items():
                if k.startswith("__") or k in _SKIP or k in ("_parameters", "_buffers", "_modules"):
                    continue
                if isinstance(v, (dict, torch.Tensor)) or (not isinstance(v, nn.Module)
                                                           and type(v).__module__.startswith("rankwise")):
                    _walk(v, f"{aname}/{lname}/{k}", out)
    return out


def load_rank_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put :func:`rank_state` tensors back (paths the model lacks are skipped)."""
    layers = dict(adapted_layers(model))
    for key, t in tensors.items():
        aname, lname, path = key.split("/", 2)
        layer = layers.get(lname)
        if layer is None or aname not in layer.adapters:
            continue
        obj, steps = layer.adapters[aname], path.split(".")
        for step in steps[:-1]:
            obj = obj.get(step) if isinstance(obj, dict) else getattr(obj, step, None)
            if obj is None:
                break
        else:
            like = obj.get(steps[-1]) if isinstance(obj, dict) else getattr(obj, steps[-1], None)
            device = like.device if isinstance(like, torch.Tensor) else layer.view.weight.device
            value = t.to(device)
            if isinstance(obj, dict):
                obj[steps[-1]] = value
            else:
                setattr(obj, steps[-1], value)


def restore_adapters(model: nn.Module, folder) -> None:
    """Copy the adapters saved in ``folder`` (``rw.save`` format) into ``model``'s live adapters of the
    same names, in place (an optimizer built over them stays valid); an adapter whose saved shapes
    differ (rank allocation pruned or grew it) is rebuilt with ``rw.load(..., trainable=True)``.
    Active adapters stay as they were."""
    from ..core.api import delete
    from ..errors import ShapeMismatchError
    from ..io.files import _copy, _plan, load, read

    cfg, tensors = read(folder)
    active = active_adapters(model)
    state = adapter_state(model)
    for name, info in cfg["adapters"].items():
        entry = state.get(name)
        same = (entry is not None and sorted(entry["modules"]) == sorted(info["modules"])
                and all(entry.get("overrides", {}).get(m) == i.get("overrides") for m, i in info["modules"].items()))
        if same:
            try:
                plan = _plan(model, name, info, tensors)
            except ShapeMismatchError:
                same = False
        if same:
            _copy(model, info, plan, tensors)
            for mname in info["modules"]:
                dict(adapted_layers(model))[mname].adapters[name].loaded()
            continue
        if entry is not None:
            delete(model, name)
        load(model, folder, names=[name], trainable=True)
    set_active(model, [n for n in active if n in adapter_state(model)] or list(cfg["adapters"]))


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / DataParallel
        model = model.module
    return model


class RankCallback(TrainerCallback):
    """Run the adapters' ``on_step`` hooks (rank allocation, pruning, freezing) after each optimizer step."""

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        model = _unwrap(model)
        if model is None or not has_rank_hooks(model):
            return control
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        total = state.max_steps if state.max_steps and state.max_steps > 0 else None
        rank_step(model, state.global_step + 1, inner, total_steps=total)
        return control


class RankwiseTrainer(Trainer):
    """``transformers.Trainer`` with the adapters' loss terms in the training loss and
    :class:`RankCallback` installed (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(c, RankCallback) for c in self.callback_handler.callbacks):
            self.add_callback(RankCallback())

    # ---- adapter-only checkpoints ------------------------------------------------------------
    def _adapted(self):
        model = _unwrap(self.accelerator.unwrap_model(self.model))
        return model if adapter_state(model) else None

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """An adapted model: its adapters (``adapter/``, ``peft/``), the rank-allocation state, the
        tokenizer and the training arguments — not the base model's weights."""
        model = self._adapted()
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        from ..io.atomic import atomic_path, save_tensors

        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        os.makedirs(out, exist_ok=True)
        save_pretrained(model, out)
        extra = rank_state(model)
        if extra:
            save_tensors(out / RANK_STATE, extra, metadata={"format": "pt"})
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(out))
        with atomic_path(out / "training_args.bin") as tmp:
            torch.save(self.args, tmp)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = _unwrap(model if model is not None else self.model)
        folder = Path(resume_from_checkpoint) / ADAPTER_DIR
        if not adapter_state(target) or not (folder / "adapter_config.json").is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_adapters(target, folder)
        extra = Path(resume_from_checkpoint) / RANK_STATE
        if extra.is_file():
            from ..io.atomic import read_tensors

            load_rank_state(target, read_tensors(extra, "the checkpoint is damaged; resume from another one."))
        return None

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None and self._adapted() is not None and (Path(best) / ADAPTER_DIR).is_dir():
            self._load_from_checkpoint(best)
            return
        super()._load_best_model()

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """The Trainer's own test (``training_step``) for "this loss needs no 1/accumulation"."""
        fixed = getattr(self, "loss_is_scaled_for_ga", None)
        if fixed is not None:
            return bool(fixed)
        return bool((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if not model.training:
            return out
        reg = rank_regularization(_unwrap(model))
        if reg is None:
            return out
        if self._loss_scaled_for_accumulation(kwargs.get("num_items_in_batch")):
            # the Trainer will not divide this micro-batch's loss by the accumulation steps (the
            # task loss is already normalized over them): divide the term, so it counts once a step
            reg = reg / max(1, getattr(self, "current_gradient_accumulation_steps", 1))
        if return_outputs:
            loss, outputs = out
            return loss + reg.to(loss.device), outputs
        return out + reg.to(out.device)
