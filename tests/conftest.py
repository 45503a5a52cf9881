"""Shared fixtures: tiny Hugging Face models built from configs (random weights, no hub),
and helpers to give adapters non-zero values."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 100
# Larger than HF's 0.02 so logits are O(1) and an absolute tolerance of 1e-5 is a strict test.
INIT_RANGE = 0.2


def _quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()


def make_bert(seed: int = 0, num_labels: int = 3):
    """BertForSequenceClassification: hidden 32, 2 layers, 2 heads, vocab 100, dropout off."""
    from transformers import BertConfig, BertForSequenceClassification

    _quiet_transformers()
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).eval()


def make_gpt2(seed: int = 0):
    """GPT2LMHeadModel (HF Conv1D c_attn / c_proj / c_fc): n_embd 32, 2 layers, 2 heads, dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _quiet_transformers()
    cfg = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).eval()


def make_llama(seed: int = 0):
    """LlamaForCausalLM with ``model.embed_tokens`` (a name PEFT treats specially)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread: for these tiny models threads cost more than they save,
    most of all on a busy 2-core machine. Restores the previous setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def bert():
    """Factory: ``bert(seed=0)`` → a fresh tiny BertForSequenceClassification."""
    return make_bert


@pytest.fixture
def gpt2():
    """Factory: ``gpt2(seed=0)`` → a fresh tiny GPT2LMHeadModel."""
    return make_gpt2


@pytest.fixture
def llama():
    return make_llama


@pytest.fixture
def token_batch():
    """``input_ids`` (2×7) and an attention mask, seeded."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(1, VOCAB, (2, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def perturb_(params, seed: int = 0, std: float = 0.2) -> None:
    """Overwrite every tensor in ``params`` with seeded N(0, std²) values (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def adapter_params(model, name: str | None = None):
    """Parameters of all adapters (or of adapter ``name``) on ``model``, in module order."""
    from rankwise.core.adapted import AdaptedLayer

    out = []
    for m in model.modules():
        if isinstance(m, AdaptedLayer):
            for aname, ad in m.adapters.items():
                if name is None or aname == name:
                    out += list(ad.parameters())
    return out


@pytest.fixture
def perturb():
    return perturb_


@pytest.fixture
def adapter_params_of():
    return adapter_params
