"""SST (rankwise.pretrain.sst) against independent oracles: the dense ``x (U diag σ Vᵀ)ᵀ + b``, the
paper's gradient formulas through a dense autograd ``∂L/∂W``, the SVD identities, the multinomial
``p(i) = (1 − u)·σ_i/Σσ + u/k``, and an uninterrupted run for resume."""

from __future__ import annotations

import pytest
import torch
from _pretrain_helpers import collate, config, data, ids, lm_loss, run, tiny_llama
from torch import nn

import rankwise.pretrain as rp
from rankwise.core.rank import rank_step
from rankwise.errors import ConfigError
from rankwise.pretrain.sst import SST, sample_indices, sampling_probabilities


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


class Net(nn.Module):
    def __init__(self, out_f=12, in_f=20, bias=True, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.fc(x)


def _full(m):
    """U (out×k), σ, V (in×k) assembled here from the stored segments and their spectral indices."""
    k = m.sigma.numel()
    u = torch.zeros(m.out_features, k, dtype=torch.float64)
    v = torch.zeros(m.in_features, k, dtype=torch.float64)
    for j, i in enumerate(m.frozen_idx.tolist()):
        u[:, i], v[:, i] = m.U_frozen[:, j].double(), m.V_frozen[:, j].double()
    for j, i in enumerate(m.active_idx.tolist()):
        u[:, i], v[:, i] = m.U_active[:, j].detach().double(), m.V_active[:, j].detach().double()
    return u, m.sigma.detach().double(), v


def _sst_net(out_f=12, in_f=20, **options):
    net = Net(out_f, in_f)
    w0, b0 = net.fc.weight.detach().clone(), net.fc.bias.detach().clone()
    rp.parametrize(net, "sst", targets=r"^fc$", **{"rank": 3, **options})
    return net, w0, b0


@pytest.mark.parametrize("out_f, in_f", [(12, 20), (20, 12)])
def test_forward_equals_the_dense_spectral_oracle(out_f, in_f):
    net, w0, b0 = _sst_net(out_f, in_f)
    m = net.fc
    k = min(out_f, in_f)
    assert m.U_active.shape == (out_f, 3) and m.U_frozen.shape == (out_f, k - 3) and m.sigma.shape == (k,)
    x = torch.randn(5, 7, in_f, generator=torch.Generator().manual_seed(1))
    # SVD init: zero distortion, the layer is the original Linear
    torch.testing.assert_close(net(x), x @ w0.T + b0, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # any values of the factors (not orthonormal any more)
        for p in (m.U_active, m.V_active, m.sigma):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    u, s, v = _full(m)
    ref = x.double() @ (u @ torch.diag(s) @ v.T).T + b0.double()
    torch.testing.assert_close(net(x).double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(SST.dense_weight(m).double(), u @ torch.diag(s) @ v.T, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("enhanced", [True, False])
def test_gradients_are_the_papers_formulas(enhanced):
    """∇σ_i = U_iᵀ G V_i for every i; sampled vectors: ∇̃U_i = G V_i, ∇̃V_i = Gᵀ U_i (enhanced, §4.2)
    or autograd's σ_i G V_i, σ_i Gᵀ U_i; G = ∂L/∂W of the dense oracle."""
    net, _, _ = _sst_net(enhanced_gradient=enhanced)
    m = net.fc
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(3))
    t = torch.randn(6, 12, generator=torch.Generator().manual_seed(4))
    ((net(x) - t) ** 2).sum().backward()

    u, s, v = _full(m)
    w = (u @ torch.diag(s) @ v.T).requires_grad_(True)
    ((x.double() @ w.T + m.bias.detach().double() - t.double()) ** 2).sum().backward()
    g = w.grad
    torch.testing.assert_close(m.sigma.grad.double(), torch.einsum("oi,oj,ji->i", u, g, v), atol=1e-4, rtol=1e-5)
    a = m.active_idx
    scale = torch.ones(3, dtype=torch.float64) if enhanced else s[a]
    torch.testing.assert_close(m.U_active.grad.double(), (g @ v[:, a]) * scale, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(m.V_active.grad.double(), (g.T @ u[:, a]) * scale, atol=1e-4, rtol=1e-5)
    assert m.U_frozen.grad is None and not m.U_frozen.requires_grad


def test_sampling_distribution_is_the_multinomial_over_sigma():
    sigma = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.25, 0.2, 0.05, 0.0])
    k = sigma.numel()
    torch.testing.assert_close(sampling_probabilities(sigma), (sigma / sigma.sum()).double())
    torch.testing.assert_close(sampling_probabilities(sigma, 0.5), (0.5 * (1 / k + sigma / sigma.sum())).double())
    # empirical frequencies of single draws vs p: Pearson chi-square, 7 degrees of freedom
    for mix in (0.0, 0.5):
        g = torch.Generator().manual_seed(0)
        n = 4000
        counts = torch.bincount(torch.cat([sample_indices(sigma, 1, g, mix) for _ in range(n)]), minlength=k)
        p = sampling_probabilities(sigma, mix)
        expected = n * p
        seen = expected > 0
        assert counts[~seen].sum() == 0  # σ = 0 is never drawn when σ-proportional
        chi2 = float((((counts.double() - expected) ** 2)[seen] / expected[seen]).sum())
        assert chi2 < 24.3, (mix, chi2, counts)  # the 0.999 quantile of χ²(7)
    draw = sample_indices(sigma, 4, torch.Generator().manual_seed(1))
    assert draw.numel() == 4 and draw.unique().numel() == 4 and torch.equal(draw, draw.sort().values)


def _llama_sst(**options):
    model = tiny_llama()
    rp.parametrize(model, "sst", seed=3, **{"rank": 4, "resample_every": 100, **options})
    return model


def _step(model, opt, step, seed=0):
    lm_loss(model, ids(seed=seed)).backward()
    opt.step()
    info = rank_step(model, step, opt)
    opt.zero_grad(set_to_none=True)
    return info


def test_only_the_sampled_vectors_change_in_a_step():
    model = _llama_sst()
    layers = rp.wrapped_layers(model)
    before = {n: _full(m) for n, m in layers}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    _step(model, opt, 1)
    for n, m in layers:
        (u0, s0, v0), (u1, s1, v1) = before[n], _full(m)
        a = m.active_idx
        frozen = m.frozen_idx
        assert torch.equal(u0[:, frozen], u1[:, frozen]) and torch.equal(v0[:, frozen], v1[:, frozen]), n
        assert (u0[:, a] != u1[:, a]).any(dim=0).all() and (v0[:, a] != v1[:, a]).any(dim=0).all(), n
        assert (s0 != s1).float().mean() > 0.9 and (s1 >= 0).all(), n  # all singular values train
        torch.testing.assert_close(u1[:, a].norm(dim=0), torch.ones(4, dtype=torch.float64))  # normalized
        torch.testing.assert_close(v1[:, a].norm(dim=0), torch.ones(4, dtype=torch.float64))


def test_resample_swaps_vectors_keeps_the_function_and_resets_their_state():
    from rankwise.pretrain.sst import SSTLinear

    model = _llama_sst(resample_every=2, svd_every=50)
    layers = rp.wrapped_layers(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _step(model, opt, 1)
    # the swap alone is a relabeling: the same W and the same (U, σ, V) in spectral order, bit for bit
    changed = 0
    for n, m in layers:
        w0, full0, idx0 = SST.dense_weight(m).clone(), _full(m), m.active_idx.clone()
        SSTLinear.resample(m, torch.Generator().manual_seed(len(n)), 0.0)
        assert torch.equal(SST.dense_weight(m), w0), n
        assert all(torch.equal(a, b) for a, b in zip(full0, _full(m)))
        assert torch.equal(torch.cat([m.active_idx, m.frozen_idx]).sort().values, torch.arange(m.k))
        changed += not torch.equal(m.active_idx, idx0)
    assert changed >= 10  # new active sets: 4 of 32 singular pairs, drawn σ-weighted
    # through rank_step at step 2: resampled, and the moments of U_active / V_active (2 each) zeroed
    info = _step(model, opt, 2)["pretrain"]
    expected = sum(2 * 4 * (m.out_features + m.in_features) for _, m in layers)
    assert info == {"resampled": 14, "resvd": 0, "state_zeroed": expected}
    for _, m in layers:
        for p in (m.U_active, m.V_active):
            assert all(float(t.abs().sum()) == 0 for k, t in opt.state[p].items() if k != "step")
        assert float(opt.state[m.sigma]["exp_avg"].abs().sum()) > 0  # σ keeps its moments


def test_resvd_restores_orthonormality_keeps_the_function_and_resets_the_state():
    model = _llama_sst(resample_every=2, svd_every=6)
    layers = rp.wrapped_layers(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for step in range(1, 6):
        _step(model, opt, step, seed=step)
    drift = max(float((_full(m)[0].T @ _full(m)[0] - torch.eye(m.k, dtype=torch.float64)).abs().max())
                for _, m in layers)
    assert drift > 1e-3  # training moved U off the orthonormal set
    lm_loss(model, ids(seed=6)).backward()
    opt.step()
    for _, m in layers:
        m.normalize_active()
        m.project()
    w_before = {n: SST.dense_weight(m).clone() for n, m in layers}
    info = rank_step(model, 6, opt)["pretrain"]
    assert info["resvd"] == 14 and info["resampled"] == 0 and info["state_zeroed"] > 0
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(9))
    for n, m in layers:
        u, s, v = (t.float() for t in _full(m))
        eye = torch.eye(m.k)
        torch.testing.assert_close(u.T @ u, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(v.T @ v, eye, atol=1e-5, rtol=0)
        assert (s[:-1] >= s[1:]).all() and (s >= 0).all()
        torch.testing.assert_close(SST.dense_weight(m), w_before[n], atol=1e-5, rtol=1e-5)
        if m.in_features == 32:
            torch.testing.assert_close(m(x), x @ w_before[n].T, atol=1e-5, rtol=1e-5)
        for p in (m.U_active, m.V_active, m.sigma):
            assert all(float(t.abs().sum()) == 0 for k, t in opt.state[p].items() if k != "step")


def test_to_dense_and_memory_accounting():
    model = _llama_sst()
    ref = model(input_ids=ids()).logits
    per_layer = []
    for _, m in rp.wrapped_layers(model):
        stored = sum(t.numel() for t in m.state_dict().values() if t.is_floating_point())
        per_layer.append(stored == (m.out_features + m.in_features) * m.k + m.k + m.out_features * (m.bias is not None))
    assert all(per_layer)
    rp.to_dense(model)
    assert not rp.wrapped_layers(model)
    torch.testing.assert_close(model(input_ids=ids()).logits, ref, atol=1e-5, rtol=1e-5)


def test_bfloat16_model_and_autocast():
    model = tiny_llama(dtype=torch.bfloat16)
    rp.parametrize(model, "sst", rank=4)
    for _, m in rp.wrapped_layers(model):
        assert all(t.dtype == torch.bfloat16 for t in (m.U_active, m.V_active, m.sigma, m.U_frozen, m.V_frozen))
    out = model(input_ids=ids(), labels=ids())
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(m.U_active.grad.dtype == torch.bfloat16 and m.sigma.grad.dtype == torch.bfloat16
               for _, m in rp.wrapped_layers(model))

    model = _llama_sst()
    ref = model(input_ids=ids()).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids(), labels=ids())
    out.loss.backward()
    torch.testing.assert_close(out.logits.float(), ref, atol=0.15, rtol=0.05)
    assert all(m.U_active.grad.dtype == torch.float32 and torch.isfinite(m.V_active.grad).all()
               for _, m in rp.wrapped_layers(model))


@pytest.mark.parametrize("options, match", [
    (dict(rank=40), "rank=40"),
    (dict(rank=4, uniform_mix=1.5), "uniform_mix"),
    (dict(rank=4, resample_every=0), "resample_every"),
    (dict(rank=4, svd_every=0), "svd_every"),
])
def test_bad_options_raise_and_leave_the_model_unchanged(options, match):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        rp.parametrize(model, "sst", **options)
    assert not rp.wrapped_layers(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_train_and_resume_bit_exact_across_resample_and_resvd(tmp_path):
    """Events at steps 2, 4 (resample), 6 (re-SVD), 8; killed during step 5 and resumed from the step-4
    checkpoint alone (it keeps the frozen segments moved at the resamples: checkpoint_frozen)."""

    from rankwise.train import train

    steps, options = 8, dict(rank=4, resample_every=2, svd_every=6)
    straight = tiny_llama()
    rp.parametrize(straight, "sst", seed=5, **options)
    result = run(straight, steps)
    assert all(torch.isfinite(torch.tensor(result.losses)))

    first = tiny_llama()
    rp.parametrize(first, "sst", seed=5, **options)
    calls = []

    def dying_loss(m, batch):
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return lm_loss(m, batch)

    with pytest.raises(KeyboardInterrupt):
        train(first, data(), collate, dying_loss, config(steps, checkpoint_every=4), checkpoint_dir=tmp_path / "c",
              progress=False)
    resumed = tiny_llama()
    rp.parametrize(resumed, "sst", seed=5, **options)
    train(resumed, data(), collate, lm_loss, config(steps, checkpoint_every=4), checkpoint_dir=tmp_path / "c",
          resume=True, progress=False)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
