"""Shared pieces of the rankwise.pretrain tests: a tiny LLaMA, byte batches, a short train() run."""

from __future__ import annotations

import torch

VOCAB = 64
SMALL = {  # small ranks and frequent events so that a few steps exercise every code path
    "relora": dict(rank=4, reset_every=3),
    "periodic_lora": dict(rank=4, reset_every=3),
    "sltrain": dict(rank=4, density=0.1),
    "cola": dict(rank=4),
}


def tiny_llama(seed: int = 0, layers: int = 2, dtype=torch.float32):
    """LlamaForCausalLM from a config: hidden 32, MLP 64, 2 layers, 2 heads, vocab 64, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0, initializer_range=0.2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def ids(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def data(n: int = 16, length: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, VOCAB, (length,), generator=g) for _ in range(n)]


def collate(items):
    return torch.stack(items)


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def config(steps: int, **kw):
    from rankwise.train import TrainConfig

    return TrainConfig(**{"steps": steps, "batch_size": 4, "lr": 1e-2, "warmup": 1, **kw})


def run(model, steps: int, **kw):
    from rankwise.train import train

    return train(model, data(), collate, lm_loss, config(steps, **kw), progress=False)


def perturb_(params, seed: int = 0, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)
