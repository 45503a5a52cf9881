"""APOLLO, FRUGAL, GradNormLoRP, Adafactor, SMMF, LoRA+ and ALLoRA's coefficient against independent oracles.

(ALLoRA's update against its equation, APOLLO with every projector kind and LoRA+'s weight decay
against PEFT are in tests/optim/.)

Oracles: the reference packages with the same settings and seeds (apollo-torch for APOLLO and
APOLLO-Mini, transformers' Adafactor, PEFT's LoRA+ optimizer), dense float64 re-derivations of the
papers' update rules written here from the equations (FRUGAL, SMMF, GradNormLoRP — the last with
autograd on the explicit weight-normalized parametrization), closed forms (rank-1 second moments
are factored exactly), and the analytic optimizer-state sizes.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import rankwise as rw
import rankwise.optim as ro
from rankwise.errors import ConfigError
from rankwise.optim.smmf import nnmf_rank1, pack_bits, square_shape, unpack_bits

STEPS = 50


def _batches(n: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 100, (2, 12), generator=g) for _ in range(n)]


def _trajectory(llama, make_opt, dtype=torch.float64, steps: int = STEPS):
    """Loss of a 1-layer LLaMA (hidden 32) trained ``steps`` steps on seeded random tokens."""
    model = llama(0).to(dtype).train()
    opt = make_opt(model)
    losses = []
    for ids in _batches(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64), model, opt


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs()).max())


# ---------------------------------------------------------------------------------------- APOLLO
@pytest.mark.parametrize("mini", [False, True], ids=["apollo", "apollo_mini"])
def test_apollo_matches_apollo_torch(single_thread, mini, llama):
    """50 steps, same param groups and seeds, refreshes every 10 steps, weight decay: the same losses."""
    from apollo_torch import APOLLOAdamW

    rank, scale, scale_type = (1, 128.0, "tensor") if mini else (4, 2.0, "channel")

    def reference(model):
        groups = ro.param_groups(model, rank=rank, update_proj_gap=10, scale=scale)
        groups[-1].update(proj="random", scale_type=scale_type, proj_type="std")
        return APOLLOAdamW(groups, lr=1e-2, weight_decay=0.01)

    def ours(model):
        groups = ro.param_groups(model, rank=rank, update_proj_gap=10, scale=scale)
        if mini:
            return ro.APOLLOMini(groups, lr=1e-2, weight_decay=0.01)
        return ro.APOLLO(groups, lr=1e-2, weight_decay=0.01, scale_type="channel")

    ref, _, _ = _trajectory(llama, reference)
    got, model, opt = _trajectory(llama, ours)
    assert ref[-1] < ref[0] - 0.3  # it trains
    assert _max_rel(got, ref) < 1e-9
    # the random projection is regenerated, not stored: state = 2 moments + one norm per matrix
    sb = ro.state_bytes(opt, model)
    for name, p in ro.matrix_parameters(model):
        m, n = p.shape
        low = rank * n if m < n else m * rank
        assert sb[f"{name}.exp_avg"] + sb[f"{name}.exp_avg_sq"] == 2 * low * 8
        assert sb[f"{name}.scaled_grad"] == 8
        assert f"{name}.proj_basis" not in sb


def test_apollo_stored_projection_and_scale_front(single_thread, llama):
    """``store_projection`` changes memory, not the trajectory; ``scale_front`` matches apollo-torch."""
    from apollo_torch import APOLLOAdamW

    def reference(model):
        groups = ro.param_groups(model, rank=4, update_proj_gap=7, scale=4.0)
        groups[-1].update(proj="random", scale_type="channel", proj_type="std")
        return APOLLOAdamW(groups, lr=5e-3, scale_front=True)

    def ours(store):
        return lambda model: ro.APOLLO(ro.param_groups(model, rank=4, update_proj_gap=7, scale=4.0), lr=5e-3,
                                       scale_front=True, store_projection=store)

    ref, _, _ = _trajectory(llama, reference, steps=20)
    a, _, _ = _trajectory(llama, ours(False), steps=20)
    b, model, opt = _trajectory(llama, ours(True), steps=20)
    assert _max_rel(a, ref) < 1e-9 and _max_rel(b, ref) < 1e-9
    assert any(k.endswith("proj_basis") for k in ro.state_bytes(opt, model))


# ---------------------------------------------------------------------------------------- Adafactor
@pytest.mark.parametrize("settings", [
    dict(lr=None, relative_step=True, scale_parameter=True, warmup_init=False),
    dict(lr=None, relative_step=True, scale_parameter=True, warmup_init=True),
    dict(lr=3e-3, beta1=0.9, weight_decay=0.01, clip_threshold=1.0, scale_parameter=True),
    dict(lr=1e-2, decay_rate=-0.5, clip_threshold=0.5, scale_parameter=False),
], ids=["paper_relative_step", "paper_warmup_init", "manual_lr_beta1_decay", "manual_lr_clip"])
def test_adafactor_matches_transformers(single_thread, settings, llama):
    from transformers.optimization import Adafactor as HFAdafactor

    full = dict(lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None, weight_decay=0.0,
                scale_parameter=True, relative_step=False, warmup_init=False)
    full.update(settings)
    ref, _, _ = _trajectory(llama, lambda m: HFAdafactor(m.parameters(), **full))
    got, model, opt = _trajectory(llama, lambda m: ro.Adafactor(m.parameters(), **full))
    assert _max_rel(got, ref) < 1e-9
    # factored state: m + n numbers per matrix (plus m·n for the first moment)
    sb = ro.state_bytes(opt, model)
    for name, p in model.named_parameters():
        if p.ndim == 2:
            assert sb[f"{name}.exp_avg_sq_row"] + sb[f"{name}.exp_avg_sq_col"] == sum(p.shape) * 8
            assert sb.get(f"{name}.exp_avg", 0) == (p.numel() * 8 if full["beta1"] is not None else 0)


def test_adafactor_rank1_second_moment_is_exact():
    """With ε₁ = 0 and G = a bᵀ, G² has rank 1, so V̂ = G² exactly and the first step is −lr·sign(G)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)
    w0 = torch.randn(6, 9, generator=g, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = ro.Adafactor([p], lr=0.1, eps=(0.0, 1e-3), clip_threshold=1.0)
    p.grad = torch.outer(a, b)
    opt.step()
    torch.testing.assert_close(p.detach(), w0 - 0.1 * torch.outer(a, b).sign(), rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------- SMMF
def test_square_shape_and_bit_packing():
    for n in [1, 2, 7, 12, 36, 97, 100, 1000, 4096, 3 * 5 * 7 * 11]:
        rows, cols = square_shape(n)
        best = max(k for k in range(1, math.isqrt(n) + 1) if n % k == 0)  # brute force
        assert (rows, cols) == (n // best, best)
    g = torch.Generator().manual_seed(0)
    for n in [1, 8, 13, 1000]:
        mask = torch.rand(n, generator=g) > 0.5
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
        assert torch.equal(unpack_bits(packed, n).bool(), mask)
    every_byte = torch.arange(256, dtype=torch.uint8)  # all bit patterns survive unpack -> pack
    assert torch.equal(pack_bits(unpack_bits(every_byte, 256 * 8).bool()), every_byte)


def test_nnmf_rank1_exact_on_rank1():
    g = torch.Generator().manual_seed(1)
    for shape in [(5, 8), (8, 5), (4, 4)]:
        a, b = torch.rand(shape[0], generator=g, dtype=torch.float64), torch.rand(shape[1], generator=g,
                                                                                    dtype=torch.float64)
        m = torch.outer(a, b)
        r, c = torch.empty(shape[0], dtype=torch.float64), torch.empty(shape[1], dtype=torch.float64)
        nnmf_rank1(m, r, c)
        torch.testing.assert_close(torch.outer(r, c), m, rtol=1e-13, atol=0)


def _smmf_dense_reference(w0, grads, lr, beta, eps, decay_rate, growth):
    """SMMF re-derived densely from the paper: moments reconstructed as (A1)(1ᵀA)/(1ᵀA1), signs kept."""
    n, m = square_shape(w0.numel())
    w = w0.clone()
    mom = torch.zeros(n, m, dtype=w.dtype)   # reconstruction of the stored first moment
    vel = torch.zeros(n, m, dtype=w.dtype)
    for t, gr in enumerate(grads, start=1):
        gm = gr.reshape(n, m)
        b1 = beta * growth ** (t - 1)
        b2 = 1 - t ** decay_rate
        mt = b1 * mom + (1 - b1) * gm
        vt = b2 * vel + (1 - b2) * gm * gm
        w = w - lr * (mt / (vt.sqrt() + eps)).reshape(w.shape)

        def rank1(x):
            tot = x.sum()
            return torch.outer(x.sum(1), x.sum(0)) / tot if tot != 0 else torch.zeros_like(x)

        mom = torch.where(mt > 0, 1.0, -1.0).to(w.dtype) * rank1(mt.abs())
        vel = rank1(vt)
    return w


@pytest.mark.parametrize("shape", [(6, 10), (3, 4, 5), (24,)], ids=["matrix", "3d", "vector"])
def test_smmf_matches_dense_rederivation(shape):
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]
    p = torch.nn.Parameter(w0.clone())
    opt = ro.SMMF([p], lr=0.01, beta=0.9, eps=1e-8, decay_rate=-0.8, growth_rate=0.999)
    for gr in grads:
        p.grad = gr.clone()
        opt.step()
    ref = _smmf_dense_reference(w0, grads, 0.01, 0.9, 1e-8, -0.8, 0.999)
    torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-14)


def test_smmf_rank1_gradients_equal_uncompressed_adam_rule():
    """Positive rank-1 gradients ``c_t a bᵀ`` keep both moments rank 1 and positive, so the factorization
    loses nothing: SMMF equals the same update with dense moments (``vector_reshape=False`` on a vector)."""
    g = torch.Generator().manual_seed(3)
    # 12 x 8 is its own square matricization (square_shape(96) == (12, 8)), so G stays rank 1
    a, b = torch.rand(12, generator=g, dtype=torch.float64) + 0.1, torch.rand(8, generator=g, dtype=torch.float64) + 0.1
    w0 = torch.randn(12, 8, generator=g, dtype=torch.float64)
    factored = torch.nn.Parameter(w0.clone())
    dense = torch.nn.Parameter(w0.reshape(-1).clone())  # a vector with vector_reshape=False: dense moments
    opts = [ro.SMMF([factored], lr=0.05), ro.SMMF([dense], lr=0.05, vector_reshape=False)]
    for t in range(10):
        grad = (1.0 + 0.3 * t) * torch.outer(a, b)
        factored.grad, dense.grad = grad.clone(), grad.reshape(-1).clone()
        for o in opts:
            o.step()
    torch.testing.assert_close(factored.detach().reshape(-1), dense.detach(), rtol=1e-12, atol=1e-14)


def test_smmf_state_bytes_formula():
    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Linear(20, 7))
    opt = ro.SMMF(model.parameters(), lr=1e-3)
    model(torch.randn(3, 30)).sum().backward()
    opt.step()
    expected = 0
    for p in model.parameters():
        rows, cols = square_shape(p.numel())
        expected += 2 * (rows + cols) * 4 + -(-p.numel() // 8)   # two factored moments + 1-bit signs
    assert ro.state_bytes(opt)["total"] == expected
    adam = sum(2 * p.numel() * 4 for p in model.parameters())
    assert expected < 0.25 * adam


# ---------------------------------------------------------------------------------------- FRUGAL
def _adam_torch(m, v, g, t, lr, betas, eps):
    m = betas[0] * m + (1 - betas[0]) * g
    v = betas[1] * v + (1 - betas[1]) * g * g
    upd = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    return m, v, lr * upd


@pytest.mark.parametrize("shape,rule", [((6, 10), "sign_sgd"), ((10, 6), "sign_sgd"), ((6, 10), "sgd")])
def test_frugal_matches_dense_rederivation(shape, rule):
    """Three steps with refreshes at 0 and 2 (moments reset there): SVD subspace Adam + signSGD residual."""
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    lr, wd, betas, eps, r = 0.01, 0.1, (0.9, 0.999), 1e-8, 2
    p = torch.nn.Parameter(w0.clone())
    opt = ro.FRUGAL([{"params": [p], "rank": r, "update_proj_gap": 2}], lr=lr, weight_decay=wd, betas=betas,
                    eps=eps, inactive_update=rule, inactive_lr_scale=0.5)
    for gr in grads:
        p.grad = gr.clone()
        opt.step()

    w = w0.clone()
    left = shape[0] < shape[1]
    for k, gr in enumerate(grads):
        if k % 2 == 0:  # refresh: top-r singular vectors of the current gradient, moments reset
            u, _, vh = torch.linalg.svd(gr)
            basis = u[:, :r] if left else vh[:r].t()
            m = v = 0.0
            t = 0
        low = basis.t() @ gr if left else gr @ basis
        t += 1
        m, v, upd = _adam_torch(m, v, low, t, lr, betas, eps)
        inside = basis @ low if left else low @ basis.t()
        resid = gr - inside
        w = w * (1 - lr * wd) - (basis @ upd if left else upd @ basis.t())
        w = w - 0.5 * lr * (resid.sign() if rule == "sign_sgd" else resid)
    torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-13)


def test_frugal_full_rank_svd_has_no_residual_and_trains(single_thread, llama):
    """At full rank ``G − P Pᵀ G = 0``: signSGD and SGD on the residual change nothing (the sign of the
    rounding noise must not move the weights), so every rule equals inactive_update='none'."""
    g = torch.Generator().manual_seed(6)
    w0 = torch.randn(5, 8, generator=g, dtype=torch.float64)
    grads = [torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    outs = []
    for rule in ("sign_sgd", "sgd", "none"):
        p = torch.nn.Parameter(w0.clone())
        opt = ro.FRUGAL([{"params": [p], "rank": 5}], lr=0.01, inactive_update=rule)
        for gr in grads:
            p.grad = gr.clone()
            opt.step()
        outs.append(p.detach())
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)
    torch.testing.assert_close(outs[1], outs[2], rtol=0, atol=0)
    losses, _, _ = _trajectory(llama,
                               lambda m: ro.FRUGAL(ro.param_groups(m, rank=0.25, update_proj_gap=10), lr=1e-2),
                               steps=20)
    assert losses[-1] < losses[0] - 0.1


# ---------------------------------------------------------------------------------------- GradNormLoRP
def test_gradnorm_lorp_matches_autograd_on_explicit_weight_norm():
    """The oracle keeps ``g`` and ``V`` explicitly, gets ``∇g, ∇V`` from autograd through
    ``W = g V/‖V‖_row``, projects ``∇V`` on its top-r singular vectors and runs Adam; the optimizer
    keeps only ``W`` and two row vectors. Three steps, refresh every 2, weight decay on ``g``."""
    g = torch.Generator().manual_seed(7)
    m, n, r = 6, 9, 3
    lr, wd, betas, eps = 0.02, 0.05, (0.9, 0.99), 1e-6
    w0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    xs = [torch.randn(n, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    ys = [torch.randn(m, 5, generator=g, dtype=torch.float64) for _ in range(3)]

    def loss_of(w, k):
        return 0.5 * ((w @ xs[k] - ys[k]) ** 2).sum()

    p = torch.nn.Parameter(w0.clone())
    opt = ro.GradNormLoRP([{"params": [p], "rank": r, "update_proj_gap": 2}], lr=lr, betas=betas, eps=eps,
                          weight_decay=wd)
    for k in range(3):
        opt.zero_grad()
        loss_of(p, k).backward()
        opt.step()

    mag = w0.norm(dim=1).clone()
    vdir = w0.clone()
    mv = vv = 0.0
    mg = vg = torch.zeros(m, dtype=torch.float64)
    for k in range(3):
        gm = mag.clone().requires_grad_(True)
        vd = vdir.clone().requires_grad_(True)
        loss_of(gm.unsqueeze(1) * vd / vd.norm(dim=1, keepdim=True), k).backward()
        if k % 2 == 0:
            u = torch.linalg.svd(vd.grad)[0]
            basis = u[:, :r]  # m < n: left projection
        low = basis.t() @ vd.grad
        t = k + 1
        mv = betas[0] * mv + (1 - betas[0]) * low
        vv = betas[1] * vv + (1 - betas[1]) * low * low
        mg = betas[0] * mg + (1 - betas[0]) * gm.grad
        vg = betas[1] * vg + (1 - betas[1]) * gm.grad ** 2
        step = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        vdir = vdir - step * basis @ (mv / (vv.sqrt() + eps))
        mag = mag * (1 - lr * wd) - step * mg / (vg.sqrt() + eps)
    w_ref = mag.unsqueeze(1) * vdir / vdir.norm(dim=1, keepdim=True)
    torch.testing.assert_close(p.detach(), w_ref, rtol=1e-11, atol=1e-12)
    # state: GaLore's (2·r·n moments + m·r basis) plus 4 row vectors
    sb = ro.state_bytes(opt)
    assert sb["total"] == (2 * r * n + m * r + 4 * m) * 8


# ---------------------------------------------------------------------------------------- state sizes
def test_state_bytes_analytic_for_projected_optimizers(single_thread):
    """FRUGAL keeps GaLore's state; APOLLO-Mini 2n + 1 numbers per matrix; Adafactor m + n."""
    model = torch.nn.Sequential(torch.nn.Linear(24, 16, bias=False), torch.nn.Linear(16, 40, bias=False))
    shapes = [tuple(p.shape) for p in model.parameters()]  # (16, 24), (40, 16)
    x = torch.randn(4, 24)

    def state(opt):
        model.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        return ro.state_bytes(opt)["total"]

    r = 4
    low = sum(r * max(s) for s in shapes)             # projected moments: r × (larger side)
    basis = sum(r * min(s) for s in shapes)           # basis of the smaller side
    assert state(ro.FRUGAL(ro.param_groups(model, rank=r), lr=1e-3)) == (2 * low + basis) * 4
    assert state(ro.APOLLOMini(ro.param_groups(model, rank=1), lr=1e-3)) == sum(2 * max(s) + 1 for s in shapes) * 4
    assert state(ro.Adafactor(model.parameters(), lr=1e-3)) == sum(sum(s) for s in shapes) * 4


# ---------------------------------------------------------------------------------------- resume + schedulers
@pytest.mark.parametrize("name", ["apollo", "frugal", "gradnorm_lorp", "adafactor", "smmf"])
def test_state_dict_round_trip_and_scheduler(single_thread, name, llama):
    """3 steps, save the state (``torch.load(weights_only=True)``), 3 more steps on a fresh optimizer
    equal 6 uninterrupted steps; a LambdaLR scheduler drives every optimizer's ``lr``."""

    def make(model):
        groups = ro.param_groups(model, rank=4, update_proj_gap=2)
        opt = {"apollo": lambda: ro.APOLLO(groups, lr=1e-2), "frugal": lambda: ro.FRUGAL(groups, lr=1e-2),
               "gradnorm_lorp": lambda: ro.GradNormLoRP(groups, lr=1e-2),
               "adafactor": lambda: ro.Adafactor(model.parameters(), lr=1e-2),
               "smmf": lambda: ro.SMMF(model.parameters(), lr=1e-2)}[name]()
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

    batches = _batches(6, seed=9)

    def run(model, opt, sched, ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    ref = llama(0).double().train()
    opt, sched = make(ref)
    for ids in batches:
        run(ref, opt, sched, ids)

    model = llama(0).double().train()
    opt, sched = make(model)
    for ids in batches[:3]:
        run(model, opt, sched, ids)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    opt2, sched2 = make(model)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    for ids in batches[3:]:
        run(model, opt2, sched2, ids)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------- LoRA+ / ALLoRA
def _peft_and_rankwise(llama, perturb, rank=4):
    import peft

    ours = llama(0)
    rw.adapt(ours, "lora", rank=rank, alpha=8, targets="all-linear", seed=0)
    theirs = peft.get_peft_model(llama(0), peft.LoraConfig(r=rank, lora_alpha=8, target_modules="all-linear"))
    perturb([p for n, p in ours.named_parameters() if "lora_" in n], seed=3, std=0.1)  # B ≠ 0
    mine = {n.replace(".adapters.default.", "."): p for n, p in ours.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                key = n.removeprefix("base_model.model.").replace(".default.weight", "")
                p.copy_(mine[key])
    return ours, theirs, mine


def test_lora_plus_groups_and_step_match_peft(single_thread, llama, perturb):
    from peft.optimizers import create_loraplus_optimizer

    ours, theirs, factors = _peft_and_rankwise(llama, perturb)
    groups = ro.lora_plus(ours, lr=1e-3, ratio=16)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"lora_A", "lora_B"}
    assert by_name["lora_B"]["lr"] == pytest.approx(16e-3) and by_name["lora_A"]["lr"] == 1e-3
    ids_b = {id(p) for p in by_name["lora_B"]["params"]}
    assert ids_b == {id(p) for n, p in factors.items() if n.endswith("lora_B")}
    opt = torch.optim.AdamW(groups, lr=1e-3)
    ref = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    batches = _batches(3, seed=11)
    for model, o in ((ours, opt), (theirs, ref)):
        model.train()
        for ids in batches:
            model(input_ids=ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad()
    theirs_f = {n.removeprefix("base_model.model.").replace(".default.weight", ""): p
                for n, p in theirs.named_parameters() if "lora_" in n}
    for k, p in factors.items():
        torch.testing.assert_close(p, theirs_f[k], rtol=1e-5, atol=1e-6)


def test_lora_plus_rejects_model_without_lora(llama):
    with pytest.raises(ConfigError, match="no trainable LoRA factors"):
        ro.lora_plus(llama(0), lr=1e-3)
    with pytest.raises(ConfigError, match="ratio"):
        ro.lora_plus(llama(0), lr=1e-3, ratio=0)


def test_allora_zero_rows_get_eta():
    """The coefficient 1/sqrt(‖θ_row‖² + 1/η²) in closed form: η on a zero row, 1/√26 for (3, 4) at η=1."""
    from rankwise.optim.lora_plus import allora_scale

    b = torch.zeros(5, 3)
    assert torch.allclose(allora_scale(b, 4.0), torch.full((5, 1), 4.0))
    w = torch.tensor([[3.0, 4.0]])
    assert torch.allclose(allora_scale(w, 1.0), torch.tensor([[1 / math.sqrt(26.0)]]))


# ---------------------------------------------------------------------------------------- errors
def test_config_errors_name_the_value():
    p = [torch.nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises(ConfigError, match="scale_type='row'"):
        ro.APOLLO([{"params": p, "rank": 1}], scale_type="row")
    with pytest.raises(ConfigError, match="inactive_update='adam'"):
        ro.FRUGAL(p, inactive_update="adam")
    with pytest.raises(ConfigError, match="relative_step"):
        ro.Adafactor(p, lr=1e-3, relative_step=True)
    with pytest.raises(ConfigError, match="decay_rate=0.5"):
        ro.SMMF(p, decay_rate=0.5)
    with pytest.raises(ConfigError, match="rank=0"):
        ro.GradNormLoRP([{"params": p, "rank": 0}])
