"""LoRA-LEGO: rank-wise units clustered by k-means, one averaged unit per cluster; sklearn's KMeans and
the unit definition as the oracle."""

from __future__ import annotations

import torch
from _combine_helpers import add_lora, base, delta, two_adapters

import rankwise as rw
from rankwise.combine.lora_lego import kmeans


def test_enough_clusters_give_the_weighted_sum():
    model = two_adapters()
    rw.combine(model, ["math", "code"], [0.5, 2.0], "lego", method="lora_lego", rank=8)  # 3 + 5 units
    da, db, got = delta(model, "math"), delta(model, "code"), delta(model, "lego")
    for k in got:
        torch.testing.assert_close(got[k], 0.5 * da[k] + 2.0 * db[k], atol=1e-5, rtol=1e-5)


def test_clustered_units_match_kmeans_oracle():
    # two rank-3 LoRAs whose units are noisy copies of three shared units: 6 units, 3 clear clusters
    from sklearn.cluster import KMeans

    model = base()
    add_lora(model, "x1", 3, 3.0, 1, targets=["up"])
    add_lora(model, "x2", 3, 3.0, 2, targets=["up"])
    layer = dict(rw.core.api.adapted_layers(model))["up"]
    g = torch.Generator().manual_seed(0)
    shared_a, shared_b = 3 * torch.randn(3, 9, generator=g), 3 * torch.randn(7, 3, generator=g)
    perm = [2, 0, 1]  # the second LoRA lists the units in another order (permutation invariance)
    with torch.no_grad():
        layer.adapters["x1"].lora_A.copy_(shared_a + 0.05 * torch.randn(3, 9, generator=g))
        layer.adapters["x1"].lora_B.copy_(shared_b + 0.05 * torch.randn(7, 3, generator=g))
        layer.adapters["x2"].lora_A.copy_(shared_a[perm] + 0.05 * torch.randn(3, 9, generator=g))
        layer.adapters["x2"].lora_B.copy_(shared_b[:, perm] + 0.05 * torch.randn(7, 3, generator=g))
    w = [1.0, 1.0]
    rw.combine(model, ["x1", "x2"], w, "lego", method="lora_lego", rank=3, seed=0)
    # oracle: units [b; a] of both LoRAs (scale on b), sklearn's k-means, then Σ_c mean(b) mean(a)ᵀ
    bs, as_ = [], []
    for n, wt in zip(["x1", "x2"], w):
        ad = layer.adapters[n]
        bs.append(wt * ad.scale * ad.lora_B.detach())
        as_.append(ad.lora_A.detach())
    b, a = torch.cat(bs, 1), torch.cat(as_, 0)
    labels = KMeans(3, n_init=10, random_state=0).fit(torch.cat([b.T, a], 1).double().numpy()).labels_
    want = torch.zeros(7, 9, dtype=torch.float64)
    for c in range(3):
        idx = torch.tensor([i for i, lab in enumerate(labels) if lab == c])
        want += b[:, idx].double().mean(1, keepdim=True) @ a[idx].double().mean(0, keepdim=True)
    torch.testing.assert_close(delta(model, "lego")["up"], want.float(), atol=1e-5, rtol=1e-5)


def test_kmeans_is_seeded_and_finds_separated_groups():
    g = torch.Generator().manual_seed(0)
    centers = 10 * torch.randn(4, 5, generator=g)
    x = centers.repeat_interleave(6, 0) + 0.1 * torch.randn(24, 5, generator=g)
    l1 = kmeans(x, 4, torch.Generator().manual_seed(1))
    l2 = kmeans(x, 4, torch.Generator().manual_seed(1))
    assert torch.equal(l1, l2)
    groups = {tuple(sorted((l1 == c).nonzero().flatten().tolist())) for c in range(4)}
    assert groups == {tuple(range(6 * i, 6 * i + 6)) for i in range(4)}


def _clustered_pair():
    """Two rank-3 LoRAs on "up" whose units are noisy copies of three shared units (3 clear clusters)."""
    model = base()
    add_lora(model, "x1", 3, 3.0, 1, targets=["up"])
    add_lora(model, "x2", 3, 3.0, 2, targets=["up"])
    layer = dict(rw.core.api.adapted_layers(model))["up"]
    g = torch.Generator().manual_seed(0)
    shared_a, shared_b = 3 * torch.randn(3, 9, generator=g), 3 * torch.randn(7, 3, generator=g)
    perm = [2, 0, 1]
    with torch.no_grad():  # larger noise than above: averaging visibly shrinks the centroids
        layer.adapters["x1"].lora_A.copy_(shared_a + 0.8 * torch.randn(3, 9, generator=g))
        layer.adapters["x1"].lora_B.copy_(shared_b + 0.8 * torch.randn(7, 3, generator=g))
        layer.adapters["x2"].lora_A.copy_(shared_a[perm] + 0.8 * torch.randn(3, 9, generator=g))
        layer.adapters["x2"].lora_B.copy_(shared_b[:, perm] + 0.8 * torch.randn(7, 3, generator=g))
    return model, layer


def test_norm_reweighting_rescales_each_centroid_to_its_members_mean_norm():
    model, layer = _clustered_pair()
    w = [1.0, 0.5]
    rw.combine(model, ["x1", "x2"], w, "plain", method="lora_lego", rank=3, seed=0)
    rw.combine(model, ["x1", "x2"], w, "lego", method="lora_lego", rank=3, seed=0, reweight="norm")
    # the definition transcribed: units b_i (weight and scale on b), a_i; clusters from the shared-unit index
    b = torch.cat([wt * layer.adapters[n].scale * layer.adapters[n].lora_B.detach() for n, wt in zip(["x1", "x2"], w)], 1)
    a = torch.cat([layer.adapters[n].lora_A.detach() for n in ("x1", "x2")], 0)
    clusters = [[0, 4], [1, 5], [2, 3]]  # x2 lists the shared units in the order [2, 0, 1]
    want = torch.zeros(7, 9, dtype=torch.float64)
    shrank = []
    for idx in clusters:
        bb, aa = b[:, idx].double(), a[idx].double()
        bm, am = bb.mean(1), aa.mean(0)
        bh = bm * bb.norm(dim=0).mean() / bm.norm()
        ah = am * aa.norm(dim=1).mean() / am.norm()
        want += torch.outer(bh, ah)
        shrank.append(float(bm.norm() / bb.norm(dim=0).mean()))
    torch.testing.assert_close(delta(model, "lego")["up"], want.float(), atol=1e-5, rtol=1e-5)
    assert min(shrank) < 0.99 and max(shrank) < 1.0  # averaging shrank the centroids: the reweighting mattered
    assert not torch.allclose(delta(model, "lego")["up"], delta(model, "plain")["up"], atol=1e-3)


def test_norm_reweighting_leaves_parallel_units_alone():
    # units that are positive multiples of each other keep their centroid norm: the sum of the means is unchanged
    model = base()
    add_lora(model, "x1", 2, 2.0, 1, targets=["up"])
    add_lora(model, "x2", 2, 2.0, 2, targets=["up"])
    layer = dict(rw.core.api.adapted_layers(model))["up"]
    with torch.no_grad():
        layer.adapters["x2"].lora_A.copy_(layer.adapters["x1"].lora_A)
        layer.adapters["x2"].lora_B.copy_(layer.adapters["x1"].lora_B)
    rw.combine(model, ["x1", "x2"], [1.0, 1.0], "plain", method="lora_lego", rank=2, seed=0)
    rw.combine(model, ["x1", "x2"], [1.0, 1.0], "lego", method="lora_lego", rank=2, seed=0, reweight="norm")
    torch.testing.assert_close(delta(model, "lego")["up"], delta(model, "plain")["up"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta(model, "plain")["up"], delta(model, "x1")["up"], atol=1e-5, rtol=1e-5)


def test_bad_reweight_leaves_the_model_unchanged():
    import pytest
    from _combine_helpers import fingerprint, same_fingerprint

    from rankwise.errors import ConfigError

    model = two_adapters()
    before = fingerprint(model)
    with pytest.raises(ConfigError, match="reweight='dual'"):
        rw.combine(model, ["math", "code"], [0.5, 0.5], "lego", method="lora_lego", reweight="dual")
    assert same_fingerprint(before, fingerprint(model))
