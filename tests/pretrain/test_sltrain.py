"""SLTrain: fixed random support, sparse storage (no dense (m, n) tensor stored or saved for
backward), forward and backward against the dense oracle W = s·BA + S, the paper's init, the
refactorization + momentum reset."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _pretrain_helpers import ids, lm_loss, perturb_, run, tiny_llama
from torch import nn

import rankwise.pretrain as rp
from rankwise.errors import ConfigError
from rankwise.pretrain.sltrain import SLTrainLinear, refactorize_


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


class _Block(nn.Module):
    def __init__(self, m=40, n=24, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.mlp = nn.Module()
        self.mlp.proj = nn.Linear(n, m, dtype=dtype)

    def forward(self, x):
        return self.mlp.proj(x)


def _dense_oracle(layer: SLTrainLinear):
    """W = s·B A + S with S = the dense (m, n) matrix holding the values at the flat indices."""
    m, n = layer.out_features, layer.in_features
    s_dense = torch.zeros(m * n, dtype=layer.sparse_values.dtype).index_put(
        (layer.sparse_index.long(),), layer.sparse_values).view(m, n)
    return layer.scale * layer.lora_B @ layer.lora_A + s_dense


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_forward_and_backward_match_the_dense_oracle(dtype, tol):
    block = _Block(dtype=dtype)
    rp.parametrize(block, "sltrain", targets="proj", rank=4, alpha=8, density=0.2)
    layer = block.mlp.proj
    perturb_([layer.lora_B], std=0.3)
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    gy = torch.randn(3, 5, 40, dtype=dtype)
    params = [x, layer.lora_A, layer.lora_B, layer.sparse_values, layer.bias]

    y = block(x)
    got = torch.autograd.grad(y, params, gy)
    ref_y = F.linear(x, _dense_oracle(layer), layer.bias)
    ref = torch.autograd.grad(ref_y, params, gy)
    torch.testing.assert_close(y, ref_y, atol=tol, rtol=tol)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=tol, rtol=tol)
    torch.testing.assert_close(rp.PARAMETRIZATIONS["sltrain"].dense_weight(layer), _dense_oracle(layer).detach())


def test_paper_init():
    block = _Block(m=64, n=48, dtype=torch.float32)
    rp.parametrize(block, "sltrain", targets="proj", rank=8, alpha=32, density=0.05)
    layer = block.mlp.proj
    assert layer.scale == 32 / 8 and torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(48)  # A: kaiming_uniform(a=√5); values: U[-1/√n, 1/√n]
    for t in (layer.lora_A, layer.sparse_values):
        assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound
    assert layer.sparse_values.numel() == round(0.05 * 64 * 48)


def test_support_is_fixed_and_sparse_in_memory():
    model = tiny_llama()
    rp.parametrize(model, "sltrain", rank=4, density=0.1)
    layers = rp.wrapped_layers(model)
    support = {n: m.sparse_index.clone() for n, m in layers}
    values = {n: m.sparse_values.detach().clone() for n, m in layers}
    for n, m in layers:
        size = m.out_features * m.in_features
        idx = m.sparse_index
        assert idx.numel() == m.sparse_values.numel() == round(0.1 * size)
        assert idx.dtype == torch.int32 and torch.all(idx[1:] > idx[:-1]) and 0 <= int(idx[0]) and int(idx[-1]) < size
        tensors = list(m.state_dict(keep_vars=True).values()) + list(m.parameters())
        assert all(t.numel() < size for t in tensors), n  # nothing (m, n)-sized is stored
    run(model, 4)
    for n, m in rp.wrapped_layers(model):
        assert torch.equal(m.sparse_index, support[n])  # the support never moves
        assert not torch.equal(m.sparse_values, values[n])  # the values train
    other = tiny_llama()
    rp.parametrize(other, "sltrain", rank=4, density=0.1, seed=1)
    assert not torch.equal(rp.wrapped_layers(other)[0][1].sparse_index, support[layers[0][0]])  # seeded draw


def test_no_dense_weight_is_saved_for_backward():
    """Autograd keeps only x and the factors: every tensor saved during the forward of the model is
    smaller than one (m, n) weight (here tokens < m, so x itself is smaller)."""
    model = tiny_llama()
    rp.parametrize(model, "sltrain", rank=4, density=0.1)
    layer = model.model.layers[0].mlp.up_proj  # 64 x 32
    saved = []
    x = torch.randn(1, 6, 32)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    assert saved and all(math.prod(s) < 64 * 32 for s in saved), saved
    y.sum().backward()
    assert layer.lora_A.grad is not None and layer.sparse_values.grad.shape == layer.sparse_values.shape


def test_bad_density_and_tiny_layers():
    for d in (0, 1, -0.1, 2.0, True):
        with pytest.raises(ConfigError, match="density"):
            rp.parametrize(tiny_llama(), "sltrain", rank=4, density=d)
    block = _Block(m=8, n=6)
    with pytest.raises(ConfigError, match=r"density=0.001 gives no sparse entry for mlp.proj \(shape \(8, 6\)\)"):
        rp.parametrize(block, "sltrain", targets="proj", rank=2, density=0.001)
    assert type(block.mlp.proj) is nn.Linear


def test_refactorize_keeps_BA_balances_the_factors_and_resets_momentum():
    b, a = torch.randn(40, 4, dtype=torch.float64), torch.randn(4, 24, dtype=torch.float64)
    product = b @ a
    refactorize_(b, a)
    torch.testing.assert_close(b @ a, product, atol=1e-12, rtol=1e-12)
    gram_b, gram_a = b.t() @ b, a @ a.t()  # = Σ both, diagonal: B = U√Σ, A = √ΣVᵀ
    torch.testing.assert_close(gram_b, gram_a, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gram_b, torch.diag(torch.diagonal(gram_b)), atol=1e-10, rtol=1e-10)
    sigma = torch.linalg.svdvals(product)[:4]
    torch.testing.assert_close(torch.diagonal(gram_b).sort(descending=True).values, sigma, atol=1e-10, rtol=1e-10)
    zero_b, a0 = torch.zeros(40, 4), torch.randn(4, 24)
    refactorize_(zero_b, a0.clone())  # B = 0: left alone, A is not zeroed
    assert torch.count_nonzero(zero_b) == 0

    model = tiny_llama()
    rp.parametrize(model, "sltrain", rank=4, density=0.1, refactorize_every=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    lm_loss(model, ids()).backward()
    opt.step()
    assert rp.pretrain_step(model, 1, opt) == {}
    layers = rp.wrapped_layers(model)
    second = {m.lora_A: opt.state[m.lora_A]["exp_avg_sq"].clone() for _, m in layers}
    with torch.no_grad():
        before = model(input_ids=ids(seed=5)).logits
    info = rp.pretrain_step(model, 2, opt)
    assert info["refactorized_layers"] == 14
    assert info["momentum_entries_zeroed"] == sum(m.lora_A.numel() + m.lora_B.numel() for _, m in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids(seed=5)).logits, before, atol=1e-5, rtol=1e-5)
    for _, m in layers:
        assert torch.count_nonzero(opt.state[m.lora_A]["exp_avg"]) == 0
        assert torch.equal(opt.state[m.lora_A]["exp_avg_sq"], second[m.lora_A])  # second moment kept
