"""The structured adapters — fourierft, circular (C3A), kron (LoKr), hra, bone (Bone/MiSS), hira.

Oracles: PEFT 0.21 (same weights → same logits and gradients; ``export_peft`` → PEFT and PEFT →
``import_peft`` → PEFT round trips), and per method an independent dense re-derivation of the
update in float64 from the paper's formula (explicit cosines, explicit circulant blocks, explicit
Kronecker entries, a product of explicit reflections, explicit blocks, explicit Hadamard products).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core.adapted import AdaptedLayer
from rankwise.core.layers import LayerView
from rankwise.errors import ConfigError

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("single_thread")]

ATOL = 1e-5


# ---- helpers ------------------------------------------------------------------------------------
def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _peft_param(pmodel, module: str, suffix: str) -> torch.Tensor:
    return getattr(pmodel.base_model.model.get_submodule(module), suffix)["default"]


def _pairs(model, pmodel):
    """[(our parameter, PEFT's parameter, label)] for every adapted module, matched by PEFT name."""
    out = []
    for mname, layer in _layers(model).items():
        ad = layer.adapters["default"]
        by_id = {id(p): p for p in ad.parameters()}
        for suffix, t in ad.peft_tensors().items():
            ours = t if id(t) in by_id else t._base if t._base is not None and id(t._base) in by_id else None
            assert ours is not None, f"{mname}.{suffix} is not a view of an adapter parameter"
            out.append((ours, _peft_param(pmodel, mname, suffix), f"{mname}.{suffix}"))
    return out


def _randomize(params, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def _peft_adapter_params(pmodel, prefix):
    return [p for n, p in pmodel.named_parameters() if prefix in n]


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


class ConvNet(nn.Module):
    """nn.Conv1d, nn.Conv2d (square 3×3 kernel), nn.Embedding and nn.Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1, stride=2)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        self.emb = nn.Embedding(12, 8, padding_idx=0)
        self.fc = nn.Linear(8, 6)

    def forward(self, x, ids):
        h = self.c1(x)
        h2 = self.c2(h[:, :, None, :].expand(-1, -1, 4, -1))
        return torch.cat([h.flatten(1), h2.flatten(1), self.fc(self.emb(ids)).flatten(1)], dim=1)


def _conv_net(seed=0):
    torch.manual_seed(seed)
    net = ConvNet()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # O(1) outputs, so an absolute tolerance of 1e-5 is strict
    g = torch.Generator().manual_seed(seed)
    return net.eval(), (torch.randn(2, 4, 11, generator=g), torch.randint(0, 12, (2, 5), generator=g))


# (rankwise method, options, PEFT config factory, PEFT parameter prefix, model, targets)
ORACLE = {
    "fourierft-bert": ("fourierft", {"n_frequency": 40, "scaling": 60.0},
                       lambda t: peft.FourierFTConfig(n_frequency=40, scaling=60.0, target_modules=t),
                       "fourierft_", "bert", ["query", "value", "dense"]),
    "fourierft-gpt2": ("fourierft", {"n_frequency": 70, "scaling": 90.0, "random_loc_seed": 5},
                       lambda t: peft.FourierFTConfig(n_frequency=70, scaling=90.0, random_loc_seed=5,
                                                      target_modules=t, fan_in_fan_out=True),
                       "fourierft_", "gpt2", ["c_attn", "c_fc"]),
    "circular-bert": ("circular", {"block_size": 16},
                      lambda t: peft.C3AConfig(block_size=16, target_modules=t), "c3a_", "bert",
                      ["query", "value", "dense"]),
    "circular-fft": ("circular", {"block_size": 8, "path": "fft"},
                     lambda t: peft.C3AConfig(block_size=8, target_modules=t), "c3a_", "bert",
                     ["query", "value", "dense"]),
    "kron-bert": ("kron", {"rank": 4, "alpha": 6.0},
                  lambda t: peft.LoKrConfig(r=4, alpha=6.0, target_modules=t), "lokr_", "bert",
                  ["query", "key", "dense"]),
    "kron-lowrank": ("kron", {"rank": 1, "alpha": 2.0, "decompose_both": True},
                     lambda t: peft.LoKrConfig(r=1, alpha=2.0, decompose_both=True, target_modules=t), "lokr_",
                     "bert", ["query", "dense"]),
    "kron-conv": ("kron", {"rank": 2, "alpha": 3.0},
                  lambda t: peft.LoKrConfig(r=2, alpha=3.0, target_modules=t), "lokr_", "conv", ["c2", "fc"]),
    "kron-conv1d": ("kron", {"rank": 1, "alpha": 3.0},  # low-rank w2 (see test_kron_conv1d_full_w2_refused)
                    lambda t: peft.LoKrConfig(r=1, alpha=3.0, target_modules=t), "lokr_", "conv", ["c1", "c2"]),
    "hra-bert": ("hra", {"rank": 4}, lambda t: peft.HRAConfig(r=4, target_modules=t), "hra_", "bert",
                 ["query", "value", "dense"]),
    "hra-gs": ("hra", {"rank": 3, "apply_gs": True, "init": "random"},
               lambda t: peft.HRAConfig(r=3, apply_GS=True, init_weights=False, target_modules=t), "hra_", "bert",
               ["key", "dense"]),
    "hra-conv": ("hra", {"rank": 2}, lambda t: peft.HRAConfig(r=2, target_modules=t), "hra_", "conv", ["c2", "fc"]),
    "bone-bat": ("bone", {"rank": 8, "mode": "bat"},
                 lambda t: peft.MissConfig(r=8, init_weights="bat", target_modules=t), "miss_", "bert",
                 ["query", "value", "dense"]),
    "bone-share": ("bone", {"rank": 5, "mode": "share"},
                   lambda t: peft.MissConfig(r=5, target_modules=t), "miss_", "bert", ["query", "value", "dense"]),
    "hira-bert": ("hira", {"rank": 3}, lambda t: peft.HiraConfig(r=3, target_modules=t), "hira_", "bert",
                  ["query", "value", "dense", "word_embeddings"]),
    "hira-gpt2": ("hira", {"rank": 2}, lambda t: peft.HiraConfig(r=2, target_modules=t, fan_in_fan_out=True),
                  "hira_", "gpt2", ["c_attn", "c_proj", "wte"]),
    "hira-conv": ("hira", {"rank": 2}, lambda t: peft.HiraConfig(r=2, target_modules=t), "hira_", "conv",
                  ["c1", "c2", "emb", "fc"]),
}


# PEFT 0.21's C3A autograd function returns a wrong input gradient (its backward uses
# fft(fft(g)·ifft(w)) where the adjoint is fft(ifft(g)·conj(fft(w))); finite differences agree with
# rankwise, see test_circular_input_gradient_matches_finite_differences). Its kernel gradient is
# right, so the gradient comparison adapts one module: no other C3A layer lies between it and the loss.
GRAD_TARGETS = {"circular-bert": ["bert.encoder.layer.1.output.dense"],
                "circular-fft": ["bert.encoder.layer.1.output.dense"]}


def _base(which, request):
    if which == "conv":
        return _conv_net()
    return request.getfixturevalue(which)(seed=0), None


def _run(model, which, batch, inputs):
    if which == "conv":
        return model(*inputs)
    return model(**batch).logits


def _loss(out):
    target = torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin()
    return (out * target).sum()


# ---- PEFT oracle: same weights → same outputs and gradients ----------------------------------------
@pytest.mark.parametrize("case", list(ORACLE))
def test_same_weights_same_outputs_and_gradients(case, request, token_batch):
    method, opts, pcfg, prefix, which, targets = ORACLE[case]
    targets = GRAD_TARGETS.get(case, targets)
    base, inputs = _base(which, request)
    pmodel = _quiet(peft.get_peft_model, copy.deepcopy(base), pcfg(targets))
    _randomize(_peft_adapter_params(pmodel, prefix), seed=3)
    model = rw.adapt(copy.deepcopy(base), method, targets=targets, seed=0, **opts)
    pairs = _pairs(model, pmodel)
    assert len(pairs) == len(_peft_adapter_params(pmodel, prefix)), "every PEFT tensor has a rankwise twin"
    with torch.no_grad():
        for ours, theirs, _ in pairs:
            ours.copy_(theirs.reshape(ours.shape))
    model.train()
    pmodel.train()
    out, pout = _run(model, which, token_batch, inputs), _run(pmodel, which, token_batch, inputs)
    with torch.no_grad():
        assert (out - _run(base, which, token_batch, inputs)).abs().max() > 1e-3, "the adapter must change the output"
    assert (out - pout).abs().max() <= ATOL
    _loss(out).backward()
    _loss(pout).backward()
    for ours, theirs, label in pairs:
        assert ours.grad is not None and ours.grad.abs().max() > 0, label
        torch.testing.assert_close(ours.grad, theirs.grad.reshape(ours.shape), atol=ATOL, rtol=1e-4, msg=label)
    assert rw.trainable_parameters(model) == sum(p.numel() for p in _peft_adapter_params(pmodel, prefix))


# ---- gradients of the activation view == gradients of the dense weight view --------------------------
@pytest.mark.parametrize("case", [c for c in ORACLE if not c.startswith("hira-conv")])
def test_gradients_equal_dense_weight_view(case, request, token_batch):
    """Each adapted layer replaced by its base with weight ``W0 + delta_weight()`` (autograd through the
    weight view) gives the same loss and adapter gradients as the activation view's own backward."""
    method, opts, _, _, which, targets = ORACLE[case]
    base, inputs = _base(which, request)
    model = rw.adapt(copy.deepcopy(base), method, targets=targets, seed=0, **opts)
    _randomize([p for p in model.parameters() if p.requires_grad], seed=6)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    loss = _loss(_run(model, which, token_batch, inputs))
    grads = torch.autograd.grad(loss, params)
    weights = {f"{name}.weight": layer.base.weight + layer.adapters["default"].delta_weight()
               for name, layer in _layers(model).items()}
    ref_model = copy.deepcopy(base).train()
    # tie_weights=False: GPT-2's lm_head shares wte's weight; the adapter changes only the embedding lookup
    if which == "conv":
        ref_out = torch.func.functional_call(ref_model, weights, inputs, tie_weights=False)
    else:
        ref_out = torch.func.functional_call(ref_model, weights, (), token_batch, tie_weights=False).logits
    ref_loss = _loss(ref_out)
    ref_grads = torch.autograd.grad(ref_loss, params)
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, r, atol=ATOL, rtol=1e-4)


def test_circular_input_gradient_matches_finite_differences():
    from rankwise.methods.circular import _BlockCirculant

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64, generator=g)
    w = torch.randn(2, 2, 4, dtype=torch.float64, generator=g)
    go = torch.randn(3, 4 * 2, dtype=torch.float64, generator=g)
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(_BlockCirculant.apply(xr, w, 1.0), xr, go)
    eps = 1e-6
    for i in range(x.numel()):
        d = torch.zeros(x.numel(), dtype=torch.float64)
        d[i] = eps
        d = d.view(x.shape)
        num = ((_BlockCirculant.apply(x + d, w, 1.0) - _BlockCirculant.apply(x - d, w, 1.0)) * go).sum() / (2 * eps)
        assert abs(num - gx.view(-1)[i]) < 1e-7


# ---- PEFT format round trips -----------------------------------------------------------------------
@pytest.mark.parametrize("case", list(ORACLE))
def test_export_import_peft_round_trip(case, request, token_batch, tmp_path):
    method, opts, pcfg, prefix, which, targets = ORACLE[case]
    base, inputs = _base(which, request)
    # rankwise → PEFT
    model = rw.adapt(copy.deepcopy(base), method, targets=targets, seed=0, **opts)
    _randomize([p for p in model.parameters() if p.requires_grad], seed=4)
    with torch.no_grad():
        ours = _run(model, which, token_batch, inputs)
    rw.export_peft(model, tmp_path / "out")
    p1 = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path / "out").eval()
    with torch.no_grad():
        assert (_run(p1, which, token_batch, inputs) - ours).abs().max() <= ATOL
    # PEFT → rankwise → PEFT
    pmodel = _quiet(peft.get_peft_model, copy.deepcopy(base), pcfg(targets)).eval()
    _randomize(_peft_adapter_params(pmodel, prefix), seed=5)
    with torch.no_grad():
        theirs = _run(pmodel, which, token_batch, inputs)
    _quiet(pmodel.save_pretrained, tmp_path / "peft")
    imported = rw.import_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    assert rw.core.api.adapter_state(imported)["default"]["config"].method == method
    with torch.no_grad():
        assert (_run(imported, which, token_batch, inputs) - theirs).abs().max() <= ATOL
    rw.export_peft(imported, tmp_path / "again")
    p2 = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path / "again").eval()
    with torch.no_grad():
        assert (_run(p2, which, token_batch, inputs) - theirs).abs().max() <= ATOL


def test_per_module_clamps_round_trip_through_peft_patterns(tmp_path):
    """Where rankwise clamps a setting on a small layer (FourierFT's K ≤ m·n, C3A's block dividing both sides),
    the export writes PEFT's per-module pattern, PEFT builds the same adapter, and it imports back."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 12)
    for method, opts, key in (("fourierft", {"n_frequency": 30, "scaling": 20.0}, "n_frequency_pattern"),
                              ("circular", {"block_size": 8}, "block_size_pattern")):
        model = rw.adapt(copy.deepcopy(base), method, targets=["0", "2", "4"], seed=0, **opts)
        _randomize([p for p in model.parameters() if p.requires_grad], seed=1)
        rw.export_peft(model, tmp_path / method)
        pcfg = rw.io.atomic.read_json(tmp_path / method / "adapter_config.json", "")
        assert pcfg[key], f"{method}: a clamped module needs a pattern entry"
        pmodel = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path / method).eval()
        with torch.no_grad():
            ours = model(x)
            assert (pmodel(x) - ours).abs().max() <= ATOL, method
        back = rw.import_peft(copy.deepcopy(base), tmp_path / method).eval()
        with torch.no_grad():
            assert (back(x) - ours).abs().max() <= ATOL, method


def test_export_refuses_layers_peft_lacks(gpt2, tmp_path):
    for method, opts in (("kron", {"rank": 2}), ("circular", {"block_size": 8}), ("hra", {"rank": 2}),
                         ("bone", {"rank": 4})):
        model = rw.adapt(gpt2(seed=0), method, targets=["c_attn"], **opts)
        with pytest.raises(ConfigError, match="c_attn"):
            rw.export_peft(model, tmp_path / method)


# ---- fourierft ------------------------------------------------------------------------------------
def _linear(m, n, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n, m)).double()


def test_fourierft_is_the_real_inverse_dft_of_the_sparse_spectrum():
    """ΔW[p, q] = α/(mn) Σ_k c_k cos(2π(p j_k/m + q l_k/n)), summed entry by entry in float64, with
    the entries PEFT draws from the same seed (``randperm(m·n)[:K]``, row-major)."""
    m, n, k, alpha = 9, 7, 11, 40.0
    model = rw.adapt(_linear(m, n), "fourierft", n_frequency=k, scaling=alpha, random_loc_seed=3, seed=0)
    ad = model[0].adapters["default"]
    idx = torch.randperm(m * n, generator=torch.Generator().manual_seed(3))[:k]
    p = torch.arange(m, dtype=torch.float64)[:, None]
    q = torch.arange(n, dtype=torch.float64)[None, :]
    ref = torch.zeros(m, n, dtype=torch.float64)
    for c, i in zip(ad.spectrum.detach(), idx.tolist()):
        ref += c * torch.cos(2 * math.pi * (p * (i // n) / m + q * (i % n) / n))
    ref *= alpha / (m * n)
    torch.testing.assert_close(ad.delta_weight(), ref, atol=1e-12, rtol=1e-10)
    assert rw.trainable_parameters(model) == k


def test_fourierft_embedding_path_never_forms_the_vocabulary_matrix():
    """Embedding outputs from the K phases per token equal the dense weight view (float64) for odd and
    even vocabulary and width (DC and Nyquist bins)."""
    for vocab, dim in ((31, 8), (30, 7), (16, 6)):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Embedding(vocab, dim)).double()
        model = rw.adapt(copy.deepcopy(net), "fourierft", n_frequency=25, scaling=30.0, targets=["0"], seed=1)
        ids = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            dense = nn.functional.embedding(ids, net[0].weight + model[0].delta_weight())
            torch.testing.assert_close(model(ids), dense, atol=1e-12, rtol=1e-10)


def test_fourierft_entries_shared_across_layers_and_rebuilt_on_load(bert, tmp_path, token_batch):
    base = bert(seed=0)
    model = rw.adapt(copy.deepcopy(base), "fourierft", n_frequency=30, targets=["query", "key"], seed=0)
    layers = list(_layers(model).values())
    first = layers[0].adapters["default"].indices
    assert all(torch.equal(la.adapters["default"].indices, first) for la in layers), "the paper shares entries"
    assert "indices" not in layers[0].adapters["default"].state_dict(), "entries come from the seed, not the file"
    rw.save(model, tmp_path / "a")
    fresh = rw.load(copy.deepcopy(base), tmp_path / "a")
    assert torch.equal(_layers(fresh)["bert.encoder.layer.0.attention.self.query"].adapters["default"].indices, first)
    with torch.no_grad():
        assert torch.equal(fresh(**token_batch).logits, model(**token_batch).logits)


def test_fourierft_clamps_k_to_small_layers():
    model = rw.adapt(_linear(3, 4), "fourierft", n_frequency=1000, seed=0)
    assert model[0].adapters["default"].n_frequency == 12 == rw.trainable_parameters(model)
    with pytest.raises(ConfigError, match="n_frequency"):
        rw.get_method("fourierft").Config(n_frequency=0)


# ---- circular (C3A) --------------------------------------------------------------------------------
def test_circular_blocks_are_circulant_and_match_the_kernels():
    m, n = 12, 18
    model = rw.adapt(_linear(m, n), "circular", block_size=6, seed=0)
    ad = model[0].adapters["default"]
    assert ad.block == 6 and rw.trainable_parameters(model) == m * n // 6
    w, dw = ad.c3a_kernel.detach(), ad.delta_weight()
    for i in range(m // 6):
        for j in range(n // 6):
            for t in range(6):
                for s in range(6):
                    assert dw[i * 6 + t, j * 6 + s] == w[i, j, (s - t) % 6] / n


def test_circular_fft_path_gradcheck():
    from rankwise.methods.circular import _BlockCirculant

    g = torch.Generator().manual_seed(0)
    for b in (4, 5):  # even and odd block (Nyquist bin or not)
        x = torch.randn(3, 2 * b, dtype=torch.float64, generator=g, requires_grad=True)
        w = torch.randn(3, 2, b, dtype=torch.float64, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x_, w_: _BlockCirculant.apply(x_, w_, 0.5), (x, w))


def test_circular_paths_agree():
    """The FFT path and the dense path give the same outputs and gradients (float64), and 'auto' picks
    the FFT path only for wide layers."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 8)).double()
    x = torch.randn(5, 3, 12, dtype=torch.float64)
    outs, grads = [], []
    for path in ("fft", "dense"):
        model = rw.adapt(copy.deepcopy(net), "circular", block_size=4, path=path, seed=0)
        ad = model[0].adapters["default"]
        assert ad.use_fft == (path == "fft") and ad.computes_base == (path == "dense")
        out = model(x)
        (g,) = torch.autograd.grad(out.square().sum(), ad.c3a_kernel)
        outs.append(out)
        grads.append(g)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=1e-10)
    auto = rw.get_method("circular")
    assert auto(LayerView(nn.Linear(4096, 4096)), auto.Config(block_size=128)).use_fft
    assert not auto(LayerView(nn.Linear(384, 1536)), auto.Config(block_size=128)).use_fft


def test_circular_block_clamp():
    """b = the largest divisor of gcd(m, n) not above block_size (PEFT would refuse 256 on 384 × 1536)."""
    from rankwise.methods.circular import block_of

    cfg = rw.get_method("circular").Config(block_size=256)
    for (m, n), b in {(384, 1536): 192, (384, 384): 192, (7, 5): 1, (64, 48): 16}.items():
        assert block_of(LayerView(nn.Linear(n, m)), cfg) == b


# ---- kron (LoKr) ------------------------------------------------------------------------------------
def test_kron_factorization_matches_lycoris_rule():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    from rankwise.methods.kron import factorization

    for dim in list(range(1, 130)) + [384, 768, 1536, 4096, 11008]:
        for f in (-1, 2, 4, 8, 16):
            assert factorization(dim, f) == peft_factorization(dim, f), (dim, f)


def test_kron_entries_and_param_count():
    """ΔW[o1·b + o2, (i1·d + i2)·k + t] = s · w1[o1, i1] · w2[o2, i2·k + t], entry by entry."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(6, 8, (2, 3))).double()
    model = rw.adapt(conv, "kron", rank=2, alpha=5.0, targets=["0"], seed=0)
    ad = model[0].adapters["default"]
    _randomize(ad.parameters(), seed=1)
    a, b, c, d, k = ad.shape
    assert (a * b, c * d, k) == (8, 6, 6)
    w1, w2 = (t.detach() for t in ad.factors())
    dw = ad.delta_weight().reshape(8, -1)
    for o in range(8):
        for i in range(6 * k):
            ch, t = divmod(i, k)
            expect = 2.5 * w1[o // b, ch // d] * w2[o % b, (ch % d) * k + t]
            assert abs(dw[o, i] - expect) < 1e-12
    lin = LayerView(nn.Linear(384, 1536))
    cfg = rw.get_method("kron").Config(rank=8)
    # 1536 = 32·48, 384 = 16·24: w1 32×16 full, w2 48×24 low-rank (8 < 24): 512 + 8·(48 + 24)
    assert rw.get_method("kron").num_params(lin, cfg) == 32 * 16 + 8 * (48 + 24)


def test_kron_conv1d_full_w2_refused(tmp_path):
    """PEFT 0.21 builds a Conv1d's full w2 as kron(2-D, 3-D) — not w1 ⊗ w2 — so neither direction converts."""
    base, _ = _conv_net()
    model = rw.adapt(copy.deepcopy(base), "kron", rank=2, targets=["c1"], seed=0)
    assert hasattr(model.c1.adapters["default"], "lokr_w2")
    with pytest.raises(ConfigError, match="c1"):
        rw.export_peft(model, tmp_path / "out")
    pmodel = _quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoKrConfig(r=2, target_modules=["c1"]))
    _quiet(pmodel.save_pretrained, tmp_path / "peft")
    fresh = copy.deepcopy(base)
    with pytest.raises(ConfigError, match="c1"):
        rw.import_peft(fresh, tmp_path / "peft")
    assert not isinstance(fresh.c1, AdaptedLayer), "a failed import leaves the model unchanged"


def test_kron_linear_function_gradcheck():
    from rankwise.methods.kron import _KronLinear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)  # c·d = 2·3
    base = torch.randn(4, 10, dtype=torch.float64, generator=g, requires_grad=True)  # a·b = 2·5
    w1 = torch.randn(2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w2 = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _KronLinear.apply(*t, 0.7), (x, base, w1, w2))


# ---- hra --------------------------------------------------------------------------------------------
def _reflections(u: torch.Tensor) -> torch.Tensor:
    h = torch.eye(u.shape[0], dtype=u.dtype)
    for i in range(u.shape[1]):
        v = u[:, i:i + 1]
        h = h @ (torch.eye(u.shape[0], dtype=u.dtype) - 2 * v @ v.t() / (v.t() @ v))
    return h


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_hra_is_w0_times_the_product_of_reflections_and_keeps_neuron_norms(kind):
    torch.manual_seed(0)
    layer = nn.Linear(9, 5) if kind == "linear" else nn.Conv2d(2, 4, 2)
    net = nn.Sequential(layer).double()
    model = rw.adapt(copy.deepcopy(net), "hra", rank=4, targets=["0"], seed=0)
    ad = model[0].adapters["default"]
    _randomize(ad.parameters(), seed=2, std=1.0)
    w0 = net[0].weight.reshape(net[0].weight.shape[0], -1)
    w = w0 + ad.delta_weight().reshape(w0.shape)
    torch.testing.assert_close(w, w0 @ _reflections(ad.hra_u.detach()), atol=1e-12, rtol=1e-10)
    # H orthogonal: each output neuron's weight vector keeps its norm, and all angles between them
    torch.testing.assert_close(w.norm(dim=1), w0.norm(dim=1), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(w @ w.t(), w0 @ w0.t(), atol=1e-12, rtol=1e-10)
    assert (w - w0).abs().max() > 0.1


def test_hra_gram_schmidt_variant():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 5)).double()
    model = rw.adapt(copy.deepcopy(net), "hra", rank=3, apply_gs=True, init="random", targets=["0"], seed=0)
    ad = model[0].adapters["default"]
    u = ad.hra_u.detach()
    q = []
    for i in range(3):  # classical Gram–Schmidt
        v = u[:, i] - sum((qq @ u[:, i]) * qq for qq in q)
        q.append(v / v.norm())
    q = torch.stack(q, 1)
    ref = net[0].weight @ (torch.eye(8, dtype=torch.float64) - 2 * q @ q.t()) - net[0].weight
    torch.testing.assert_close(ad.delta_weight(), ref, atol=1e-12, rtol=1e-10)


def test_hra_symmetric_init_is_identity_up_to_rounding_and_regularizer():
    from rankwise.methods.hra import orthogonality_loss

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 8))
    model = rw.adapt(copy.deepcopy(net), "hra", rank=4, reg=0.5, targets=["0", "1"], seed=0)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), atol=1e-6, rtol=1e-6)
    ad = model[0].adapters["default"]
    u = ad.hra_u.detach()
    assert torch.equal(u[:, 0], u[:, 1]) and not torch.equal(u[:, 0], u[:, 2])
    un = u / u.norm(dim=0)
    expected = 0.5 * ((un.t() @ un - torch.eye(4)) ** 2).sum()
    torch.testing.assert_close(ad.regularization(), expected)
    total = orthogonality_loss(model)
    torch.testing.assert_close(total, expected + model[1].adapters["default"].regularization())
    total.backward()
    assert ad.hra_u.grad is not None and ad.hra_u.grad.abs().max() > 0
    with torch.no_grad():  # orthonormal columns: no penalty
        ad.hra_u.copy_(torch.linalg.qr(torch.randn(16, 4)).Q)
    assert ad.regularization().abs() < 1e-5
    # rw.rank_regularization (what rankwise.train adds to the loss) is the same sum; None when reg = 0
    torch.testing.assert_close(rw.rank_regularization(model), orthogonality_loss(model))
    plain = rw.adapt(copy.deepcopy(net), "hra", rank=4, targets=["0", "1"], seed=0)
    assert rw.rank_regularization(plain) is None


def test_hra_config_errors():
    cfg = rw.get_method("hra").Config
    with pytest.raises(ConfigError, match="even"):
        cfg(rank=3)
    with pytest.raises(ConfigError, match="reflections"):
        rw.adapt(_linear(6, 4), "hra", rank=6, seed=0)


# ---- bone -------------------------------------------------------------------------------------------
def test_bone_bat_blocks_closed_form():
    """ΔW_ij = W0_ij · B_i + B_i for every r×r block (explicit loops, float64)."""
    m, n, r = 8, 12, 4
    net = _linear(m, n)
    model = rw.adapt(copy.deepcopy(net), "bone", rank=r, mode="bat", seed=0)
    ad = model[0].adapters["default"]
    assert torch.count_nonzero(ad.delta_weight()) == 0
    _randomize(ad.parameters(), seed=1)
    w0, blocks = net[0].weight, ad.miss_block.detach()
    dw = ad.delta_weight()
    for i in range(m // r):
        for j in range(n // r):
            w_ij = w0[i * r:(i + 1) * r, j * r:(j + 1) * r]
            torch.testing.assert_close(dw[i * r:(i + 1) * r, j * r:(j + 1) * r], w_ij @ blocks[i] + blocks[i])
    assert rw.trainable_parameters(model) == m * r


def test_bone_share_closed_form_and_clamps():
    m, n, r = 6, 11, 4  # 11 = 2·4 + 3: the last block is cut
    model = rw.adapt(_linear(m, n), "bone", rank=r, mode="share", seed=0)
    ad = model[0].adapters["default"]
    _randomize(ad.parameters(), seed=1)
    b = ad.miss_block.detach()
    dw = ad.delta_weight()
    for p in range(m):
        for q in range(n):
            assert dw[p, q] == b[q % r, p]
    assert rw.trainable_parameters(model) == m * r
    assert rw.adapt(_linear(6, 9), "bone", rank=4, mode="bat", seed=0)[0].adapters["default"].rank == 3
    with pytest.raises(ConfigError, match="dropout"):
        rw.get_method("bone").Config(mode="bat", dropout=0.1)


# ---- hira -------------------------------------------------------------------------------------------
def test_hira_is_a_hadamard_high_rank_update():
    m, n, r = 10, 12, 1
    net = _linear(m, n)
    model = rw.adapt(copy.deepcopy(net), "hira", rank=r, seed=0)
    ad = model[0].adapters["default"]
    _randomize(ad.parameters(), seed=1, std=1.0)
    dw = ad.delta_weight()
    ref = torch.empty(m, n, dtype=torch.float64)
    for p in range(m):
        for q in range(n):
            ref[p, q] = net[0].weight[p, q] * (ad.hira_B[p, 0] * ad.hira_A[0, q])
    torch.testing.assert_close(dw, ref, atol=1e-12, rtol=1e-10)
    assert torch.linalg.matrix_rank(dw) == min(m, n) > r, "rank-1 B A still gives a full-rank update"


def test_computes_base_stacks_with_other_adapters_and_merges():
    """A computes_base adapter (hira) first, LoRA second, and the reverse order, and with hira merged:
    the layer equals the dense weight view W0 + ΔW_hira + ΔW_lora (float64)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(7, 5)).double()
    x = torch.randn(4, 7, dtype=torch.float64)
    for order in (("h", "l"), ("l", "h")):
        model = copy.deepcopy(net)
        for name in order:
            rw.adapt(model, "hira" if name == "h" else "lora", rank=2, targets=["0"], name=name, seed=1)
        _randomize([p for p in model.parameters() if p.requires_grad], seed=2)
        rw.set_active(model, list(order))
        layer = model[0]
        assert layer.active == list(order)
        with torch.no_grad():
            ref = nn.functional.linear(x, net[0].weight + layer.delta_weight(), net[0].bias)
            torch.testing.assert_close(model(x), ref, atol=1e-12, rtol=1e-10)
            layer.merge(["h"])  # merged, hira no longer runs: the other adapter sees the merged weight
            torch.testing.assert_close(model(x), ref, atol=1e-12, rtol=1e-10)
            layer.unmerge()
            torch.testing.assert_close(layer.base.weight, net[0].weight, atol=1e-12, rtol=0)
        out = model(x)
        out.sum().backward()
        assert all(p.grad is not None for p in layer.adapters.parameters())


def test_hira_dropout_path_matches_reference():
    """Training with dropout: op(x, W0) + op(drop(x), W0 ⊙ BA), the same mask re-drawn from the seed."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4)).double()
    model = rw.adapt(copy.deepcopy(net), "hira", rank=2, dropout=0.5, seed=0).train()
    ad = model[0].adapters["default"]
    _randomize(ad.parameters(), seed=1)
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)
    xd = nn.functional.dropout(x, 0.5, training=True)
    ref = net(x) + xd @ ad.delta_weight().t()
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    assert not torch.allclose(out, model.eval()(x))


@pytest.mark.parametrize("method", ["fourierft", "circular", "kron", "hra", "bone", "hira"])
def test_config_round_trips_and_rejects_bad_values(method):
    cls = rw.get_method(method)
    cfg = cls.Config(targets=["q"])
    assert cls.Config.from_dict(cfg.to_dict()) == cfg
    bad = {"fourierft": {"scaling": float("nan")}, "circular": {"block_size": 0}, "kron": {"decompose_factor": 0},
           "hra": {"init": "eye"}, "bone": {"mode": "mini"}, "hira": {"dropout": 1.0}}[method]
    with pytest.raises(ConfigError, match=next(iter(bad))):
        cls.Config(**bad)
