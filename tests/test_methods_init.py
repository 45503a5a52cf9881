"""Weight- and data-driven inits (pissa, milora, olora, nlora, corda, eva): each method's defining
property against a dense re-derivation (torch.linalg), and PEFT 0.21 as an oracle for the methods
it has — same base weights give the same init (compared as products / residual weights, since
SVD and QR signs are arbitrary), the same outputs before and after training steps, and adapters
that round-trip through PEFT's file format."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core.adapted import AdaptedLayer
from rankwise.core.calibrate import Batches
from rankwise.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _global_seed():
    """PEFT draws from the global RNG (kaiming init before a data-driven init, ``pissa_niter``'s sketch)."""
    torch.manual_seed(0)

TARGETS = ["q_proj", "o_proj", "up_proj", "down_proj"]  # four different layer inputs in LLaMA


def _ids(seed=0, shape=(2, 7)):
    return torch.randint(1, 100, shape, generator=torch.Generator().manual_seed(seed))


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _peft_layer(pm, name):
    return pm.base_model.model.get_submodule(name)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _sgd(model, ids, steps=3, lr=0.05):
    """A few plain SGD steps on a fixed batch (linear in the gradients, so implementations that
    agree to float precision stay that close; Adam would amplify noise-level differences)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids).logits.square().mean().backward()
        opt.step()


def _residual(layer: AdaptedLayer):
    """``W0 − s·B₀A₀`` (canonical ``out × in``): the base weight PEFT holds for a residual-init adapter."""
    ad = layer.adapters["default"]
    a0, b0 = ad.frozen()
    return layer.view.weight2d() - ad.scale * (b0 @ a0)


def _perturb_b(model, seed=3, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _layers(model).values():
            b = layer.adapters["default"].lora_B
            b.add_(torch.randn(b.shape, generator=g) * std)


# ---- PiSSA / MiLoRA / OLoRA: defining properties ----------------------------------------------------
@pytest.mark.parametrize("method,smallest", [("pissa", False), ("milora", True)])
def test_svd_inits_split_w0_exactly(method, smallest):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(9, 7), nn.Conv2d(3, 5, 3), nn.Embedding(11, 6))
    base = copy.deepcopy(net)
    rw.adapt(net, method, rank=2, alpha=6.0, targets=["0", "1", "2"])
    for name, layer in _layers(net).items():
        ad = layer.adapters["default"]
        w = layer.view.weight2d().detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        sl = slice(-2, None) if smallest else slice(0, 2)
        part = (u[:, sl] * s[sl]) @ vh[sl]
        # the adapter holds exactly the chosen SVD part of W0 ...
        a0, b0 = ad.frozen()
        torch.testing.assert_close((ad.scale * b0 @ a0).double(), part, atol=1e-5, rtol=1e-5)
        # ... the rest stays frozen: for PiSSA the best rank-r approximation (residual norm σ_{r+1}),
        # for MiLoRA the principal part (its top singular values are W0's)
        rest = torch.linalg.svdvals(w - part)
        torch.testing.assert_close(rest[: len(s) - 2], s[2:] if not smallest else s[:-2], atol=1e-5, rtol=1e-5)
        # training starts at that point, and the adapted layer is the base layer exactly
        assert torch.equal(ad.lora_A, a0) and torch.equal(ad.lora_B, b0)
        assert torch.count_nonzero(layer.delta_weight()) == 0
        assert torch.equal(layer.base.weight, base.get_submodule(name).weight)  # W0 itself is never modified


def test_pissa_randomized_svd_error_bound():
    torch.manual_seed(1)
    lin = nn.Linear(40, 50)
    net = nn.Sequential(lin)
    rw.adapt(net, "pissa", rank=3, niter=2, oversample=4, targets=["0"], seed=5)
    ad = net[0].adapters["default"]
    w = lin.weight.detach().double()
    sig = torch.linalg.svdvals(w)
    a0, b0 = ad.frozen()
    err = torch.linalg.matrix_norm(w - ad.scale * (b0 @ a0).double(), ord=2).item()
    factor = (1 + 11 * (3 + 4) ** 0.5 * 40**0.5) ** (1 / 5)
    assert sig[3] * (1 - 1e-6) <= err <= sig[3] + factor * sig[3]
    assert err <= 1.2 * sig[3]  # two power iterations: close to the optimum in practice


def test_olora_is_the_qr_part():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 9))
    w = net[0].weight.detach().clone().double()
    rw.adapt(net, "olora", rank=3, alpha=6.0, targets=["0"])
    ad = net[0].adapters["default"]
    a0, b0 = ad.frozen()
    q, r = torch.linalg.qr(w)
    torch.testing.assert_close((b0 @ a0).double(), q[:, :3] @ r[:3], atol=1e-6, rtol=1e-6)  # sign-free product
    torch.testing.assert_close((b0.T @ b0).double(), torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(_residual(net[0]).double(), w - 2.0 * q[:, :3] @ r[:3], atol=1e-6, rtol=1e-6)


def test_residual_methods_give_the_original_model_back(llama):
    base = llama()
    model = copy.deepcopy(base)
    rw.adapt(model, "pissa", rank=2, targets=TARGETS)
    ids = _ids()
    _sgd(model, ids)
    assert not torch.allclose(_logits(model, ids), _logits(base, ids))
    rw.set_active(model, None)
    assert torch.equal(_logits(model, ids), _logits(base, ids))
    rw.set_active(model, "default")
    trained = _logits(model, ids)
    rw.merge(model)
    torch.testing.assert_close(_logits(model, ids), trained, atol=1e-5, rtol=1e-5)
    rw.unmerge(model)
    rw.unadapt(model)
    for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


# ---- PiSSA / OLoRA: PEFT oracle --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_weight_inits_match_peft(method, llama, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = llama()
    ids = _ids()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS,
                                                        init_lora_weights=method))
    mine = copy.deepcopy(base)
    rw.adapt(mine, method, rank=2, alpha=4, targets=TARGETS)
    layers = _layers(mine)
    assert len(layers) == 4
    for name, layer in layers.items():
        pl = _peft_layer(pm, name)
        ad = layer.adapters["default"]
        # PEFT overwrites the base weight with the residual; rankwise keeps W0 and holds B₀A₀
        torch.testing.assert_close(_residual(layer), pl.base_layer.weight, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ad.lora_B @ ad.lora_A, pl.lora_B["default"].weight @ pl.lora_A["default"].weight,
                                   atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_logits(mine, ids), _logits(pm, ids), atol=1e-5, rtol=1e-5)
    _sgd(mine, ids)
    _sgd(pm, ids)
    torch.testing.assert_close(_logits(mine, ids), _logits(pm, ids), atol=1e-5, rtol=1e-5)

    # rankwise → PEFT: the rank-2r LoRA on the original base weights
    rw.export_peft(mine, tmp_path / "to_peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "to_peft")
    torch.testing.assert_close(_logits(loaded, ids), _logits(mine, ids), atol=1e-5, rtol=1e-5)
    # PEFT's own (unconverted) adapter → rankwise: the frozen part is rebuilt from W0, as PEFT does
    pm.save_pretrained(tmp_path / "from_peft")
    back = rw.import_peft(copy.deepcopy(base), tmp_path / "from_peft")
    assert rw.summary(back)[0]["method"] == method
    torch.testing.assert_close(_logits(back, ids), _logits(pm, ids), atol=1e-5, rtol=1e-5)


def test_pissa_niter_matches_peft_on_a_gapped_spectrum(llama):
    """PEFT's ``pissa_niter_K`` and rankwise's ``niter=K`` draw different random sketches; on a weight
    whose top-r part is well separated both recover it to the randomized SVD's stated accuracy."""
    from peft import LoraConfig, get_peft_model

    base = llama()
    lin = base.model.layers[0].self_attn.q_proj
    g = torch.Generator().manual_seed(4)
    u = torch.linalg.qr(torch.randn(32, 32, generator=g))[0]
    v = torch.linalg.qr(torch.randn(32, 32, generator=g))[0]
    s = torch.cat([torch.tensor([3.0, 2.0]), torch.full((30,), 1e-3)])
    with torch.no_grad():
        lin.weight.copy_((u * s) @ v.T)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"],
                                                        init_lora_weights="pissa_niter_2"))
    mine = copy.deepcopy(base)
    rw.adapt(mine, "pissa", rank=2, alpha=2, niter=2, targets=["q_proj"], seed=0)
    name = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(_residual(_layers(mine)[name]), _peft_layer(pm, name).base_layer.weight,
                               atol=1e-5, rtol=0)


def test_peft_import_refuses_what_cannot_be_rebuilt(llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = llama()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"],
                                                        init_lora_weights="pissa_niter_2"))
    pm.save_pretrained(tmp_path / "niter")
    with pytest.raises(ConfigError, match="randomized SVD.*Convert it to LoRA"):
        rw.import_peft(copy.deepcopy(base), tmp_path / "niter")


# ---- MiLoRA / NLoRA: PEFT has them not; their rank-2r LoRA export loads in PEFT ----------------------
@pytest.mark.parametrize("method,kw", [("milora", {}), ("nlora", {}), ("nlora", {"landmarks": "gaussian"})])
def test_exports_load_in_peft(method, kw, llama, tmp_path):
    from peft import PeftModel

    base = llama()
    ids = _ids()
    model = copy.deepcopy(base)
    rw.adapt(model, method, rank=2, alpha=4, targets=TARGETS, seed=0, **kw)
    assert torch.equal(_logits(model, ids), _logits(base, ids))
    _sgd(model, ids)
    rw.export_peft(model, tmp_path / "p")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    back = rw.import_peft(copy.deepcopy(base), tmp_path / "p")  # a plain LoRA of rank 2r, same outputs
    assert rw.summary(back)[0]["method"] == "lora" and rw.summary(back)[0]["rank"] == 4
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


def test_nlora_is_the_nystrom_approximation():
    g = torch.Generator().manual_seed(5)
    full = nn.Linear(8, 10)
    low = nn.Linear(8, 10)
    with torch.no_grad():
        low.weight.copy_(torch.randn(10, 3, generator=g) @ torch.randn(3, 8, generator=g))  # rank 3
    for core in ("pinv", "submatrix"):
        for lin in (full, low):
            net = nn.Sequential(copy.deepcopy(lin))
            rw.adapt(net, "nlora", rank=3, alpha=6.0, core=core, targets=["0"])
            ad = net[0].adapters["default"]
            w = lin.weight.detach().double()
            a0, bn0 = ad.frozen()
            mid = torch.linalg.pinv(w[:3, :3]) if core == "pinv" else w[:3, :3]
            torch.testing.assert_close((ad.scale * bn0 @ a0).double(), w[:, :3] @ mid @ w[:3, :], atol=1e-5, rtol=1e-4)
            if core == "pinv" and lin is low:  # Nyström is exact for a rank-r weight: nothing is left frozen
                torch.testing.assert_close(_residual(net[0]).double(), torch.zeros_like(w), atol=1e-5, rtol=0)
    # gaussian sketches: exact for the rank-3 weight too, and seeded
    nets = [nn.Sequential(copy.deepcopy(low)) for _ in range(3)]
    for net, seed in zip(nets, (0, 0, 1)):
        rw.adapt(net, "nlora", rank=3, landmarks="gaussian", targets=["0"], seed=seed)
    torch.testing.assert_close(_residual(nets[0][0]), torch.zeros(10, 8), atol=1e-5, rtol=0)
    sds = [n[0].adapters["default"].state_dict() for n in nets]
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])
    assert not torch.equal(sds[0]["init_A"], sds[2]["init_A"])


def test_nlora_inttune_trains_the_core_only():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(8, 10), nn.Linear(10, 4))
    rw.adapt(net, "nlora", rank=2, inttune=True, targets=["0", "1"])
    assert rw.trainable_parameters(net) == 2 * 2 * 2
    net(torch.randn(3, 8)).square().sum().backward()
    for layer in _layers(net).values():
        ad = layer.adapters["default"]
        assert ad.lora_N.grad is not None and ad.lora_A.grad is None and ad.lora_B.grad is None


# ---- CorDA ------------------------------------------------------------------------------------------------
def _corda_cov(model, names, batches):
    """CorDA's covariance, densely: per forward call, the input rows divided by |their max|, Gram
    summed, averaged over calls (the reference code's and PEFT's definition)."""
    grams = {n: [] for n in names}

    def hook(m, a, o, n):
        x = a[0].detach().reshape(-1, a[0].shape[-1]).double()
        x = x / x.max().abs()
        grams[n].append(x.T @ x)

    hs = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hs:
        h.remove()
    return {n: torch.stack(g).mean(0) for n, g in grams.items()}


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_defining_property(mode, llama):
    base = llama()
    batches = [{"input_ids": _ids(i, (2, 9))} for i in range(2)]
    model = copy.deepcopy(base)
    rw.adapt(model, "corda", rank=2, alpha=4, mode=mode, targets=TARGETS, calibration=Batches(batches, progress=False))
    names = list(_layers(model))
    covs = _corda_cov(base, names, batches)
    for name in names:
        layer = _layers(model)[name]
        ad = layer.adapters["default"]
        c = covs[name]
        fixed, inv, _ = rw.linalg.damped_inverse(c)
        w = layer.base.weight.detach().double()
        u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
        torch.testing.assert_close((u * s) @ vh @ inv, w, atol=1e-6, rtol=1e-6)  # W = U S (C'⁻¹V)ᵀ exactly
        sl = slice(0, 2) if mode == "ipm" else slice(len(s) - 2, len(s))
        a0, b0 = ad.frozen()
        root = (s[sl] / ad.scale).sqrt()
        b_ref, a_ref = u[:, sl] * root, root[:, None] * vh[sl] @ inv
        sign = torch.sign((b0.double() * b_ref).sum(0))  # SVD signs are arbitrary: align them
        torch.testing.assert_close(b0.double(), b_ref * sign, atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(a0.double(), a_ref * sign[:, None], atol=2e-4, rtol=1e-3)
    assert torch.equal(_logits(model, _ids()), _logits(base, _ids()))


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_matches_peft(mode, llama, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    base = llama()
    calib_ids = _ids(1, (1, 24))  # PEFT's CorDA hook assumes batch size 1
    pmodel = copy.deepcopy(base)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights="corda",
                     corda_config=CordaConfig(corda_method=mode))
    preprocess_corda(pmodel, cfg, run_model=lambda: pmodel(input_ids=calib_ids))
    pm = get_peft_model(pmodel, cfg)
    mine = copy.deepcopy(base)
    rw.adapt(mine, "corda", rank=2, alpha=4, mode=mode, targets=TARGETS,
             calibration=Batches([{"input_ids": calib_ids}], progress=False))
    for name, layer in _layers(mine).items():
        pl = _peft_layer(pm, name)
        ad = layer.adapters["default"]
        torch.testing.assert_close(_residual(layer), pl.base_layer.weight, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ad.lora_B @ ad.lora_A, pl.lora_B["default"].weight @ pl.lora_A["default"].weight,
                                   atol=1e-4, rtol=1e-4)
    ids = _ids()
    _sgd(mine, ids)
    _sgd(pm, ids)
    torch.testing.assert_close(_logits(mine, ids), _logits(pm, ids), atol=2e-4, rtol=1e-4)
    rw.export_peft(mine, tmp_path / "to_peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "to_peft")
    torch.testing.assert_close(_logits(loaded, ids), _logits(mine, ids), atol=1e-5, rtol=1e-5)
    pm.save_pretrained(tmp_path / "from_peft")
    with pytest.raises(ConfigError, match="CorDA.*Convert it to LoRA"):
        rw.import_peft(copy.deepcopy(base), tmp_path / "from_peft")


# ---- EVA ----------------------------------------------------------------------------------------------------
def _eva_batches(n=2):
    out = []
    for i in range(n):
        ids = _ids(10 + i, (2, 16))
        mask = torch.ones_like(ids)
        mask[1, -5:] = 0  # padding: EVA leaves these rows out
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_eva_defining_property(llama):
    base = llama()
    batches = _eva_batches()
    model = copy.deepcopy(base)
    rw.adapt(model, "eva", rank=2, alpha=4, rho=2.0, oversample=64, targets=TARGETS,
             calibration=Batches(batches, progress=False))
    # dense oracle: the masked input rows of every target, their PCA, and the budget split
    rows = {n: [] for n in _layers(model)}
    names = [n for n, _ in base.named_modules() if n.split(".")[-1] in TARGETS]
    hs = [base.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: rows.setdefault(n, []).append(a[0]))
          for n in names]
    with torch.no_grad():
        for b in batches:
            base(**b)
    for h in hs:
        h.remove()
    ratios, pcs = [], {}
    for i, n in enumerate(names):
        x = torch.cat([r[b["attention_mask"].bool()] for r, b in zip(rows[n], batches)]).double()
        xc = x - x.mean(0)
        ev, evec = torch.linalg.eigh(xc.T @ xc)
        ev, evec = ev.flip(0), evec.flip(1)
        pcs[n] = evec.T
        ratios += [(-(v / ev.sum()).item(), i, n) for v in ev[:4]]  # up to round(rho·r) = 4 per layer
    expected = dict.fromkeys(names, 0)
    for _, _, n in sorted(ratios)[: 2 * len(names)]:
        expected[n] += 1
    layers = _layers(model)
    assert {n: layers[n].adapters["default"].rank if n in layers else 0 for n in names} == expected
    assert len(set(expected.values())) > 1  # the budget really was redistributed here
    for n, layer in layers.items():
        ad = layer.adapters["default"]
        r = ad.rank
        assert ad.config.lora_alpha == 4 * r / 2 and ad.scale == 2.0  # α/r kept
        assert torch.count_nonzero(ad.lora_B) == 0
        proj = ad.lora_A.double().T @ ad.lora_A.double()
        torch.testing.assert_close(proj, pcs[n][:r].T @ pcs[n][:r], atol=1e-4, rtol=0)
    assert torch.equal(_logits(model, _ids()), _logits(base, _ids()))


def test_eva_matches_peft(llama):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    base = llama()
    batches = [{"input_ids": _ids(20, (2, 16))}]
    batches[0]["attention_mask"] = torch.ones_like(batches[0]["input_ids"])
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights="eva",
                     eva_config=EvaConfig(rho=2.0, tau=0.99999, use_label_mask=False))
    pm = get_peft_model(copy.deepcopy(base), cfg)
    initialize_lora_eva_weights(pm, batches, show_progress_bar=False)
    mine = copy.deepcopy(base)
    rw.adapt(mine, "eva", rank=2, alpha=4, rho=2.0, oversample=64, targets=TARGETS,
             calibration=Batches(batches, progress=False))
    layers = _layers(mine)
    pcfg = pm.peft_config["default"]
    ranks = {n: layers[n].adapters["default"].rank for n in layers}
    assert {n: r for n, r in ranks.items() if r != 2} == pcfg.rank_pattern
    assert {n: layers[n].adapters["default"].config.lora_alpha for n in layers if ranks[n] != 2} == pcfg.alpha_pattern
    for n, layer in layers.items():
        a_peft = _peft_layer(pm, n).lora_A["default"].weight
        a = layer.adapters["default"].lora_A
        # the same principal subspace (PEFT stops its iterations at cosine similarity τ)
        torch.testing.assert_close(a.T @ a, a_peft.T @ a_peft, atol=5e-3, rtol=0)


def test_eva_save_load_and_peft_roundtrip(llama, tmp_path):
    from peft import PeftModel

    base = llama()
    model = copy.deepcopy(base)
    rw.adapt(model, "eva", rank=2, alpha=4, targets=TARGETS, calibration=Batches(_eva_batches(), progress=False))
    _perturb_b(model)
    ids = _ids()
    out = _logits(model, ids)
    ranks = {n: ly.adapters["default"].rank for n, ly in _layers(model).items()}
    assert len(set(ranks.values())) > 1
    rw.save(model, tmp_path / "rw")
    fresh = rw.load(copy.deepcopy(base), tmp_path / "rw")  # no calibration needed to load
    assert {n: ly.adapters["default"].rank for n, ly in _layers(fresh).items()} == ranks
    assert torch.equal(_logits(fresh, ids), out)
    rw.export_peft(model, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(_logits(loaded, ids), out, atol=1e-5, rtol=1e-5)
    back = rw.import_peft(copy.deepcopy(base), tmp_path / "peft")
    assert rw.summary(back)[0]["method"] == "eva"
    assert {n: ly.adapters["default"].rank for n, ly in _layers(back).items()} == ranks
    torch.testing.assert_close(_logits(back, ids), out, atol=1e-6, rtol=1e-6)
    loaded.save_pretrained(tmp_path / "peft2")  # PEFT's own save of the same adapter
    again = rw.import_peft(copy.deepcopy(base), tmp_path / "peft2")
    torch.testing.assert_close(_logits(again, ids), out, atol=1e-5, rtol=1e-5)


def test_eva_drops_layers_without_rank_and_rejects_empty_data(llama):
    base = llama()
    model = copy.deepcopy(base)
    # a huge rho lets the budget concentrate: some layers end with rank 0 and are left out
    rw.adapt(model, "eva", rank=1, rho=8.0, targets=TARGETS, calibration=Batches(_eva_batches(), progress=False))
    state = rw.core.api.adapter_state(model)["default"]
    assert len(state["modules"]) == len(_layers(model)) < 4
    assert sum(ly.adapters["default"].rank for ly in _layers(model).values()) == 4
    padding_only = {"input_ids": _ids(0, (1, 4)), "attention_mask": torch.zeros(1, 4, dtype=torch.long)}
    with pytest.raises(rw.errors.CalibrationError, match="q_proj.*no input rows"):
        rw.adapt(copy.deepcopy(base), "eva", rank=2, targets=["q_proj"], calibration=Batches([padding_only],
                                                                                            progress=False))


def test_pissa_and_corda_match_peft_on_hf_conv1d(gpt2):
    """GPT-2's transposed ``Conv1D`` layers: PEFT's residual weight (stored ``in × out``) is the
    transpose of rankwise's canonical ``W0 − s·B₀A₀``."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    base = gpt2()
    targets = ["c_attn", "c_fc"]
    calib_ids = _ids(2, (1, 12))
    for method in ("pissa", "corda"):
        extra = {"corda_config": CordaConfig(corda_method="ipm")} if method == "corda" else {}
        cfg = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=method, fan_in_fan_out=True,
                         **extra)
        pmodel = copy.deepcopy(base)
        if method == "corda":
            preprocess_corda(pmodel, cfg, run_model=lambda pmodel=pmodel: pmodel(input_ids=calib_ids))
        pm = get_peft_model(pmodel, cfg)
        mine = copy.deepcopy(base)
        kw = {"calibration": Batches([{"input_ids": calib_ids}], progress=False)} if method == "corda" else {}
        rw.adapt(mine, method, rank=2, alpha=4, targets=targets, **kw)
        for name, layer in _layers(mine).items():
            assert layer.view.kind == "hf_conv1d"
            torch.testing.assert_close(_residual(layer).T, _peft_layer(pm, name).base_layer.weight,
                                       atol=1e-4, rtol=1e-4)
        ids = _ids()
        torch.testing.assert_close(_logits(mine, ids), _logits(pm, ids), atol=1e-4, rtol=1e-4)
