"""QLoRA bases: bitsandbytes 4-bit / 8-bit models, prepared for adapter training.

``rw.adapt`` accepts ``bnb.nn.Linear4bit`` and ``bnb.nn.Linear8bitLt`` layers as kind ``linear``
(see :mod:`rankwise.core.layers`): activation-view methods run the quantized layer as it is, and
methods that read ``W0`` (PiSSA, DoRA …) get the dequantized weight. The recipe (QLoRA, Dettmers
et al. 2023, arXiv:2305.14314, as PEFT writes it)::

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    model = rw.prepare_for_kbit_training(model, use_gradient_checkpointing=True)
    rw.adapt(model, "lora", rank=16, targets="all-linear")

:func:`prepare_for_kbit_training` follows ``peft.prepare_model_for_kbit_training`` (PEFT 0.21): it
freezes the base, casts every float16 / bfloat16 parameter that is not 4-bit storage (norms,
embeddings, the head, biases) to float32 for stable training, and — for a quantized model with
gradient checkpointing — turns checkpointing on and makes the input embeddings' output require
gradients (needed by reentrant checkpointing, whose blocks otherwise see no input that requires
grad when every weight is frozen). Deviation: adapters already on the model keep their trainable
flags (PEFT freezes every parameter; it is meant to run before ``get_peft_model``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.layers import quantization_of
from ..errors import ConfigError

HALF = (torch.float16, torch.bfloat16)


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds bitsandbytes 4-bit / 8-bit layers (or says it was loaded so)."""
    return (bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
            or any(quantization_of(m) is not None for m in model.modules()))


def _enable_input_grads(model: nn.Module) -> None:
    if callable(getattr(model, "enable_input_require_grads", None)):
        model.enable_input_require_grads()
        return
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else None
    if emb is None:
        raise ConfigError(f"prepare_for_kbit_training: {type(model).__name__} has no get_input_embeddings(), so "
                          "its inputs cannot be made to require gradients for reentrant checkpointing. Pass "
                          "gradient_checkpointing_kwargs={'use_reentrant': False}.")

    def require_grad(module, inputs, output):
        output.requires_grad_(True)

    emb.register_forward_hook(require_grad)


def prepare_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                              gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """Prepare a bitsandbytes-quantized model for adapter training (see the module docstring); returns
    ``model``, changed in place. Works on a model with or without rankwise adapters."""
    from ..core.api import adapter_parameters, adapter_state

    kwargs = dict(gradient_checkpointing_kwargs or {})
    keep = {id(p) for name in adapter_state(model) for p in adapter_parameters(model, name)}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    for p in model.parameters():
        if p.dtype in HALF and type(p).__name__ != "Params4bit":
            p.data = p.data.to(torch.float32)
    if use_gradient_checkpointing and is_quantized(model):
        kwargs.setdefault("use_reentrant", True)  # PEFT's (and torch's former) default, said explicitly
        if kwargs["use_reentrant"]:
            _enable_input_grads(model)
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if not callable(enable):
            raise ConfigError(f"prepare_for_kbit_training: {type(model).__name__} has no gradient_checkpointing_enable(); "
                              "pass use_gradient_checkpointing=False (or checkpoint its blocks yourself).")
        enable(gradient_checkpointing_kwargs=kwargs)
    return model
