"""LoQT (rankwise.pretrain.loqt) against independent oracles: rankwise.quant.error_bound for the
merge, the dense autograd ∂L/∂W and its SVD for P, the closed form of the merge schedule, the
packed storage sizes, an uninterrupted run for resume, and a regular optimizer for layer-wise steps."""

from __future__ import annotations

import math

import pytest
import torch
from _pretrain_helpers import collate, config, data, ids, lm_loss, run, tiny_llama
from torch import nn

import rankwise.pretrain as rp
from rankwise import quant
from rankwise.core.rank import rank_step
from rankwise.errors import ConfigError
from rankwise.pretrain.loqt import LoQT, is_merge_step, layerwise_optimizers, merge_steps


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


class Net(nn.Module):
    def __init__(self, out_f=24, in_f=40, dtype=torch.float32, device="cpu"):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(in_f, out_f, dtype=dtype, device=device)

    def forward(self, x):
        return self.fc(x)


def _net(out_f=24, in_f=40, **options):
    net = Net(out_f, in_f)
    w0 = net.fc.weight.detach().clone()
    rp.parametrize(net, "loqt", targets=r"^fc$", **{"rank": 4, "update_gap": 3, **options})
    return net, w0


def _captured_step(net, seed=0):
    """One forward/backward of a squared loss with the layer armed; returns x and the dense oracle ∂L/∂W."""
    m = net.fc
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, m.in_features, generator=g)  # does not require grad
    t = torch.randn(7, m.out_features, generator=g)
    assert m._armed
    ((net(x) - t) ** 2).sum().backward()
    w = m.dense_weight().double().requires_grad_(True)
    ((x.double() @ w.T + m.bias.detach().double() - t.double()) ** 2).sum().backward()
    return x, w.grad


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("side", ["out", "in"])
def test_merge_requantizes_within_the_quantizer_bound(kind, side):
    net, w0 = _net(quant=kind, side=side, compensate_iterations=0)
    m = net.fc
    # the initial quantization: within error_bound of the original weight
    assert ((m.base_weight() - w0).abs() <= quant.error_bound(w0, kind) + 1e-7).all()
    _, grad = _captured_step(net)
    with torch.no_grad():  # a trained adapter to merge: random orthonormal P, random B
        m.P.copy_(torch.linalg.qr(torch.randn(m.P.shape, generator=torch.Generator().manual_seed(1)))[0])
        m.B.copy_(torch.randn(m.B.shape, generator=torch.Generator().manual_seed(2)) * 0.2)
    w_fp = m.dense_weight().float()  # the function before the merge
    x = torch.randn(5, m.in_features, generator=torch.Generator().manual_seed(3))
    y_before = net(x).detach()
    m.merge_and_reinit(0)
    bound = quant.error_bound(w_fp, kind)
    assert torch.count_nonzero(m.B) == 0  # B = 0 without compensation
    assert ((m.base_weight(torch.float32) - w_fp).abs() <= bound + 1e-6).all()
    assert (m.base_weight(torch.float32) - w_fp).abs().max() > 0  # it was re-quantized
    y_after = net(x).detach()
    assert ((y_after - y_before).abs() <= x.abs() @ bound.T + 1e-5).all()
    # P: top-r singular vectors of the dense weight gradient, orthonormal columns
    u, _, vh = torch.linalg.svd(grad)
    top = u[:, :4] if m.side == "out" else vh[:4].T
    torch.testing.assert_close((m.P.T @ m.P).double(), torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close((m.P @ m.P.T).double(), top @ top.T, atol=1e-5, rtol=0)


def test_error_compensation_folds_the_quantization_error_into_B():
    """Reference ``optimize_quant_and_lora_jointly``: B = P⁺(W_fp − Q⁻¹(W_q))/s, best of c alternations;
    never worse than plain re-quantization (whose error is within error_bound) and exactly
    ``(I − PP⁺)(W_cur − Q⁻¹(Q(W_cur)))``-sized, so below the bound in Frobenius norm."""
    errors = {}
    for c in (0, 5):
        net, _ = _net(quant="nf4", compensate_iterations=c, rank=8)
        m = net.fc
        _captured_step(net)
        with torch.no_grad():
            m.P.copy_(torch.linalg.qr(torch.randn(m.P.shape, generator=torch.Generator().manual_seed(1)))[0])
            m.B.copy_(torch.randn(m.B.shape, generator=torch.Generator().manual_seed(2)) * 0.2)
        w_fp = m.dense_weight().float()
        m.merge_and_reinit(c)
        errors[c] = float(torch.linalg.matrix_norm(m.dense_weight().float() - w_fp))
        assert errors[c] <= float(torch.linalg.matrix_norm(quant.error_bound(w_fp, "nf4"))) + 1e-5
        if c:
            resid = w_fp - m.base_weight(torch.float32)
            p = m.P.float()
            b_ref = (resid @ torch.linalg.pinv(p).T) / m.scale if m.side == "in" else torch.linalg.pinv(p) @ resid / m.scale
            torch.testing.assert_close(m.B.float(), b_ref, atol=1e-5, rtol=1e-4)
            assert torch.count_nonzero(m.B) > 0
    assert errors[5] < errors[0]


def test_dense_gradient_capture_is_the_weight_gradient_and_only_on_merge_steps():
    net, _ = _net()
    m = net.fc
    _, grad = _captured_step(net)
    torch.testing.assert_close(m._dense_grad.double(), grad, atol=1e-4, rtol=1e-5)
    m.arm(False)
    m._dense_grad = None
    x = torch.randn(3, m.in_features, requires_grad=True)
    net(x).sum().backward()
    assert m._dense_grad is None and m.B.grad is not None


@pytest.mark.parametrize("progression", ["exponential", "linear", "static"])
def test_merge_schedule_matches_the_closed_form(progression):
    tau, psi, until = 100, 1.2, 20000
    got = merge_steps(until, tau, psi, progression)
    js = range(1, len(got) + 2)
    if progression == "exponential":  # T_j = j·τ + Σ_{i=1}^{j−1} ⌊ψ^i⌋  (T_{j+1} = T_j + τ + ⌊ψ^j⌋)
        closed = [j * tau + sum(math.floor(psi ** i) for i in range(1, j)) for j in js]
    elif progression == "linear":  # T_j = τ + Σ_{i=1}^{j−1} ⌊τ + iψ⌋
        closed = [tau + sum(math.floor(tau + i * psi) for i in range(1, j)) for j in js]
    else:
        closed = [j * tau for j in js]
    assert got == [t for t in closed if t <= until] and closed[len(got)] > until
    cfg = LoQT.Config(update_gap=tau, growth=psi, progression=progression)
    events = [s for s in range(1, 3000) if is_merge_step(s, cfg)]
    assert events == [1] + [t for t in closed if t < 3000]


def test_packed_storage_and_no_dense_float_weight():
    for kind, per in (("nf4", 0.5), ("int8", 1.0)):
        model = tiny_llama()
        rp.parametrize(model, "loqt", rank=4, quant=kind)
        for name, m in rp.wrapped_layers(model):
            numel = m.out_features * m.in_features
            assert m.qdata.dtype == torch.uint8 and m.qdata.numel() == math.ceil(numel * per), name
            assert m.absmax.dtype == torch.float32 and m.absmax.numel() == math.ceil(numel / 64)
            dense_shaped = [k for k, t in m.state_dict().items() if t.shape == (m.out_features, m.in_features)]
            assert dense_shaped == [], (name, dense_shaped)
            assert sum(t.numel() * t.element_size() for t in m.state_dict().values()) < 2 * numel * per + \
                4 * math.ceil(numel / 64) + 4 * (4 * (m.out_features + m.in_features) + m.out_features) + 1


def test_tiny_llama_trains_through_train_with_merges():
    model = tiny_llama()
    # events: step 1 (P from ∇W), merge at step 3; int8, whose grid is fine enough that two small
    # steps of B move codes (NF4's coarse grid swallows them: the merged update then stays in B)
    rp.parametrize(model, "loqt", rank=4, update_gap=3, quant="int8")
    layers = rp.wrapped_layers(model)
    q0 = {n: m.qdata.clone() for n, m in layers}
    result = run(model, 5)
    assert len(result.losses) == 5 and all(math.isfinite(v) for v in result.losses)
    for n, m in layers:
        assert not torch.equal(m.qdata, q0[n]), n  # the merge re-quantized the base
        assert torch.count_nonzero(m.P) > 0 and torch.count_nonzero(m.B) > 0
        torch.testing.assert_close((m.P.T @ m.P), torch.eye(4), atol=1e-5, rtol=0)
        assert not m._armed and m._dense_grad is None  # the next merge is at step 7


def test_merge_resets_B_state_and_reports():
    model = tiny_llama()
    rp.parametrize(model, "loqt", rank=4, update_gap=2, compensate_iterations=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in (1, 2):
        lm_loss(model, ids(seed=step)).backward()
        opt.step()
        info = rank_step(model, step, opt)["pretrain"]
        opt.zero_grad(set_to_none=True)
        layers = rp.wrapped_layers(model)
        assert info["merged"] == 14
        assert info["state_zeroed"] == sum(2 * m.B.numel() for _, m in layers)
        for _, m in layers:
            assert torch.count_nonzero(m.B) == 0
            assert all(float(t.abs().sum()) == 0 for k, t in opt.state[m.B].items() if k != "step")


@pytest.mark.parametrize("every, die_after", [(6, 6), (4, 5), (2, 3)])
def test_resume_is_bit_exact_across_a_merge(tmp_path, every, die_after):
    """Merges at steps 1, 3 and 7 (τ = 3); killed in the step after a checkpoint at 6 (before a merge), 4
    or 2 (before a step that merges nothing) and resumed from the checkpoint alone: it holds the packed
    base, P and the capture flag, and a stale capture of the fresh model is dropped."""
    from safetensors.torch import load_file

    from rankwise.train import train

    steps, options = 8, dict(rank=4, update_gap=3)
    straight = tiny_llama()
    rp.parametrize(straight, "loqt", **options)
    run(straight, steps)

    first = tiny_llama()
    rp.parametrize(first, "loqt", **options)
    calls = []

    def dying_loss(m, batch):
        calls.append(1)
        if len(calls) > die_after:
            raise KeyboardInterrupt
        return lm_loss(m, batch)

    with pytest.raises(KeyboardInterrupt):
        train(first, data(), collate, dying_loss, config(steps, checkpoint_every=every), checkpoint_dir=tmp_path / "c",
              progress=False)
    frozen = rp.frozen_state(first)
    assert {k.rsplit(".", 1)[1] for k in frozen} == {"qdata", "absmax", "P", "capture"}
    saved = load_file(tmp_path / "c" / "model.safetensors")  # the checkpoint holds them (checkpoint_frozen)
    assert set(frozen) <= set(saved)

    resumed = tiny_llama()
    rp.parametrize(resumed, "loqt", **options)
    train(resumed, data(), collate, lm_loss, config(steps, checkpoint_every=every), checkpoint_dir=tmp_path / "c",
          resume=True, progress=False)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bfloat16_forward_and_autocast():
    model = tiny_llama(dtype=torch.bfloat16)
    rp.parametrize(model, "loqt", rank=4)
    out = model(input_ids=ids(), labels=ids())
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    for _, m in rp.wrapped_layers(model):
        assert m.B.dtype == m.P.dtype == torch.bfloat16 and m.B.grad.dtype == torch.bfloat16
        assert m._dense_grad is not None and m._dense_grad.dtype == torch.float32  # captured at step 1

    model = tiny_llama()
    rp.parametrize(model, "loqt", rank=4)
    with torch.no_grad():
        for _, m in rp.wrapped_layers(model):
            m.P.copy_(torch.linalg.qr(torch.randn(m.P.shape, generator=torch.Generator().manual_seed(1)))[0])
            m.B.copy_(torch.randn(m.B.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    ref = model(input_ids=ids()).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids(), labels=ids())
    out.loss.backward()
    torch.testing.assert_close(out.logits.float(), ref, atol=0.15, rtol=0.05)
    assert all(m.B.grad.dtype == torch.float32 and torch.isfinite(m.B.grad).all() for _, m in rp.wrapped_layers(model))


def test_layerwise_optimizers_equal_a_regular_adam_step():
    def build():
        model = tiny_llama()
        rp.parametrize(model, "loqt", rank=4, update_gap=2)
        return model

    regular, layered = build(), build()
    opt = torch.optim.Adam([p for p in regular.parameters() if p.requires_grad], lr=1e-2, foreach=False)
    handle = layerwise_optimizers(layered, lambda groups: torch.optim.Adam(groups, lr=1e-2, foreach=False))
    for step in range(1, 5):  # merges at 1, 2 and 4 reset B's state in both
        lm_loss(regular, ids(seed=step)).backward()
        opt.step()
        rank_step(regular, step, opt)
        opt.zero_grad(set_to_none=True)
        lm_loss(layered, ids(seed=step)).backward()  # parameters step inside backward
        assert all(p.grad is None for p in layered.parameters())
        rank_step(layered, step, handle)
    a, b = regular.state_dict(), layered.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    handle.remove()


def test_device_the_quantizer_cannot_run_on_is_a_clear_error():
    net = Net(device="meta")
    with pytest.raises(ConfigError, match="meta"):
        rp.parametrize(net, "loqt", targets=r"^fc$", rank=4)
    assert isinstance(net.fc, nn.Linear) and getattr(net, "_rankwise_pretrain", None) is None


@pytest.mark.parametrize("options, match", [
    (dict(rank=4, quant="fp8"), "fp8"),
    (dict(rank=4, progression="cosine"), "progression"),
    (dict(rank=4, side="left"), "side"),
    (dict(rank=4, alpha=0), "alpha"),
    (dict(rank=40), "rank=40"),
])
def test_bad_options_raise(options, match):
    model = tiny_llama()
    with pytest.raises(ConfigError, match=match):
        rp.parametrize(model, "loqt", **options)
    assert not rp.wrapped_layers(model)
