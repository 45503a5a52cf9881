"""rankwise.compress methods against closed forms (each oracle computed independently here)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
import rankwise.compress as rc
from rankwise.compress.cur import cur
from rankwise.errors import CalibrationError, ConfigError, TargetError

D = torch.float64


def _net(m=12, n=16, seed=0, dtype=D):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n, m)).to(dtype)


def _low_rank(m, n, r, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, r, generator=g, dtype=dtype) @ torch.randn(r, n, generator=g, dtype=dtype))


def _aniso(n=16, rows=400, seed=1, dtype=D):
    """Inputs with a strongly anisotropic covariance (scales 10 … 0.01), full row rank."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, n, dtype=dtype)
    mix = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))[0]
    return (torch.randn(rows, n, generator=g, dtype=dtype) * scales) @ mix.T


def _batches(x, size=100):
    return [x[i:i + size] for i in range(0, len(x), size)]


def _dense(model):
    return model[0].dense_weight()


def test_svd_full_rank_is_exact():
    model = _net()
    x = torch.randn(5, 16, dtype=D)
    ref = model(x)
    rep = rc.compress(model, "svd", rank=12, progress=False)
    assert isinstance(model[0], rc.FactoredLinear) and rep.layers[0]["rank"] == 12
    torch.testing.assert_close(model(x), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["svd", "asvd", "svd_llm", "fwsvd", "cur", "welore"])
def test_exact_rank_r_reproduced(method):
    model = _net()
    with torch.no_grad():
        model[0].weight.copy_(_low_rank(12, 16, 3))
    x = _aniso()
    ref = model(x)
    kw = {"calibration": _batches(x), "loss_fn": lambda m, b: m(b).pow(2).mean()}
    rc.compress(model, method, rank=3, progress=False, **kw)
    torch.testing.assert_close(model(x), ref, atol=1e-9, rtol=1e-9)


def test_svd_llm_is_the_whitened_optimum_and_beats_svd():
    torch.manual_seed(0)
    w = torch.randn(12, 16, dtype=D)
    x = _aniso()
    r = 4
    # oracle: min over rank-r M of ||(W - M) X^T||_F is U_r U_r^T W with U_r the top left singular vectors of W X^T
    u = torch.linalg.svd(w @ x.T, full_matrices=False)[0][:, :r]
    oracle = u @ u.T @ w
    plain_u, plain_s, plain_vh = torch.linalg.svd(w, full_matrices=False)
    plain = plain_u[:, :r] * plain_s[:r] @ plain_vh[:r]
    model = _net()
    with torch.no_grad():
        model[0].weight.copy_(w)
    rep = rc.compress(model, "svd_llm", rank=r, calibration=_batches(x), progress=False)
    got = _dense(model)
    torch.testing.assert_close(got, oracle, atol=1e-8, rtol=1e-8)
    err = lambda a: float(((w - a) @ x.T).norm())  # noqa: E731
    assert err(got) < 0.9 * err(plain)
    # the report's output error is the relative ||(W - Ŵ) X||
    assert rep.layers[0]["output error"] == pytest.approx(err(got) / float((w @ x.T).norm()), rel=1e-6)


def test_svd_llm_survives_singular_calibration():
    """Fewer calibration rows than inputs: X Xᵀ is singular (Cholesky would fail); eigh + jitter does not."""
    model = _net(12, 16)
    x = torch.randn(5, 16, dtype=D)
    ref = model(x)
    rc.compress(model, "svd_llm", rank=5, calibration=[x], progress=False)
    # rank 5 ≥ rank of the inputs: the outputs on the calibration rows are reproduced
    torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-6)


def test_asvd_closed_form():
    torch.manual_seed(0)
    w = torch.randn(12, 16, dtype=D)
    x = _aniso()
    s = (x.pow(2).mean(0)) ** 0.25  # ASVD's S with alpha = 0.5 on the channel RMS (see compress/svd.py)
    u, sv, vh = torch.linalg.svd(w * s, full_matrices=False)
    oracle = (u[:, :4] * sv[:4] @ vh[:4]) / s
    model = _net()
    with torch.no_grad():
        model[0].weight.copy_(w)
    rc.compress(model, "asvd", rank=4, calibration=_batches(x), progress=False)
    torch.testing.assert_close(_dense(model), oracle, atol=1e-9, rtol=1e-9)


def test_fwsvd_closed_form():
    torch.manual_seed(0)
    model = _net()
    w = model[0].weight.detach().clone()
    x = _aniso()
    batches = _batches(x)
    loss_fn = lambda m, b: (m(b) - 1.0).pow(2).mean()  # noqa: E731
    fisher = torch.zeros_like(w)
    for b in batches:  # per-batch gradients squared, summed (FWSVD's empirical Fisher)
        ref = _net()
        ref.load_state_dict(model.state_dict())
        loss_fn(ref, b).backward()
        fisher += ref[0].weight.grad ** 2
    d = fisher.sum(1).sqrt()
    u, sv, vh = torch.linalg.svd(d[:, None] * w, full_matrices=False)
    oracle = (u[:, :3] * sv[:3] @ vh[:3]) / d[:, None]
    rc.compress(model, "fwsvd", rank=3, calibration=batches, loss_fn=loss_fn, progress=False)
    # the calibration engine accumulates gradients in float32: agreement to float32 precision
    torch.testing.assert_close(_dense(model), oracle, atol=1e-5, rtol=1e-5)


def test_cur_core_is_the_closed_form():
    torch.manual_seed(0)
    w = torch.randn(12, 16, dtype=D)
    c, u, r, rows, cols = cur(w, 5)
    torch.testing.assert_close(c, w[:, cols])
    torch.testing.assert_close(r, w[rows, :])
    assert len(set(rows.tolist())) == 5 and len(set(cols.tolist())) == 5
    # U = argmin ||W - C U R||_F, by two least-squares solves (C full column rank, R full row rank)
    left = torch.linalg.lstsq(c, w).solution  # C⁺ W
    oracle = torch.linalg.lstsq(r.T, left.T).solution.T  # (C⁺ W) R⁺
    torch.testing.assert_close(u, oracle, atol=1e-10, rtol=1e-10)
    model = _net()
    with torch.no_grad():
        model[0].weight.copy_(w)
    rc.compress(model, "cur", rank=5, progress=False)
    torch.testing.assert_close(model[0].core.weight, oracle, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(model[0].up.weight, c)


def test_deim_picks_interpolation_maxima():
    """Sorensen & Embree's DEIM, transcribed: first index = argmax |u1|; then argmax of the residual."""
    from rankwise.compress.cur import deim

    torch.manual_seed(3)
    u = torch.linalg.qr(torch.randn(10, 3, dtype=D))[0]
    p = [int(u[:, 0].abs().argmax())]
    for j in range(1, 3):
        c = torch.linalg.solve(u[p][:, :j], u[p, j])
        p.append(int((u[:, j] - u[:, :j] @ c).abs().argmax()))
    assert deim(u).tolist() == p


def test_eora_beats_plain_svd_of_the_error_and_is_the_whitened_optimum():
    from rankwise.quant import fake_quantize

    torch.manual_seed(0)
    x = _aniso()
    model_e, model_l = _net(), _net()
    w = model_e[0].weight.detach().clone()
    e = w - fake_quantize(w, "int4", 16)
    r = 3
    u = torch.linalg.svd(e @ x.T, full_matrices=False)[0][:, :r]
    oracle = u @ u.T @ e
    rep_e = rc.compress(model_e, "eora", rank=r, calibration=_batches(x), quant="int4", block_size=16, progress=False)
    rep_l = rc.compress(model_l, "lorc", rank=r, calibration=_batches(x), quant="int4", block_size=16, progress=False)
    layer = model_e[0]
    comp = layer.adapters["eora"].delta_weight()
    torch.testing.assert_close(comp, oracle, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(layer.base.weight, fake_quantize(w, "int4", 16))
    err = lambda m: float((m(x) - x @ w.T - m[0].bias).norm())  # noqa: E731
    with torch.no_grad():
        assert err(model_e) < err(model_l)
    assert rep_e.layers[0]["output error"] < rep_l.layers[0]["output error"] < rep_l.layers[0]["output error (no compensation)"]


def test_extract_recovers_a_planted_low_rank_finetune(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).to(D)
    ft = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).to(D)
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        ft[0].weight += _low_rank(12, 16, 2, seed=5)
        ft[2].weight += _low_rank(8, 12, 2, seed=6)
        ft[4].weight += 0.5  # the head: trained fully
    x = torch.randn(7, 16, dtype=D)
    rep = rc.extract(base, ft, rank=2, targets=["0", "2"], progress=False)
    assert all(row["weight error"] < 1e-10 for row in rep)
    torch.testing.assert_close(base(x), ft(x), atol=1e-10, rtol=1e-10)
    # saved as a plain LoRA adapter: rw.load onto a fresh base reproduces the fine-tune
    rw.save(base, tmp_path / "a")
    fresh = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).to(D)
    fresh.load_state_dict(rw.unadapt(base).state_dict())
    rw.load(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(x), ft(x), atol=1e-10, rtol=1e-10)


def test_extract_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from conftest import make_llama

    base, ft = make_llama(seed=0), make_llama(seed=0)
    with torch.no_grad():
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"):
            w = ft.get_submodule(name).weight
            w += _low_rank(*w.shape, 3, seed=7, dtype=w.dtype) * 0.1
    ids = torch.randint(0, 100, (2, 6))
    want = ft(ids).logits
    rc.extract(base, ft, rank=3, progress=False)
    rw.export_peft(base, tmp_path / "peft")
    plain = make_llama(seed=0)
    loaded = peft.PeftModel.from_pretrained(plain, str(tmp_path / "peft"))
    torch.testing.assert_close(loaded(ids).logits, want, atol=2e-4, rtol=1e-4)


def test_rank_rules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))
    targets = ["0", "2"]
    rep = rc.compress(model, "svd", ratio=0.5, targets=targets, progress=False)
    for row in rep:
        m, n = row["shape"]
        assert row["params after"] <= 0.5 * m * n < row["params after"] + (m + n)  # the largest rank that fits
    # energy: the smallest rank whose squared singular values reach the threshold
    model = nn.Sequential(nn.Linear(32, 24))
    s = torch.linalg.svdvals(model[0].weight.detach()).double() ** 2
    rep = rc.compress(model, "svd", energy=0.8, progress=False, targets=["0"])
    r = rep.layers[0]["rank"]
    assert s[:r].sum() / s.sum() >= 0.8 > s[:r - 1].sum() / s.sum()
    # a user table overrides the rule for the layers it names
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16))
    rep = rc.compress(model, "svd", ratio=0.5, ranks={"2": 3}, targets=["0", "2"], progress=False)
    assert [row["rank"] for row in rep] == [6, 3]


def test_target_bytes():
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    before = rc.model_bytes(model)
    rep = rc.compress(model, "svd", target_bytes=before // 2, progress=False)
    assert rep.bytes_after <= before // 2
    assert rep.bytes_after > before // 2 - 4 * (64 + 48 + 48 + 32)  # within one rank step of the target
    assert rc.model_bytes(model) == sum(p.numel() * 4 for p in model.parameters())


def test_heterogeneous_allocation_minimizes_truncation_loss():
    """Two same-type layers, one low-rank-ish: the greedy allocation beats uniform on Σ discarded σ² at equal budget."""
    torch.manual_seed(0)

    def make():
        m = nn.Sequential()
        m.add_module("a", nn.Sequential()); m.add_module("b", nn.Sequential())  # noqa: E702
        m.a.add_module("proj", nn.Linear(20, 20)); m.b.add_module("proj", nn.Linear(20, 20))  # noqa: E702
        with torch.no_grad():
            m.a.proj.weight.copy_(_low_rank(20, 20, 3, dtype=torch.float32) + 0.01 * torch.randn(20, 20))
        return m

    def loss(model, ref):
        return sum(float((ref[n] - getattr(model, n).proj.dense_weight()).norm() ** 2) for n in ("a", "b"))

    uni, het = make(), make()
    het.load_state_dict(uni.state_dict())
    ref = {n: getattr(uni, n).proj.weight.detach().clone() for n in ("a", "b")}
    r1 = rc.compress(uni, "svd", ratio=0.4, targets=["proj"], progress=False)
    r2 = rc.compress(het, "svd", ratio=0.4, allocation="heterogeneous", targets=["proj"], progress=False)
    assert r2.params_after <= r1.params_after
    # oracle: brute force over every rank pair within the same budget (0.4 · 2 · 400 numbers, 40 per rank)
    tails = {n: (torch.linalg.svdvals(ref[n].double()) ** 2).flip(0).cumsum(0).flip(0).tolist() + [0.0]
             for n in ("a", "b")}
    best = min(tails["a"][ra] + tails["b"][rb] for ra in range(1, 21) for rb in range(1, 21) if 40 * (ra + rb) <= 320)
    assert loss(het, ref) == pytest.approx(best, rel=1e-4)
    assert loss(het, ref) < loss(uni, ref)
    assert het.a.proj.rank < het.b.proj.rank


def test_welore_and_sensitivity_meet_the_budget():
    torch.manual_seed(0)
    x = torch.randn(64, 24)
    for alloc in ("welore", "sensitivity"):
        model = nn.Sequential(nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 24))
        dense = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
        rep = rc.compress(model, "svd", ratio=0.5, allocation=alloc, calibration=_batches(x, 16),
                          loss_fn=lambda m, b: m(b).pow(2).mean(), progress=False)
        assert sum(r["params after"] for r in rep) <= 0.5 * dense


def test_adapters_train_on_the_factored_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    rc.compress(model, "svd", ratio=0.6, progress=False, targets=["0"])
    rw.adapt(model, "lora", rank=2, targets=["down", "up"], seed=0)
    x = torch.randn(8, 16)
    before = model(x).detach()
    opt = torch.optim.SGD(rw.trainable_parameters(model), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    after = model(x).detach()
    assert not torch.allclose(before, after)
    # the weight view of the adapted factored layer is the merged product
    dense = model[0].dense_weight()
    torch.testing.assert_close(torch.relu(x @ dense.T + model[0].bias) @ model[2].weight.T + model[2].bias, after,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_follows_the_weights(dtype):
    model = _net(dtype=dtype)
    rc.compress(model, "svd_llm", ratio=0.5, calibration=[torch.randn(40, 16, dtype=dtype)], progress=False)
    assert model[0].up.weight.dtype == dtype and model[0].down.weight.dtype == dtype
    assert model(torch.randn(2, 16, dtype=dtype)).dtype == dtype


def test_compeft_ternary():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    rw.adapt(model, "lora", rank=4, seed=0)
    with torch.no_grad():
        model[0].adapters["default"].lora_B.normal_()
    orig = {n: p.detach().clone() for n, p in model[0].adapters["default"].named_parameters()}
    rep = rc.compress(model, "compeft", density=0.25, alpha=2.0)
    for n, p in model[0].adapters["default"].named_parameters():
        t = orig[n].flatten()
        k = round(0.25 * t.numel())
        keep = t.abs().topk(k).indices
        want = torch.zeros_like(t)
        want[keep] = torch.sign(t[keep]) * 2.0 * t.std()
        torch.testing.assert_close(p.detach().flatten(), want)
    assert rep.bytes_after < rep.bytes_before / 8


# ---- bad input: clear errors, the model unchanged -----------------------------------------------------
def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, repr(model)


@pytest.mark.parametrize("kw, err", [
    ({"ratio": 0.0}, ConfigError), ({"ratio": 1.5}, ConfigError), ({"ratio": -0.2}, ConfigError),
    ({"rank": 13}, ConfigError), ({"ranks": {"0": 40}}, ConfigError), ({"ratio": 0.5, "rank": 2}, ConfigError),
    ({}, ConfigError), ({"energy": 1.2}, ConfigError), ({"ratio": 0.5, "allocation": "magic"}, ConfigError),
    ({"ratio": 0.5, "bogus": 1}, ConfigError), ({"target_bytes": 10}, ConfigError),
])
def test_bad_arguments_leave_the_model_unchanged(kw, err):
    model = _net()
    state, text = _snapshot(model)
    with pytest.raises(err) as info:
        rc.compress(model, "svd", progress=False, **kw)
    assert "compress" in str(info.value)
    assert repr(model) == text and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_other_bad_inputs():
    with pytest.raises(TargetError, match="no nn.Linear"):
        rc.compress(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "svd", ratio=0.5)
    with pytest.raises(ConfigError, match="unknown method"):
        rc.compress(_net(), "svdd", ratio=0.5)
    model = _net()
    state, text = _snapshot(model)
    with pytest.raises(CalibrationError, match="calibration"):
        rc.compress(model, "svd_llm", ratio=0.5)
    with pytest.raises(CalibrationError, match="loss_fn"):
        rc.compress(model, "fwsvd", ratio=0.5, calibration=[torch.randn(4, 16, dtype=D)])
    with pytest.raises(CalibrationError, match="empty"):
        rc.compress(model, "svd_llm", ratio=0.5, calibration=[])
    assert repr(model) == text and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    rc.compress(model, "svd", ratio=0.5, progress=False)
    with pytest.raises(ConfigError, match="compressed already"):
        rc.compress(model, "svd", ratio=0.5)
