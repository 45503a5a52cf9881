"""nola (Koohpayegani et al. 2024): the authors' ``LoRA``/``NOLALinear``/``GenerateParams``
(github.com/UCDvision/NOLA, ``gpt/examples/NLG/src/model_nola.py``) transcribed as the oracle, the
shape-independent parameter count, per-layer seeds, and files that hold only seeds and coefficients."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _dora_helpers import adapter, layers, net, randomize
from safetensors.torch import load_file
from torch import nn

import rankwise as rw

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


def _reference_lora(x, a0, u_a, u_b, coef_a, coef_b, rank, alpha):
    """model_nola.py, transcribed: ``GenerateParams`` makes ``W = U(-1, 1) · 1/√num_basis`` and returns
    ``einsum('b,boi->oi', coefficients, W)``; ``NOLALinear`` applies ``x @ (that + weight)ᵀ`` (lora_A's
    weight Kaiming-init, lora_B's zero, both frozen); ``LoRA.forward`` is ``lora_B(lora_A(x)) * alpha/rank``."""
    def generate(coefficients, u):
        w = u * (1.0 / math.sqrt(coefficients.shape[0]))
        return torch.einsum("b,boi->oi", coefficients, w)

    lora_a = x @ (generate(coef_a, u_a) + a0).t()
    lora_b = lora_a @ (generate(coef_b, u_b) + torch.zeros(u_b.shape[1:], dtype=x.dtype)).t()
    return lora_b * (alpha / rank)


@pytest.mark.parametrize("alpha", [None, 1.0, 3.0])
def test_nola_is_the_authors_lora_with_nola(alpha):
    """Default ``alpha`` (None: α = r, s = 1) is the authors' scripts' setting (RANK=8, LORA_ALPHA=8);
    ``alpha=1.0`` their module's default (s = 1/r). The documented choice: rankwise's default is not
    the module default."""
    torch.manual_seed(0)
    rank, k, l_ = 4, 6, 5
    layer = nn.Linear(7, 9).double()
    model = rw.adapt(net(layer), "nola", rank=rank, num_basis_A=k, num_basis_B=l_, alpha=alpha, targets=["0"], seed=0)
    ad = adapter(model, "0")
    bs = ad.bases
    u_a, u_b = bs.nola_basis_A * math.sqrt(k), bs.nola_basis_B * math.sqrt(l_)  # the U(-1, 1) draws
    assert u_a.abs().max() <= 1 and u_b.abs().max() <= 1 and u_a.abs().max() > 0.9
    assert bs.nola_A0.abs().max() <= 1 / math.sqrt(7)  # kaiming_uniform_(a=√5): U(±1/√in)
    randomize([ad.nola_alpha, ad.nola_beta], seed=2, std=0.5)
    x = torch.randn(3, 7, dtype=torch.float64)
    ref_alpha = rank if alpha is None else alpha
    ref = layer(x) + _reference_lora(x, bs.nola_A0, u_a, u_b, ad.nola_alpha, ad.nola_beta, rank, ref_alpha)
    out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    params = [ad.nola_alpha, ad.nola_beta]
    for o, r in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)):
        torch.testing.assert_close(o, r, atol=1e-10, rtol=1e-10)
    if alpha is None:  # not the reference module's default α = 1
        code_default = layer(x) + _reference_lora(x, bs.nola_A0, u_a, u_b, ad.nola_alpha, ad.nola_beta, rank, 1.0)
        assert (out - code_default).abs().max() > 1e-3


def test_nola_parameter_count_is_shape_independent(bert):
    model = rw.adapt(bert(seed=0), "nola", rank=4, num_basis_A=10, num_basis_B=7, targets=["query", "dense"], seed=0)
    adapted = layers(model)
    assert len({(ly.view.out_features, ly.view.in_features) for ly in adapted.values()}) > 1
    assert rw.parameter_count(model).trainable == len(adapted) * (10 + 7)
    seeds = {int(ly.adapters["default"].bases.key) for ly in adapted.values()}
    assert len(seeds) == len(adapted), "each layer has its own seed (the paper's per-layer bases)"


def test_nola_update_is_combination_of_bases():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    model = rw.adapt(net(layer), "nola", rank=2, num_basis_A=4, num_basis_B=3, alpha=3.0, targets=["0"], seed=0)
    ad = adapter(model, "0")
    bs = ad.bases
    # frozen bases: A0 ~ U(±1/√in), bases ~ U(±1)/√k
    assert bs.nola_A0.abs().max() <= 1 / math.sqrt(6) and bs.nola_basis_A.abs().max() <= 1 / math.sqrt(4)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(model(x), layer(x))  # β = 0: B = 0
    out = model(x).square().sum()
    g_alpha, g_beta = torch.autograd.grad(out, [ad.nola_alpha, ad.nola_beta])
    assert not g_alpha.any() and g_beta.abs().max() > 0  # β learns through the frozen A0 from the first step
    randomize([ad.nola_alpha, ad.nola_beta], seed=3)
    a = bs.nola_A0 + torch.einsum("j,jri->ri", ad.nola_alpha, bs.nola_basis_A)
    b = torch.einsum("i,ior->or", ad.nola_beta, bs.nola_basis_B)
    torch.testing.assert_close(ad.delta_weight(), 1.5 * b @ a)


def test_nola_file_holds_seed_and_coefficients_only(tmp_path):
    torch.manual_seed(0)
    base = net(nn.Linear(6, 5))
    model = rw.adapt(copy.deepcopy(base), "nola", rank=2, num_basis_A=4, num_basis_B=3, targets=["0"], seed=0)
    randomize([p for p in model.parameters() if p.requires_grad], seed=1)
    rw.save(model, tmp_path / "n")
    keys = set(load_file(str(tmp_path / "n" / "adapter_model.safetensors")))
    assert keys == {"default/0/nola_alpha", "default/0/nola_beta", "default/0/bases.key"}
    fresh = rw.load(copy.deepcopy(base), tmp_path / "n")
    for n in ("nola_A0", "nola_basis_A", "nola_basis_B"):
        assert torch.equal(getattr(adapter(fresh, "0").bases, n), getattr(adapter(model, "0").bases, n))
