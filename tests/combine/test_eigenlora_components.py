"""EigenLoRA's principal components from many adapters (``rw.combine(..., method="eigenlora")``).

Oracles: a PCA computed here with ``torch.linalg.svd`` of the (mean-centred / uncentred) stacks of the adapters'
``lora_A`` rows and ``lora_B`` columns, as the paper and the authors' ``get_eigenvectors`` stack them; dense
projections ``P_B ΔW P_A``; least squares onto the components for an adapter in their span."""

from __future__ import annotations

import pytest
import torch
from _combine_helpers import add_lora, base, delta, fingerprint, perturb, same_fingerprint, two_adapters

import rankwise as rw
from rankwise.combine.eigenlora import pca, principal_components
from rankwise.errors import ConfigError

A, B = "math", "code"
ATOL = 1e-5


def layers(model):
    return dict(rw.core.api.adapted_layers(model))


def oracle_pcs(model, adapters, module, k, center):
    """Top-k right singular vectors of the stacked A rows and B columns (``lora_*`` as stored)."""
    lay = layers(model)[module]
    xa = torch.cat([lay.adapters[a].lora_A.detach() for a in adapters], 0).double()
    xb = torch.cat([lay.adapters[a].lora_B.detach().t() for a in adapters], 0).double()
    out = []
    for x in (xa, xb):
        if center:
            x = x - x.mean(0, keepdim=True)
        vh = torch.linalg.svd(x, full_matrices=False).Vh
        out.append(vh[:k])
    return out


def same_up_to_sign(got, want):
    """Rows of ``got`` equal rows of ``want`` up to a sign each."""
    got, want = got.double(), want.double()
    signs = torch.sign((got * want).sum(1, keepdim=True))
    torch.testing.assert_close(got * signs, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("center", [True, False])
def test_components_are_the_pca_of_the_stacked_factors(center):
    model = two_adapters()  # ranks 3 + 5: N = 8 stacked vectors per side
    k = 4
    rw.combine(model, [A, B], None, "eig", method="eigenlora", num_components=k, center=center, seed=0)
    for m, lay in layers(model).items():
        ad = lay.adapters["eig"]
        want_a, want_b = oracle_pcs(model, [A, B], m, k, center)
        same_up_to_sign(ad.components_A, want_a)
        same_up_to_sign(ad.components_B.t(), want_b)
    # the helper gives the same components without building an adapter
    comps = principal_components(model, [A, B], num_components=k, center=center)
    for m, (ca, cb) in comps.items():
        torch.testing.assert_close(ca, layers(model)[m].adapters["eig"].components_A, atol=0, rtol=0)
        torch.testing.assert_close(cb, layers(model)[m].adapters["eig"].components_B, atol=0, rtol=0)


def test_pseudo_pcs_complete_an_orthonormal_basis():
    # 2 samples in R^9, centred: 1 principal component; k = 5 adds 4 random orthonormal pseudo-PCs
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, generator=g, dtype=torch.float64)
    c = pca(x, 5, center=True, generator=torch.Generator().manual_seed(1))
    assert c.shape == (5, 9)
    torch.testing.assert_close(c @ c.t(), torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)
    d = x[0] - x[1]
    same_up_to_sign(c[:1], (d / d.norm())[None])
    again = pca(x, 5, center=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(c, again)  # seeded


def test_full_span_reproduces_an_adapter_and_the_weighted_sum_exactly():
    model = two_adapters()
    # uncentred, K = N (default): every input A row / B column lies in the span of the components
    rw.combine(model, [A, B], [1.0, 0.0], "only_a", method="eigenlora", center=False, rank=3)
    rw.combine(model, [A, B], [0.5, 2.0], "sum", method="eigenlora", center=False, rank=8)  # capped per module
    da, db = delta(model, A), delta(model, B)
    for m, d in delta(model, "only_a").items():
        torch.testing.assert_close(d, da[m], atol=ATOL, rtol=ATOL)
    for m, d in delta(model, "sum").items():
        torch.testing.assert_close(d, 0.5 * da[m] + 2.0 * db[m], atol=ATOL, rtol=ATOL)


def test_an_adapter_in_the_span_is_reached_by_loadings_alone():
    model = two_adapters()
    rw.combine(model, [A, B], None, "eig", method="eigenlora", center=False, rank=4)
    # a new LoRA whose A rows / B columns are combinations of the inputs' (in the span of the stacks)
    add_lora(model, "new", 4, 4.0, 9)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lay in layers(model).values():
            xa = torch.cat([lay.adapters[a].lora_A for a in (A, B)], 0)
            xb = torch.cat([lay.adapters[a].lora_B for a in (A, B)], 1)
            lay.adapters["new"].lora_A.copy_(torch.randn(4, xa.shape[0], generator=g) @ xa)
            lay.adapters["new"].lora_B.copy_(xb @ torch.randn(xb.shape[1], 4, generator=g))
            ad = lay.adapters["eig"]
            # least squares onto orthonormal components: L_A = A_new C_Aᵀ, L_B = C_Bᵀ B_new (scale s = 1)
            ad.loadings_A.copy_(lay.adapters["new"].lora_A @ ad.components_A.t())
            ad.loadings_B.copy_(ad.components_B.t() @ lay.adapters["new"].lora_B * lay.adapters["new"].scale)
    dn = delta(model, "new")
    for m, d in delta(model, "eig").items():
        torch.testing.assert_close(d, dn[m], atol=ATOL, rtol=ATOL)


def test_a_truncated_subspace_gives_the_projected_sum():
    model = two_adapters()
    w = [0.7, -1.3]
    rw.combine(model, [A, B], w, "eig", method="eigenlora", num_components=3, center=True, rank=3)
    da, db = delta(model, A), delta(model, B)
    for m, lay in layers(model).items():
        ad = lay.adapters["eig"]
        pa = ad.components_A.t() @ ad.components_A            # in × in projector
        pb = ad.components_B @ ad.components_B.t()            # out × out
        want = pb @ (w[0] * da[m] + w[1] * db[m]) @ pa  # linear layers: the (out, in) layout
        torch.testing.assert_close(delta(model, "eig")[m], want, atol=ATOL, rtol=ATOL)


def test_fresh_adapter_starts_at_the_base_and_trains_only_loadings(tmp_path):
    model = two_adapters()
    rw.combine(model, [A, B], None, "eig", method="eigenlora", num_components=4, seed=0)
    assert rw.core.api.adapter_state(model)["eig"]["config"].method == "eigenlora"
    for d in delta(model, "eig").values():
        assert torch.equal(d, torch.zeros_like(d))
    rw.set_active(model, "eig")
    params = [p for lay in layers(model).values() for p in lay.adapters["eig"].parameters()]
    names = {n for lay in layers(model).values() for n, _ in lay.adapters["eig"].named_parameters()}
    assert names == {"loadings_A", "loadings_B"}
    comps = {m: (lay.adapters["eig"].components_A.clone(), lay.adapters["eig"].components_B.clone())
             for m, lay in layers(model).items()}
    opt = torch.optim.SGD(rw.trainable_parameters(model), lr=0.1)
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        model(ids).square().mean().backward()
        opt.step()
    assert {id(p) for p in rw.trainable_parameters(model)} == {id(p) for p in params}
    for m, lay in layers(model).items():
        ad = lay.adapters["eig"]
        assert torch.equal(ad.components_A, comps[m][0]) and torch.equal(ad.components_B, comps[m][1])
        assert not ad.components_A.requires_grad
    assert any(d.abs().max() > 0 for d in delta(model, "eig").values())
    # saved with the adapter: a fresh base reloads components and loadings bit for bit
    rw.save(model, tmp_path / "e", names="eig")
    fresh = base()
    rw.load(fresh, tmp_path / "e")
    for m, lay in layers(fresh).items():
        torch.testing.assert_close(lay.adapters["eig"].components_A, comps[m][0], atol=0, rtol=0)
        assert torch.equal(delta(fresh, "eig")[m], delta(model, "eig")[m])


def test_other_methods_enter_through_their_weight_view():
    model = base()
    rw.adapt(model, "nola", name="n", rank=2, targets=["q", "up"], seed=1)
    perturb(model, "n")
    rw.combine(model, ["n"], [1.0], "eig", method="eigenlora", center=False, rank=2)
    dn = delta(model, "n")
    for m, d in delta(model, "eig").items():
        torch.testing.assert_close(d, dn[m], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("opts,match", [({"num_components": 0}, "num_components=0"),
                                        ({"num_components": 2.5}, "num_components=2.5"),
                                        ({"center": "yes"}, "center='yes'"),
                                        ({"density": 0.5}, "takes no option")])
def test_bad_options_leave_the_model_unchanged(opts, match):
    model = two_adapters()
    before = fingerprint(model)
    with pytest.raises(ConfigError, match=match):
        rw.combine(model, [A, B], None, "eig", method="eigenlora", **opts)
    assert same_fingerprint(before, fingerprint(model))
