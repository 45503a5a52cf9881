"""SVD/LDU-based and single-/multiplicative-matrix adapters: lora_xs, svft, svfit, spectral, sorsa,
salt, loldu, singlora, lorma.

None of them is in PEFT 0.21, so the oracles are closed forms and dense re-derivations from an
independent float64 decomposition of the base weight (``torch.linalg.svd`` / ``lu`` computed
here, never the adapters' own buffers): parameter counts against the papers' formulas, the
defining property of each method, and a short training run per method.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.errors import ConfigError
from rankwise.io.atomic import read_tensors

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = ("lora_xs", "svft", "svfit", "spectral", "sorsa", "salt", "loldu", "singlora", "lorma")
ATOL = 1e-5


class Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _linear(n_out: int, n_in: int, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(nn.Linear(n_in, n_out))


def _adapt(net, method, seed=0, **kw):
    rw.adapt(net, method, targets=["layer"], seed=seed, **kw)
    return net.layer.adapters["default"]


def _perturb(params, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _w_adapted(net) -> torch.Tensor:
    """``W0 + ΔW`` of the adapted layer as float64 ``(out, in)``."""
    layer = net.layer
    return (layer.base.weight + layer.delta_weight()).detach().double()


def _svd64(w: torch.Tensor):
    u, s, vt = torch.linalg.svd(w.detach().double(), full_matrices=False)
    return u, s, vt


def _x(n_in, seed=1, rows=5):
    return torch.randn(rows, n_in, generator=torch.Generator().manual_seed(seed))


# ---- parameter counts: the papers' formulas ------------------------------------------------------
@pytest.mark.parametrize("m,n", [(12, 20), (20, 12), (16, 16)])
def test_parameter_counts_match_paper_formulas(m, n):
    k = min(m, n)
    cases = [
        ("lora_xs", {"rank": 4}, 4 * 4),  # r²
        ("svft", {"pattern": "plain"}, k),  # min(m, n)
        ("svft", {"pattern": "banded", "off_diag": 2},
         sum(1 for i in range(k) for j in range(k) if abs(i - j) <= 2)),  # entries of a band, counted
        ("svft", {"pattern": "random", "num_random": 7}, k + 7),
        ("svfit", {"rank": 5}, 5),
        ("svfit", {"rank": 5, "rotate": True}, 5 + 2 * (5 * 4 // 2)),
        ("spectral", {"rank": 3, "mode": "additive"}, 3 * (m + n)),
        ("spectral", {"rank": 3, "mode": "rotational"}, 2 * (3 * 2 // 2)),
        ("sorsa", {"rank": 3}, 3 * (m + n + 1)),
        ("salt", {"rank": 3, "lora_rank": 2}, 2 * 3 + 2 * (m + n)),
        ("loldu", {}, k + 1),  # ≈ min(m, n) + 1
        ("loldu", {"rank": 4}, 4 + 1),
        ("singlora", {"rank": 3}, 3 * max(m, n)),
        ("lorma", {"rank": 3}, 2 * 3 * m),
    ]
    for method, kw, expected in cases:
        net = _linear(m, n)
        ad = _adapt(net, method, **kw)
        assert rw.trainable_parameters(net) == expected, (method, kw)
        assert type(ad).num_params(net.layer.view, ad.config) == expected, (method, kw)


def test_rank_is_clamped_to_the_layer():
    net = _linear(4, 6)
    ad = _adapt(net, "sorsa", rank=50)
    assert ad.rank == 4 and rw.trainable_parameters(net) == 4 * (4 + 6 + 1)


# ---- LoRA-XS ----------------------------------------------------------------------------------------
def test_lora_xs_update_lies_in_the_top_singular_subspaces():
    net = _linear(14, 10)
    ad = _adapt(net, "lora_xs", rank=3, alpha=6.0)
    _perturb([ad.lora_R], 1)
    w0 = net.layer.base.weight
    delta = net.layer.delta_weight().double()
    u, s, vt = _svd64(w0)
    pu, pv = u[:, :3] @ u[:, :3].T, vt[:3].T @ vt[:3]
    torch.testing.assert_close(pu @ delta @ pv, delta, atol=1e-5, rtol=0)
    assert torch.linalg.matrix_rank(delta, atol=1e-4) == 3
    # ‖ΔW‖_F = s ‖Σ_r R‖_F (orthonormal U_r, V_r), s = α / r = 2
    expected = 2.0 * torch.linalg.matrix_norm(s[:3, None] * ad.lora_R.detach().double())
    torch.testing.assert_close(torch.linalg.matrix_norm(delta), expected, atol=1e-5, rtol=1e-5)


def test_lora_xs_saves_only_r(tmp_path):
    net = _linear(14, 10)
    ad = _adapt(net, "lora_xs", rank=3)
    _perturb([ad.lora_R], 2)
    rw.save(net, tmp_path / "a")
    tensors = read_tensors(tmp_path / "a" / "adapter_model.safetensors", "")
    assert sum(t.numel() for t in tensors.values()) == 9
    fresh = _linear(14, 10)
    rw.load(fresh, tmp_path / "a")
    x = _x(10)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


# ---- SVFT -------------------------------------------------------------------------------------------
def test_svft_zero_m_gives_w0_and_plain_shifts_singular_values():
    net = _linear(12, 9)
    base = copy.deepcopy(net)
    ad = _adapt(net, "svft", pattern="plain", init="zero")
    x = _x(9)
    with torch.no_grad():
        assert torch.equal(net(x), base(x))
        ad.svft_diag.copy_(torch.linspace(0.05, 0.4, 9))
    # plain M: W = U (Σ + diag m) Vᵀ, so the singular values are σ_i + m_i (all positive here)
    s0 = _svd64(base.layer.weight)[1]
    expected = (s0 + torch.linspace(0.05, 0.4, 9, dtype=torch.float64)).sort(descending=True).values
    torch.testing.assert_close(_svd64(_w_adapted(net))[1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern,kw", [("banded", {"off_diag": 1}), ("random", {"num_random": 6})])
def test_svft_sparsity_pattern_in_the_singular_basis(pattern, kw):
    net = _linear(10, 13)
    base_w = net.layer.weight.detach().clone()
    ad = _adapt(net, "svft", pattern=pattern, seed=3, **kw)
    _perturb(ad.parameters(), 4, std=1.0)
    u, _, vt = _svd64(base_w)
    core = u.T @ (_w_adapted(net) - base_w.double()) @ vt.T  # = M up to the signs of the vectors
    support = core.abs() > 1e-4
    if pattern == "banded":
        i, j = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
        expected = (i - j).abs() <= 1
    else:
        expected = torch.eye(10, dtype=torch.bool)
        expected[ad.rows, ad.cols] = True
        assert expected.sum() == 10 + 6 and not (ad.rows == ad.cols).any()
    assert torch.equal(support, expected)


@pytest.mark.parametrize("pattern", ["banded", "random"])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_svft_sparse_forward_and_gradients_match_the_dense_weight_view(pattern, kind):
    """The banded (shifted multiply-adds, own backward) and random (gather/scatter) activation
    paths give the outputs and the gradients (coefficients and input) of
    ``functional(x, W0 + U M Vᵀ)`` with ``M`` built densely."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    if kind == "linear":
        layer, x = nn.Linear(9, 7), torch.randn(3, 4, 9, generator=g)
    elif kind == "conv2d":
        layer, x = nn.Conv2d(3, 5, 3, padding=1), torch.randn(2, 3, 6, 6, generator=g)
    else:
        layer, x = nn.Embedding(12, 6), torch.randint(0, 12, (2, 5), generator=g)
    net = Net(layer)
    ad = _adapt(net, "svft", pattern=pattern, off_diag=2, num_random=9, seed=4)
    _perturb(ad.parameters(), 5)
    wrt = [ad.svft_diag, ad.svft_offdiag] + ([x.requires_grad_(True)] if x.is_floating_point() else [])
    out = net(x)
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), wrt)
    view = net.layer.view
    dense = view.weight2d() + ad.u @ ad.dense_m() @ ad.vt
    ref = view.functional(x, dense)
    ref_grads = torch.autograd.grad((ref * w).sum(), wrt)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_svft_random_positions_follow_the_seed_and_survive_save_load(tmp_path):
    a = _adapt(_linear(10, 13), "svft", pattern="random", seed=1)
    b = _adapt(_linear(10, 13), "svft", pattern="random", seed=2)
    assert not torch.equal(torch.stack([a.rows, a.cols]), torch.stack([b.rows, b.cols]))
    net = _linear(10, 13)
    ad = _adapt(net, "svft", pattern="random", seed=5)
    rw.save(net, tmp_path / "s")
    fresh = _linear(10, 13)
    rw.load(fresh, tmp_path / "s")
    new = fresh.layer.adapters["default"]
    assert torch.equal(new.rows, ad.rows) and torch.equal(new.cols, ad.cols)


# ---- SVFit ------------------------------------------------------------------------------------------
def test_svfit_trains_the_top_singular_values_only():
    net = _linear(11, 15)
    w0 = net.layer.weight.detach().clone()
    ad = _adapt(net, "svfit", rank=3)
    u, s, vt = _svd64(w0)
    new = torch.tensor([9.0, 7.5, 6.0], dtype=torch.float64)
    with torch.no_grad():
        ad.sigma.copy_(new)
    w = _w_adapted(net)
    # dense re-derivation: the top-3 singular values replaced, vectors and the rest unchanged
    expected = w0.double() + u[:, :3] @ torch.diag(new - s[:3]) @ vt[:3]
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_svd64(w)[1][:3], new, atol=1e-5, rtol=1e-5)


def test_svfit_rotate_keeps_singular_values_when_sigma_is_unchanged():
    net = _linear(11, 15)
    w0 = net.layer.weight.detach().clone()
    ad = _adapt(net, "svfit", rank=4, rotate=True)
    _perturb([ad.rot_u, ad.rot_v], 3)
    assert net.layer.delta_weight().abs().max() > 1e-2
    torch.testing.assert_close(_svd64(_w_adapted(net))[1], _svd64(w0)[1], atol=1e-5, rtol=1e-5)


# ---- Spectral adapter -------------------------------------------------------------------------------
def test_spectral_rotational_keeps_the_singular_values():
    net = _linear(13, 9)
    w0 = net.layer.weight.detach().clone()
    ad = _adapt(net, "spectral", rank=4, mode="rotational")
    _perturb(ad.parameters(), 5)
    w = _w_adapted(net)
    assert (w - w0.double()).abs().max() > 1e-2
    torch.testing.assert_close(_svd64(w)[1], _svd64(w0)[1], atol=1e-5, rtol=1e-5)
    # the bottom singular subspaces are untouched: W V_rest = W0 V_rest
    vt = _svd64(w0)[2]
    torch.testing.assert_close(w @ vt[4:].T, w0.double() @ vt[4:].T, atol=1e-5, rtol=0)


def test_spectral_additive_changes_only_the_top_part():
    net = _linear(13, 9)
    w0 = net.layer.weight.detach().clone()
    ad = _adapt(net, "spectral", rank=3, mode="additive")
    _perturb(ad.parameters(), 6)
    u, s, vt = _svd64(w0)
    w_rest = u[:, 3:] @ torch.diag(s[3:]) @ vt[3:]
    top = _w_adapted(net) - w_rest  # = (U_r + A_U) Σ_r (V_r + A_V)ᵀ: rank 3
    assert torch.linalg.matrix_rank(top, atol=1e-4) == 3
    # dense re-derivation from the adapter's trained factors (sign-independent: U_r Σ_r V_rᵀ is unique)
    au, avt = ad.spectral_U.detach().double(), ad.spectral_V.detach().double()
    ur, vtr = ad.u.double(), ad.vt.double()
    expected = (ur + au) @ torch.diag(s[:3]) @ (vtr + avt)
    torch.testing.assert_close(top, expected, atol=1e-5, rtol=1e-5)


# ---- SORSA ------------------------------------------------------------------------------------------
def test_sorsa_is_the_residual_plus_the_trained_principal_part():
    net = _linear(12, 10)
    w0 = net.layer.weight.detach().clone()
    ad = _adapt(net, "sorsa", rank=3)
    assert ad.orthonormal_loss() < 1e-5
    _perturb(ad.parameters(), 7, std=0.1)
    u, s, vt = _svd64(w0)
    w_res = u[:, 3:] @ torch.diag(s[3:]) @ vt[3:]
    up, sp, vtp = (t.detach().double() for t in (ad.sorsa_U, ad.sorsa_S, ad.sorsa_Vt))
    torch.testing.assert_close(_w_adapted(net), w_res + up @ torch.diag(sp) @ vtp, atol=1e-5, rtol=1e-5)
    # the regularizer is the closed form, and > 0 once the factors left orthonormality
    eye = torch.eye(3, dtype=torch.float64)
    expected = torch.linalg.matrix_norm(up.T @ up - eye) + torch.linalg.matrix_norm(vtp @ vtp.T - eye)
    torch.testing.assert_close(ad.orthonormal_loss().double(), expected, atol=1e-6, rtol=1e-5)
    from rankwise.methods.sorsa import regularizer
    torch.testing.assert_close(regularizer(net), ad.orthonormal_loss())


def test_sorsa_loss_term_hook_is_gamma_times_the_mean_regularizer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 12), nn.Linear(12, 9))
    rw.adapt(net, "sorsa", rank=3, gamma=0.25, targets=["0", "1"], seed=0)
    ads = [net[i].adapters["default"] for i in range(2)]
    assert float(rw.rank_regularization(net).detach()) < 1e-5  # orthonormal at init
    _perturb([p for ad in ads for p in (ad.sorsa_U, ad.sorsa_Vt)], 4)
    # closed form, from the parameters: ‖UᵀU − I‖_F + ‖V Vᵀ − I‖_F per layer, mean over layers, × γ
    terms = [torch.linalg.norm(ad.sorsa_U.t() @ ad.sorsa_U - torch.eye(3)) +
             torch.linalg.norm(ad.sorsa_Vt @ ad.sorsa_Vt.t() - torch.eye(3)) for ad in ads]
    torch.testing.assert_close(rw.rank_regularization(net), 0.25 * (terms[0] + terms[1]) / 2)
    off = nn.Sequential(nn.Linear(10, 12))
    rw.adapt(off, "sorsa", rank=3, gamma=0.0, targets=["0"], seed=0)
    assert rw.rank_regularization(off) is None
    with pytest.raises(ConfigError, match="gamma"):
        rw.adapt(nn.Sequential(nn.Linear(10, 12)), "sorsa", rank=3, gamma=-1.0, targets=["0"])


def test_sorsa_regularizer_keeps_the_factors_orthonormal():
    def run(gamma):
        net = _linear(12, 10)
        ad = _adapt(net, "sorsa", rank=4)
        from rankwise.methods.sorsa import regularizer
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 10, generator=g)
        target = torch.randn(64, 12, generator=g)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=2e-2)
        for _ in range(40):
            loss = (net(x) - target).square().mean() + gamma * regularizer(net)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return ad.orthonormal_loss().item()

    free, regularized = run(0.0), run(1.0)
    assert free > 0.05 and regularized < 0.5 * free


# ---- SALT -------------------------------------------------------------------------------------------
def test_salt_scales_and_shifts_top_singular_values_plus_lora():
    net = _linear(12, 10)
    w0 = net.layer.weight.detach().clone()
    ad = _adapt(net, "salt", rank=3, lora_rank=2, lora_alpha=4.0)
    _perturb(ad.parameters(), 8)
    with torch.no_grad():
        ad.salt_shift[0] = -100.0  # ReLU clamps this singular value to 0
    u, s, vt = _svd64(w0)
    a, b = ad.salt_scale.detach().double(), ad.salt_shift.detach().double()
    new = torch.relu(a * s[:3] + b)
    assert new[0] == 0
    lora = ad.lora_B.detach().double() @ ad.lora_A.detach().double() * 2.0  # s = 4 / 2
    expected = u[:, :3] @ torch.diag(new) @ vt[:3] + u[:, 3:] @ torch.diag(s[3:]) @ vt[3:] + lora
    torch.testing.assert_close(_w_adapted(net), expected, atol=1e-5, rtol=1e-5)


# ---- LoLDU ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n", [(9, 14), (14, 9)])
def test_loldu_dense_rederivation_from_an_independent_lu(m, n):
    net = _linear(m, n)
    w0 = net.layer.weight.detach().double()
    ad = _adapt(net, "loldu", rank=4)
    z = torch.linspace(-1.0, 2.0, 4, dtype=torch.float64)
    with torch.no_grad():
        ad.loldu_z.copy_(z)
        ad.loldu_scale.fill_(0.5)
    lu, piv = torch.linalg.lu_factor(w0)
    p, lower, upper = torch.lu_unpack(lu, piv)
    d = torch.diagonal(upper)
    unit = upper / d[:, None]
    torch.testing.assert_close(p @ lower @ torch.diag(d) @ unit, w0)  # W0 = P L D U
    pl = (p @ lower)[:, :4]
    expected = w0 - pl @ torch.diag(d[:4]) @ unit[:4] + 0.5 * pl @ torch.diag(z) @ unit[:4]
    torch.testing.assert_close(_w_adapted(net), expected, atol=1e-5, rtol=1e-5)


def test_loldu_full_rank_z_scales_the_whole_ldu():
    """With full rank, z = c · d and σ = 1 give W = c · W0 (every LDU component scaled)."""
    net = _linear(7, 11)
    w0 = net.layer.weight.detach().double()
    ad = _adapt(net, "loldu")
    with torch.no_grad():
        ad.loldu_z.mul_(1.5)
    torch.testing.assert_close(_w_adapted(net), 1.5 * w0, atol=1e-5, rtol=1e-5)


# ---- SingLoRA ---------------------------------------------------------------------------------------
def test_singlora_square_update_is_symmetric_and_ramps_up():
    net = _linear(10, 10)
    ad = _adapt(net, "singlora", rank=3, alpha=6.0, ramp_up_steps=4)
    assert torch.count_nonzero(net.layer.delta_weight()) == 0  # u(0) = 0
    a = ad.singlora_A.detach().double()
    full = 2.0 * a @ a.T  # α / r = 2
    x = _x(10)
    net.train()
    for t in range(1, 7):
        net(x).sum().backward()
        u = min(t / 4, 1.0)
        delta = net.layer.delta_weight().double()
        torch.testing.assert_close(delta, u * full, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(delta, delta.T, atol=1e-7, rtol=0)
    net.eval()
    with torch.no_grad():
        net(x)
    assert ad.ramp_step.item() == 6  # eval forwards do not advance the ramp


@pytest.mark.parametrize("m,n", [(6, 11), (11, 6)])
def test_singlora_non_square_truncates_the_single_matrix(m, n):
    net = _linear(m, n)
    ad = _adapt(net, "singlora", rank=2, ramp_up_steps=0)
    a = ad.singlora_A.detach().double()
    assert a.shape == (max(m, n), 2)
    delta = net.layer.delta_weight().double()
    torch.testing.assert_close(delta, a[:m] @ a[:n].T, atol=1e-7, rtol=1e-6)
    k = min(m, n)
    torch.testing.assert_close(delta[:k, :k], delta[:k, :k].T, atol=1e-7, rtol=0)


# ---- LoRMA ------------------------------------------------------------------------------------------
def test_lorma_is_a_left_multiplication_of_w0():
    torch.manual_seed(0)
    layer = nn.Linear(8, 10)
    with torch.no_grad():  # a rank-4 W0: the multiplicative update cannot leave its row space
        layer.weight.copy_(torch.randn(10, 4) @ torch.randn(4, 8))
    net = Net(layer)
    w0 = layer.weight.detach().double().clone()
    ad = _adapt(net, "lorma", rank=3, alpha=1.5)
    _perturb(ad.parameters(), 9)
    b, a = ad.lorma_B.detach().double(), ad.lorma_A.detach().double()
    w = _w_adapted(net)
    torch.testing.assert_close(w, (torch.eye(10, dtype=torch.float64) + 0.5 * b @ a) @ w0, atol=1e-5, rtol=1e-5)
    null = _svd64(w0)[2][4:]  # W0's null space stays W's null space
    assert (w @ null.T).abs().max() < 1e-5
    assert torch.linalg.matrix_rank(w, atol=1e-4) == 4


# ---- whole models: HF Conv1D, merge, training ---------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_gpt2_merge_matches_unmerged_logits(method, gpt2, token_batch):
    model = gpt2(seed=0)
    kw = {"rank": 2} if method != "svft" else {"pattern": "banded", "off_diag": 1, "num_vectors": 6}
    rw.adapt(model, method, targets=["c_attn", "c_fc"], seed=0, **kw)
    for m in model.modules():
        for ad in getattr(m, "adapters", {}).values():
            getattr(ad, "finish_warmup", lambda: None)()
    _perturb([p for p in model.parameters() if p.requires_grad], 11, std=0.05)
    with torch.no_grad():
        unmerged = model(**token_batch).logits
        rw.merge(model)
        merged = model(**token_batch).logits
        rw.unmerge(model)
        again = model(**token_batch).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, unmerged, atol=1e-4, rtol=1e-4)


TRAIN_OPTIONS = {
    "lora_xs": {"rank": 4},
    "svft": {"pattern": "banded", "off_diag": 1},
    "svfit": {"rank": 8, "rotate": True},
    "spectral": {"rank": 4},
    "sorsa": {"rank": 4},
    "salt": {"rank": 4, "lora_rank": 2},
    "loldu": {},
    "singlora": {"rank": 4, "ramp_up_steps": 5},
    "lorma": {"rank": 4},
}


@pytest.mark.parametrize("method", METHODS)
def test_short_training_reduces_the_loss(method):
    """Student–teacher regression: the teacher is the same method with perturbed parameters
    (merged into a plain layer), so the target is reachable; a short Adam run must close most of
    the gap from the base layer."""
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    teacher = Net(copy.deepcopy(base))
    ad = _adapt(teacher, method, **TRAIN_OPTIONS[method])
    getattr(ad, "finish_warmup", lambda: None)()
    _perturb([p for p in teacher.parameters() if p.requires_grad], 12, std=0.1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 16, generator=g)
    with torch.no_grad():
        y = teacher(x)
    net = Net(copy.deepcopy(base))
    _adapt(net, method, **TRAIN_OPTIONS[method])
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net.train()
    losses = []
    for _ in range(80):
        loss = (net(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1e-4, "the teacher should differ from the base layer"
    assert losses[-1] < 0.05 * losses[0], losses[::10]


# ---- config validation -------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw,field", [
    ("lora_xs", {"rank": 0}, "rank"),
    ("svft", {"pattern": "diagonal"}, "pattern"),
    ("svft", {"off_diag": -1}, "off_diag"),
    ("svfit", {"rotate": "yes"}, "rotate"),
    ("spectral", {"mode": "rotate"}, "mode"),
    ("sorsa", {"rank": 1.5}, "rank"),
    ("salt", {"lora_rank": 0}, "lora_rank"),
    ("loldu", {"alpha": -1.0}, "alpha"),
    ("singlora", {"ramp_up_steps": -3}, "ramp_up_steps"),
    ("lorma", {"alpha": 0.0}, "alpha"),
])
def test_bad_config_names_the_field(method, kw, field):
    with pytest.raises(ConfigError, match=field):
        rw.get_method(method).Config(**kw)
