"""QLoRA bases on the CPU: bitsandbytes 4-bit (nf4) and 8-bit LLaMA models adapt, train a step and
match PEFT on the same quantized base.

Oracles: PEFT's LoRA / DoRA layers for bitsandbytes (``peft.tuners.lora.bnb``) on a second copy of
the same quantized model, with our tensors copied in; the dense top-r SVD of the weight PEFT's
``dequantize_bnb_weight`` returns, for PiSSA's init; ``get_nb_trainable_parameters``; and
``peft.prepare_model_for_kbit_training`` on a third copy for :func:`rw.prepare_for_kbit_training`.
"""

from __future__ import annotations

import pytest
import torch

import rankwise as rw
from rankwise.core.api import adapted_layers

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("single_thread")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {"q_proj": (64, 64), "k_proj": (64, 64), "v_proj": (64, 64), "o_proj": (64, 64),
          "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny LlamaForCausalLM (hidden 64) saved with save_pretrained: quantized on load."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, initializer_range=0.2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def quantized(path, bits: int, dtype=torch.float32):
    import warnings

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype) if bits == 4
         else BitsAndBytesConfig(load_in_8bit=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu", dtype=dtype).eval()


def ids():
    return torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(3))


def dense_w0(layer) -> torch.Tensor:
    """The oracle's dequantization: PEFT's ``dequantize_bnb_weight``."""
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).float()


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for p in layer.adapters["default"].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapt_quantized_base_matches_peft(base_dir, bits, method):
    import peft

    model = rw.adapt(quantized(base_dir, bits), method, rank=4, alpha=8, targets=TARGETS, seed=0)
    layers = dict(adapted_layers(model))
    assert len(layers) == 7
    for name, layer in layers.items():
        assert isinstance(layer.base, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
        assert layer.view.shape == SHAPES[name.rsplit(".", 1)[-1]]  # never the packed storage
    _randomize(model)

    pmodel = peft.get_peft_model(quantized(base_dir, bits),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=method == "dora"))
    pmods = dict(pmodel.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            theirs, ours = pmods[f"base_model.model.{name}"], layer.adapters["default"]
            assert type(theirs).__module__.endswith("lora.bnb")  # PEFT's bitsandbytes layer
            theirs.lora_A["default"].weight.copy_(ours.lora_A)
            theirs.lora_B["default"].weight.copy_(ours.lora_B)
            if method == "dora":
                theirs.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    pmodel.eval()
    with torch.no_grad():
        out, ref = model(ids()).logits, pmodel(ids()).logits
        with rw.disabled(model):
            plain = model(ids()).logits
    assert (out - plain).abs().max() > 1e-2  # the adapters act
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_pissa_reads_the_dequantized_weight(base_dir, bits):
    model = quantized(base_dir, bits)
    with torch.no_grad():
        before = model(ids()).logits
    rw.adapt(model, "pissa", rank=4, targets=["q_proj", "down_proj"], seed=0)
    for name, layer in adapted_layers(model):
        w0 = dense_w0(layer.base)
        u, s, vt = torch.linalg.svd(w0.double(), full_matrices=False)
        top = (u[:, :4] * s[:4]) @ vt[:4]
        assert torch.equal(layer.view.weight2d().float(), w0)  # the dequantized W0, (out, in)
        ad = layer.adapters["default"]
        torch.testing.assert_close((ad.lora_B @ ad.lora_A * ad.scale).double(), top, atol=1e-4, rtol=1e-4, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, before, atol=1e-4, rtol=1e-4)  # W0 − s·B₀A₀ + s·BA = W0


@pytest.mark.parametrize("bits", [4, 8])
def test_one_training_step_updates_only_adapters(base_dir, bits):
    model = rw.prepare_for_kbit_training(quantized(base_dir, bits), use_gradient_checkpointing=True)
    assert model.is_gradient_checkpointing
    rw.adapt(model, "lora", rank=4, targets=TARGETS, seed=0)
    _randomize(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(".adapters.default.lora_" in n for n in adapters)
    opt = torch.optim.SGD(rw.trainable_parameters(model), lr=0.1)
    model.train()
    x = ids()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(adapters)  # gradients flow into the adapters only
    assert all(g.abs().sum() > 0 for g in grads.values())  # layer 0 too, through the checkpointed block
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, adapters[n]), n


def test_prepare_for_kbit_training_matches_peft(base_dir):
    import peft

    ours = rw.prepare_for_kbit_training(quantized(base_dir, 4, dtype=torch.bfloat16))
    theirs = peft.prepare_model_for_kbit_training(quantized(base_dir, 4, dtype=torch.bfloat16))
    a, b = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert a.keys() == b.keys()
    assert any(p.dtype == torch.float32 for p in a.values())  # the norms, embeddings and head were bf16
    assert a["model.norm.weight"].dtype == torch.float32
    for n in a:
        assert (a[n].dtype, a[n].requires_grad) == (b[n].dtype, b[n].requires_grad), n
    assert ours.is_gradient_checkpointing and theirs.is_gradient_checkpointing
    with torch.no_grad():
        assert ours.get_input_embeddings()(ids()).requires_grad == theirs.get_input_embeddings()(ids()).requires_grad


def test_parameter_count_matches_peft_on_4bit(base_dir):
    import peft

    model = rw.adapt(quantized(base_dir, 4), "lora", rank=4, targets=TARGETS, seed=0)
    pmodel = peft.get_peft_model(quantized(base_dir, 4), peft.LoraConfig(r=4, target_modules=TARGETS))
    assert tuple(rw.parameter_count(model))[:2] == pmodel.get_nb_trainable_parameters()


def test_quantized_refusals_leave_the_model_unchanged(base_dir, tmp_path):
    model = quantized(base_dir, 4)
    with pytest.raises(rw.errors.UnsupportedLayerError, match=r"lora_ga.*q_proj.*bitsandbytes 4bit layer \(64x64\)"):
        rw.adapt(model, "lora_ga", rank=2, targets=["q_proj"], calibration=[{"input_ids": ids()}],
                 loss_fn=lambda m, b: m(**b, labels=b["input_ids"]).loss)
    assert not adapted_layers_of(model)
    rw.adapt(model, "lora", rank=2, targets=["q_proj"], seed=0)
    _randomize(model)
    with torch.no_grad():
        out = model(ids()).logits
    with pytest.raises(rw.errors.ConfigError, match=r"q_proj' is a bitsandbytes 4bit layer; its packed weight"):
        rw.merge(model)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, out)
    # an adapter trained on the quantized base loads onto the full-precision one (QLoRA → inference)
    rw.save(model, tmp_path / "ad")
    from transformers import AutoModelForCausalLM

    full = rw.load(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "ad")
    ours = dict(adapted_layers(model))["model.layers.0.self_attn.q_proj"].adapters["default"]
    again = dict(adapted_layers(full))["model.layers.0.self_attn.q_proj"].adapters["default"]
    assert torch.equal(ours.lora_A, again.lora_A) and torch.equal(ours.lora_B, again.lora_B)


def adapted_layers_of(model):
    return list(adapted_layers(model))
