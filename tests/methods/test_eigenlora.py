"""EigenLoRA as a method: the forward transcribed from the authors' ``EigenLoRA_A`` / ``EigenLoRA_B`` layers
(github.com/toshi2k2/EigenLoRA, ``peft/tuners/eigenlora/layer.py``), default components, counts, config.

The registry-wide tests (``tests/core/test_method.py``, ``test_mixed.py``) cover the two views, merge, save /
load, seeds, bf16, autocast and the meta device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.errors import ConfigError


def adapted(n_in=10, n_out=7, seed=0, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, n_out))
    rw.adapt(model, "eigenlora", targets=["0"], seed=seed, **kw)
    return model, model[0].adapters["default"]


def test_forward_is_the_reference_layers_with_components_transposed():
    model, ad = adapted(rank=3, num_components=4, alpha=6.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ad.loadings_A.normal_(generator=g)
        ad.loadings_B.normal_(generator=g)
    x = torch.randn(5, 10, generator=g)
    # the reference: components (in × K) / (out × K), loadings (K × r); recons = Σ_k comp[:, k] loadings[k, j]
    comp_a, load_a = ad.components_A.t(), ad.loadings_A.t()
    comp_b, load_b = ad.components_B, ad.loadings_B
    recons_a = torch.sum(comp_a.unsqueeze(0) * load_a.t().unsqueeze(1), dim=-1).t()   # in × r
    recons_b = torch.sum(comp_b.unsqueeze(0) * load_b.t().unsqueeze(1), dim=-1).t()   # out × r
    base = model[0].base
    want = base(x) + 2.0 * torch.matmul(torch.matmul(x, recons_a), recons_b.t())     # s = α / r = 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_default_components_are_seeded_random_orthonormal():
    _, ad = adapted(rank=2, num_components=4)
    _, again = adapted(rank=2, num_components=4)
    _, other = adapted(rank=2, num_components=4, seed=5)
    ca, cb = ad.components_A, ad.components_B
    assert ca.shape == (4, 10) and cb.shape == (7, 4)
    torch.testing.assert_close(ca @ ca.t(), torch.eye(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(cb.t() @ cb, torch.eye(4), atol=1e-6, rtol=0)
    assert torch.equal(ca, again.components_A) and not torch.equal(ca, other.components_A)
    assert {n for n, _ in ad.named_parameters()} == {"loadings_A", "loadings_B"}
    assert {n for n, _ in ad.named_buffers()} == {"components_A", "components_B"}
    assert set(ad.state_dict()) == {"loadings_A", "loadings_B", "components_A", "components_B"}  # all saved


def test_components_capped_by_the_layer_and_parameter_count():
    model, ad = adapted(n_in=10, n_out=3, rank=2, num_components=6)
    assert ad.components_A.shape == (6, 10) and ad.components_B.shape == (3, 3)
    assert rw.parameter_count(model).trainable == 2 * (6 + 3) == sum(p.numel() for p in ad.parameters())
    assert type(ad).num_params(ad.view, ad.config) == 2 * (6 + 3)


def test_initial_update_is_zero_and_a_rows_have_lora_scale():
    _, ad = adapted(n_in=64, n_out=8, rank=4, num_components=32)
    assert torch.equal(ad.delta_weight(), torch.zeros(8, 64))
    a, _ = ad.factors()
    # L_A ~ U(±1/√K) over orthonormal C_A: E‖row‖² = K · 1/(3K) = 1/3, as LoRA's U(±1/√in) rows
    assert 0.15 < float(a.detach().square().sum(1).mean()) < 0.6


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "8"])
def test_bad_num_components(value):
    with pytest.raises(ConfigError, match="num_components"):
        rw.get_method("eigenlora").Config(num_components=value)
