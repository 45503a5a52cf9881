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
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from ..core.rank import has_rank_hooks, rank_regularization, rank_step


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
