"""CoLA: forward and backward against a dense re-computation B·σ(A·x) + b, the authors' init
scale, to_dense refused (nonlinear bottleneck) and the model left intact, the identity variant."""

from __future__ import annotations

import math

import pytest
import torch
from _pretrain_helpers import ids, lm_loss, tiny_llama
from torch import nn

import rankwise.pretrain as rp
from rankwise.errors import ConfigError


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


class _Block(nn.Module):
    def __init__(self, m=40, n=24, bias=True, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.mlp = nn.Module()
        self.mlp.proj = nn.Linear(n, m, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.mlp.proj(x)


@pytest.mark.parametrize("activation, sigma", [
    ("silu", lambda h: h / (1 + torch.exp(-h))),  # x·sigmoid(x), written out
    ("gelu", lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))),
    ("identity", lambda h: h),
])
def test_forward_and_backward_match_the_dense_recomputation(activation, sigma):
    block = _Block()
    bias = block.mlp.proj.bias
    rp.parametrize(block, "cola", targets="proj", rank=6, activation=activation)
    layer = block.mlp.proj
    assert layer.bias is bias  # the replaced layer's bias is kept
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, 5, 40, dtype=torch.float64)
    params = [x, layer.lora_A, layer.lora_B, layer.bias]
    y = block(x)
    ref_y = torch.einsum("or,btr->bto", layer.lora_B, sigma(torch.einsum("rn,btn->btr", layer.lora_A, x))) + layer.bias
    torch.testing.assert_close(y, ref_y, atol=1e-12, rtol=1e-12)
    for g, r in zip(torch.autograd.grad(y, params, gy), torch.autograd.grad(ref_y, params, gy)):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)


def test_init_scale_is_the_authors():
    block = _Block(m=256, n=192, dtype=torch.float32)
    rp.parametrize(block, "cola", targets="proj", rank=16)
    layer = block.mlp.proj
    std = (192 + 256) ** -0.25 * 16 ** -0.25  # ColaLayer: randn / r^(1/4) · ((n + m)^(-1/2))^(1/2)
    for t in (layer.lora_A, layer.lora_B):
        assert abs(t.float().std().item() / std - 1) < 0.05 and abs(t.float().mean().item()) < 0.1 * std
    product = layer.lora_B @ layer.lora_A  # entries of variance r·std⁴ = 1 / (n + m)
    assert abs(product.var().item() * (192 + 256) - 1) < 0.1


def test_to_dense_is_refused_and_the_model_is_left_intact():
    model = tiny_llama()
    rp.parametrize(model, "cola", rank=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"not linear in x.*model.layers.0.self_attn.q_proj.*factorized form"):
        rp.to_dense(model)
    assert len(rp.wrapped_layers(model)) == 14 and model._rankwise_pretrain[0] == "cola"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.isfinite(lm_loss(model, ids()))


def test_identity_bottleneck_has_a_dense_weight_and_refactorizes():
    with pytest.raises(ConfigError, match="refactorize_every=5 needs a product B·A.*'silu'"):
        rp.parametrize(tiny_llama(), "cola", rank=4, refactorize_every=5)
    model = tiny_llama()
    rp.parametrize(model, "cola", rank=4, activation="identity", refactorize_every=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    lm_loss(model, ids()).backward()
    opt.step()
    with torch.no_grad():
        before = model(input_ids=ids(seed=3)).logits
    assert rp.pretrain_step(model, 1, opt)["refactorized_layers"] == 14
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids(seed=3)).logits, before, atol=1e-5, rtol=1e-5)
    rp.to_dense(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids(seed=3)).logits, before, atol=1e-5, rtol=1e-5)
