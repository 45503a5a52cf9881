"""Methods lotr, flora_tucker, lamda, sora, compacter, hydra, and the engine's support for
parameters shared between layers.

Oracles: dense re-derivations of each method's formula from its parameters (Kronecker products
with ``torch.kron``, Tucker mode products by explicit sums, the SVD of ``W0``), the paper's
parameter-count formulas, and for sharing, autograd through an independent functional model in
which one leaf tensor is used by every layer. None of these methods is in PEFT 0.21, so there
is no PEFT oracle here.
"""

from __future__ import annotations

import copy
import gc
import json
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import rankwise as rw
from rankwise.core.adapted import AdaptedLayer
from rankwise.core.api import adapter_state
from rankwise.errors import ConfigError, ShapeMismatchError
from rankwise.methods import lamda, sora

pytestmark = pytest.mark.usefixtures("single_thread")
ATOL = 1e-5


def _layers(model) -> dict[str, AdaptedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _perturb(params, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _unique_adapter_params(model):
    seen, out = set(), []
    for layer in _layers(model).values():
        for p in layer.adapters.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


# ================================================================================================
# Engine: parameters shared between layers
# ================================================================================================
SHARING = {
    # method, options, targets
    "lotr": ({"rank": 3}, ["query", "value"]),
    "compacter": ({"phm_dim": 4, "phm_rank": 2}, "all-linear"),
}


def _shared_model(bert, method):
    opts, targets = SHARING[method]
    base = bert()
    model = copy.deepcopy(base)
    rw.adapt(model, method, targets=targets, seed=3, **opts)
    _perturb(_unique_adapter_params(model), seed=5)
    return base, model


def _shared_tensors(layer: AdaptedLayer, name="default"):
    ad = layer.adapters[name]
    return ad.factors if hasattr(ad, "factors") else ad.rules


@pytest.mark.parametrize("method", sorted(SHARING))
def test_shared_parameters_are_one_object_counted_once(bert, method):
    _, model = _shared_model(bert, method)
    layers = _layers(model)
    entry = adapter_state(model)["default"]
    shared = entry["shared"]
    shared_ids = {id(p) for p in shared.parameters()}
    # every layer's adapter holds parameters of the one shared module, not copies
    for layer in layers.values():
        assert {id(p) for p in _shared_tensors(layer).parameters()} <= shared_ids
    # the model (and so any optimizer built from it) sees each shared tensor once
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len({id(p) for p in params})
    per_layer = sum(p.numel() for layer in layers.values() for p in layer.adapters.parameters()
                    if id(p) not in shared_ids)
    assert rw.trainable_parameters(model) == per_layer + sum(p.numel() for p in shared.parameters())
    # rw.summary counts a shared tensor in one row only
    assert sum(r["params"] for r in rw.summary(model)) == rw.trainable_parameters(model)


def test_lotr_param_count_formula_many_layers(bert):
    """LoTR on L layers of G types: G·r(out+in) + L·r² (the paper's saving over LoRA's L·r(out+in))."""
    r = 3
    for share, groups in (("type", {"query": 2, "value": 2}), ("shape", {"all": 4})):
        model = bert()
        rw.adapt(model, "lotr", rank=r, targets=["query", "value"], share=share, seed=0)
        n_groups = len(groups)
        assert len(adapter_state(model)["default"]["shared"]) == n_groups
        assert rw.trainable_parameters(model) == n_groups * r * (32 + 32) + 4 * r * r
    # all-linear on BERT: 7 layer types (q, k, v, attention out, intermediate, output, pooler);
    # 3 weight shapes (32x32, 64x32, 32x64)
    model = bert()
    rw.adapt(model, "lotr", rank=r, share="shape", seed=0)
    shapes = {"shape_32x32": (32, 32), "shape_64x32": (64, 32), "shape_32x64": (32, 64)}
    assert set(adapter_state(model)["default"]["shared"]) == set(shapes)
    n_layers = len(_layers(model))
    assert rw.trainable_parameters(model) == sum(r * (o + i) for o, i in shapes.values()) + n_layers * r * r
    model = bert()
    rw.adapt(model, "lotr", rank=r, seed=0)
    assert len(adapter_state(model)["default"]["shared"]) == 7


def test_shared_gradients_accumulate_from_all_layers(bert, token_batch):
    """The shared factors' gradient equals that of an independent functional model in which one
    leaf tensor U (and V) is used by every layer of the group: the sum over layers."""
    base, model = _shared_model(bert, "lotr")
    model.train()
    base.train()
    model(**token_batch).logits.square().mean().backward()
    layers = _layers(model)
    q_layers = [n for n in layers if n.endswith("query")]
    f = layers[q_layers[0]].adapters["default"].factors
    assert all(layers[n].adapters["default"].factors is f for n in q_layers)

    u = f.lotr_U.detach().clone().requires_grad_(True)
    v = f.lotr_V.detach().clone().requires_grad_(True)
    weights = {}
    for n, layer in layers.items():
        ad = layer.adapters["default"]
        if n in q_layers:
            weights[f"{n}.weight"] = layer.base.weight + ad.scale * u @ ad.lotr_G.detach() @ v
        else:
            weights[f"{n}.weight"] = layer.base.weight + ad.delta_weight().detach()
    out = torch.func.functional_call(base, weights, args=(), kwargs=token_batch)
    gu, gv = torch.autograd.grad(out.logits.square().mean(), (u, v))
    torch.testing.assert_close(f.lotr_U.grad, gu, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(f.lotr_V.grad, gv, atol=1e-6, rtol=1e-5)
    # one SGD step moves a shared tensor once (a duplicate in the optimizer would move it twice)
    before = f.lotr_U.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    torch.testing.assert_close(f.lotr_U.detach(), before - 0.1 * gu, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(SHARING))
def test_shared_saved_once_and_relinked_on_load(bert, token_batch, tmp_path, method):
    base, model = _shared_model(bert, method)
    rw.save(model, tmp_path / "ad")
    shared_sd = adapter_state(model)["default"]["shared"].state_dict()
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
        for k, t in shared_sd.items():
            assert torch.equal(fh.get_tensor(f"default/(shared)/{k}"), t)
    shared_keys = [k for k in keys if k.startswith("default/(shared)/")]
    assert len(shared_keys) == len(shared_sd), "each shared tensor is stored exactly once"
    # the file holds every adapter tensor once: its size is that of the unique tensors
    unique = {id(t): t for layer in _layers(model).values()
              for t in layer.adapters["default"].state_dict(keep_vars=True).values()}
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as fh:
        stored = sum(fh.get_tensor(k).numel() for k in keys)
    assert stored == sum(t.numel() for t in unique.values())

    fresh = copy.deepcopy(base)
    rw.load(fresh, tmp_path / "ad")
    assert torch.equal(_logits(fresh, token_batch), _logits(model, token_batch))
    fresh_shared = adapter_state(fresh)["default"]["shared"]
    ids = {id(p) for p in fresh_shared.parameters()}
    for layer in _layers(fresh).values():  # re-linked: every layer uses the loaded object
        assert {id(p) for p in _shared_tensors(layer).parameters()} <= ids
    for k, t in fresh_shared.state_dict().items():
        assert torch.equal(t, shared_sd[k]), k
    assert rw.trainable_parameters(fresh) == rw.trainable_parameters(model)


def test_shared_file_mismatch_is_refused(bert, tmp_path):
    """A file whose shared tensors do not fit (another share grouping) fails with a clear error
    and leaves the model unchanged."""
    base = bert()
    model = copy.deepcopy(base)
    rw.adapt(model, "lotr", rank=2, targets=["query", "value"], share="shape", seed=0)
    rw.save(model, tmp_path / "ad")
    cfg_file = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["adapters"]["default"]["config"]["share"] = "type"
    cfg["weights_sha256"] = None
    cfg_file.write_text(json.dumps(cfg))
    fresh = copy.deepcopy(base)
    with pytest.raises(ShapeMismatchError, match="shared between layers"):
        rw.load(fresh, tmp_path / "ad")
    assert not _layers(fresh) and adapter_state(fresh) == {}


@pytest.mark.parametrize("how", ["delete", "unadapt"])
def test_delete_and_unadapt_release_shared(bert, how):
    _, model = _shared_model(bert, "compacter")
    ref = weakref.ref(adapter_state(model)["default"]["shared"])
    if how == "delete":
        rw.delete(model, "default")
    else:
        rw.unadapt(model)
    gc.collect()
    assert ref() is None, "nothing may keep the shared module alive"
    assert not _layers(model)
    assert not any("rules" in n or "factors" in n for n, _ in model.named_parameters())


def test_two_sharing_adapters_keep_their_own_shared(bert, token_batch, tmp_path):
    base = bert()
    model = copy.deepcopy(base)
    rw.adapt(model, "compacter", targets=["query"], name="a", seed=0)
    rw.adapt(model, "lotr", rank=2, targets=["query", "key"], name="b", seed=1)
    _perturb(_unique_adapter_params(model), seed=2)
    st = adapter_state(model)
    assert st["a"]["shared"] is not st["b"]["shared"]
    rw.set_active(model, ["a", "b"])
    rw.save(model, tmp_path / "ad")
    fresh = copy.deepcopy(base)
    rw.load(fresh, tmp_path / "ad")
    assert torch.equal(_logits(fresh, token_batch), _logits(model, token_batch))


# ================================================================================================
# lotr
# ================================================================================================
def test_lotr_closed_form_and_init(bert):
    model = bert()
    rw.adapt(model, "lotr", rank=4, alpha=8.0, targets=["query", "value"], seed=0)
    layers = _layers(model)
    for layer in layers.values():
        ad = layer.adapters["default"]
        u, v = ad.factors.lotr_U, ad.factors.lotr_V
        eye = torch.eye(4)
        torch.testing.assert_close(u.t() @ u, eye, atol=1e-5, rtol=0)  # orthonormal columns
        torch.testing.assert_close(v @ v.t(), eye, atol=1e-5, rtol=0)  # orthonormal rows
        assert torch.count_nonzero(ad.lotr_G) == 0
    _perturb(_unique_adapter_params(model), seed=1)
    for layer in layers.values():
        ad = layer.adapters["default"]
        dense = 2.0 * ad.factors.lotr_U @ ad.lotr_G @ ad.factors.lotr_V  # s = α / r = 2
        torch.testing.assert_close(layer.delta_weight(), dense, atol=1e-6, rtol=0)
        assert torch.linalg.matrix_rank(dense) <= 4


def test_lotr_rank_too_large_is_clear(bert):
    with pytest.raises(ConfigError, match="rank ≤ 32"):
        rw.adapt(bert(), "lotr", rank=40, targets=["query"])
    with pytest.raises(ConfigError, match="share"):
        rw.get_method("lotr").Config(share="layer")


# ================================================================================================
# flora_tucker
# ================================================================================================
def _tucker_by_sums(core, factors):
    """Σ_{idx} G[idx] · U_0[:, i0] ∘ U_1[:, i1] ∘ … — the Tucker reconstruction by explicit outer products."""
    out = torch.zeros(*[f.shape[0] for f in factors], dtype=core.dtype)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in core.shape]).reshape(-1, core.dim()).tolist():
        term = core[tuple(idx)]
        vecs = [f[:, i] for f, i in zip(factors, idx)]
        outer = vecs[0]
        for vec in vecs[1:]:
            outer = torch.tensordot(outer, vec, dims=0)
        out += term * outer
    return out


def test_flora_conv2d_is_tucker_of_the_kernel_tensor():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(5, 6, (3, 2), stride=2, padding=1, padding_mode="circular"))
    rw.adapt(net, "flora_tucker", rank=3, kernel_rank=2, scale=0.5, targets=["0"], seed=0)
    layer = net[0]
    ad = layer.adapters["default"]
    assert tuple(ad.flora_G.shape) == (3, 3, 2, 2)
    assert [tuple(f.shape) for f in ad.factors] == [(6, 3), (5, 3), (3, 2), (2, 2)]
    _perturb(ad.parameters(), seed=1)
    dense = 0.5 * _tucker_by_sums(ad.flora_G.detach(), [f.detach() for f in ad.factors])
    torch.testing.assert_close(layer.delta_weight(), dense, atol=1e-6, rtol=0)
    # the defining property: each mode unfolding of ΔW has rank ≤ that mode's Tucker rank
    for mode, r in enumerate((3, 3, 2, 2)):
        unfold = torch.movedim(dense, mode, 0).reshape(dense.shape[mode], -1)
        assert torch.linalg.matrix_rank(unfold) <= r
    # and the activation view is the convolution with W0 + ΔW (circular padding, stride 2)
    x = torch.randn(2, 5, 9, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), layer.base.weight + dense, layer.base.bias, stride=2)
        torch.testing.assert_close(layer(x), ref, atol=ATOL, rtol=ATOL)
    n = rw.get_method("flora_tucker").num_params(layer.view, ad.config)
    assert n == 3 * 3 * 2 * 2 + 6 * 3 + 5 * 3 + 3 * 2 + 2 * 2 == rw.trainable_parameters(net)


def test_flora_linear_counts_and_kernel_rank_default():
    lin = nn.Sequential(nn.Linear(10, 7))
    rw.adapt(lin, "flora_tucker", rank=4, targets=["0"], seed=0)
    assert rw.trainable_parameters(lin) == 4 * 4 + 7 * 4 + 10 * 4
    conv = nn.Sequential(nn.Conv1d(3, 4, 5))
    rw.adapt(conv, "flora_tucker", rank=8, targets=["0"], seed=0)  # ranks clamp to the modes: 4, 3, k=5
    ad = conv[0].adapters["default"]
    assert tuple(ad.flora_G.shape) == (4, 3, 5)
    assert rw.trainable_parameters(conv) == 4 * 3 * 5 + 4 * 4 + 3 * 3 + 5 * 5


# ================================================================================================
# hydra
# ================================================================================================
def test_hydra_two_branches_literally():
    model = nn.Sequential(nn.Linear(6, 5))
    rw.adapt(model, "hydra", rank=2, scale=0.7, targets=["0"], seed=0)
    layer = model[0]
    ad = layer.adapters["default"]
    assert torch.count_nonzero(ad.hydra_B_par) == torch.count_nonzero(ad.hydra_B_seq) == 0
    _perturb(ad.parameters(), seed=3)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    w0, b = layer.base.weight.detach().clone(), layer.base.bias.detach()
    with torch.no_grad():
        pre = x @ w0.t()  # the pre-trained feature W0 x
        y = pre + b + 0.7 * (x @ ad.hydra_A_par.t() @ ad.hydra_B_par.t()) \
            + 0.7 * (pre @ ad.hydra_A_seq.t() @ ad.hydra_B_seq.t())
        torch.testing.assert_close(layer(x), y, atol=ATOL, rtol=ATOL)
        dense = 0.7 * (ad.hydra_B_par @ ad.hydra_A_par + ad.hydra_B_seq @ ad.hydra_A_seq @ w0)
        torch.testing.assert_close(layer.delta_weight(), dense, atol=1e-6, rtol=0)
    assert rw.trainable_parameters(model) == 2 * (6 + 3 * 5)
    # its update reads W0: merge keeps the exact ΔW, unmerge restores W0
    rw.merge(model)
    torch.testing.assert_close(layer.base.weight, w0 + dense, atol=1e-6, rtol=0)
    rw.unmerge(model)
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)


# ================================================================================================
# sora
# ================================================================================================
def test_sora_proximal_step_is_soft_thresholding():
    net = nn.Sequential(nn.Linear(8, 6))
    rw.adapt(net, "sora", rank=5, targets=["0"], seed=0)
    ad = net[0].adapters["default"]
    g0 = torch.tensor([0.5, -0.05, 0.2, -0.9, 0.1])
    with torch.no_grad():
        ad.sora_gate.copy_(g0)
    nonzero = sora.proximal_step(net, lr=0.5, lam=0.3)  # threshold 0.15
    expect = torch.tensor([0.35, 0.0, 0.05, -0.75, 0.0])
    torch.testing.assert_close(ad.sora_gate.detach(), expect, atol=1e-7, rtol=0)
    assert nonzero == 3
    assert sora.gate_parameters(net) == [ad.sora_gate]
    with pytest.raises(ConfigError):
        sora.proximal_step(net, lr=-1.0, lam=0.1)


def _sora_bert(bert):
    base = bert()
    model = copy.deepcopy(base)
    rw.adapt(model, "sora", rank=4, alpha=8.0, targets=["query", "value"], seed=0)
    _perturb([p for p in _unique_adapter_params(model) if p.dim() == 2], seed=1)
    return base, model


def test_sora_prune_shrinks_and_keeps_the_update(bert, token_batch, tmp_path):
    base, model = _sora_bert(bert)
    layers = _layers(model)
    q0 = "bert.encoder.layer.0.attention.self.query"
    gates = {q0: [0.0, 1.5, 0.0, -0.7]}  # rank 2 left; value of layer 1 loses everything
    gates["bert.encoder.layer.1.attention.self.value"] = [0.0, 0.0, 0.0, 0.0]
    with torch.no_grad():
        for n, g in gates.items():
            layers[n].adapters["default"].sora_gate.copy_(torch.tensor(g))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    model(**token_batch).logits.square().mean().backward()
    opt.step()  # so the optimizer holds state (Adam moments) for the parameters prune() cuts
    opt.zero_grad()
    with torch.no_grad():
        for n, g in gates.items():  # the step moved the gates; put the zeros back
            layers[n].adapters["default"].sora_gate.copy_(torch.tensor(g))
        deltas = {n: layer.delta_weight().clone() for n, layer in layers.items()}
    before = _logits(model.eval(), token_batch)
    n_before = rw.trainable_parameters(model)

    ranks = sora.prune(model, optimizer=opt)["default"]
    assert ranks[q0] == 2 and ranks["bert.encoder.layer.1.attention.self.value"] == 0
    ad = layers[q0].adapters["default"]
    assert tuple(ad.sora_A.shape) == (2, 32) and tuple(ad.sora_B.shape) == (32, 2) and ad.sora_gate.numel() == 2
    assert ad.scale == 2.0, "s = α / r₀ keeps the initial rank"
    for n, layer in layers.items():
        torch.testing.assert_close(layer.delta_weight(), deltas[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model, token_batch), before, atol=ATOL, rtol=ATOL)
    assert rw.trainable_parameters(model) == n_before - 2 * (32 + 32 + 1) - 4 * (32 + 32 + 1)
    cfg = adapter_state(model)["default"]["config"]
    assert cfg.rank_pattern == {q0: 2, "bert.encoder.layer.1.attention.self.value": 0}
    for n, layer in layers.items():
        expect = cfg.rank_of(n) * (32 + 32 + 1)
        assert rw.get_method("sora").num_params(layer.view, layer.adapters["default"].config) == expect
    # the optimizer's state was cut with the parameters: training goes on
    model.train()
    model(**token_batch).logits.square().mean().backward()
    opt.step()
    assert opt.state[ad.sora_A]["exp_avg"].shape == ad.sora_A.shape

    # the saved file records the pruned ranks; rw.load rebuilds them
    rw.save(model, tmp_path / "ad")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["adapters"]["default"]["config"]["rank_pattern"][q0] == 2
    fresh = copy.deepcopy(base)
    rw.load(fresh, tmp_path / "ad")
    assert _layers(fresh)[q0].adapters["default"].rank == 2
    assert torch.equal(_logits(fresh, token_batch), _logits(model.eval(), token_batch))
    assert rw.trainable_parameters(fresh) == rw.trainable_parameters(model)


def test_sora_training_sparsifies_gates():
    """Proximal gradient descent on the gates (SGD step, then soft-thresholding, as in the paper)
    with AdamW on A, B: on a rank-1 target, λ drives unneeded gates to exactly zero while the
    loss still falls; prune then removes those ranks."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10))
    w_true = torch.randn(10, 1, generator=g) @ torch.randn(1, 12, generator=g)  # a rank-1 target update
    x = torch.randn(256, 12, generator=g)
    y = net(x).detach() + x @ w_true.t()
    rw.adapt(net, "sora", rank=6, targets=["0"], seed=0)
    ad = net[0].adapters["default"]
    opt = torch.optim.AdamW([ad.sora_A, ad.sora_B], lr=0.02, weight_decay=0.0)
    gate_opt = torch.optim.SGD(sora.gate_parameters(net), lr=0.1)
    losses = []
    for _ in range(300):
        loss = F.mse_loss(net(x), y)
        opt.zero_grad()
        gate_opt.zero_grad()
        loss.backward()
        opt.step()
        gate_opt.step()
        sora.proximal_step(net, lr=0.1, lam=0.1)
        losses.append(loss.item())
    assert losses[-1] < 1e-3 * losses[0]
    alive = int(torch.count_nonzero(ad.sora_gate))
    assert 1 <= alive < 6
    with torch.no_grad():
        before = net(x)
    assert sora.prune(net)["default"]["0"] == alive == ad.rank
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, atol=ATOL, rtol=ATOL)


# ================================================================================================
# lamda
# ================================================================================================
def test_lamda_init_is_the_spectrum_of_w0():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 10))
    rw.adapt(net, "lamda", rank=4, targets=["0"], seed=0)
    ad = net[0].adapters["default"]
    u, s, vh = torch.linalg.svd(net[0].base.weight.detach(), full_matrices=False)
    # the same top-4 singular vectors up to sign (randomized SVD, exact here: sketch width
    # min(r + 8, 10, 40) = 10 spans the whole range)
    torch.testing.assert_close((u[:, :4].t() @ ad.lamda_B).abs(), torch.eye(4), atol=1e-4, rtol=0)
    torch.testing.assert_close((vh[:4] @ ad.lamda_A.t()).abs(), torch.eye(4), atol=1e-4, rtol=0)
    assert torch.count_nonzero(ad.lamda_S) == 0
    assert "lamda_A" in dict(ad.named_buffers()) and not any("lamda_A" in n for n, _ in ad.named_parameters())
    assert rw.trainable_parameters(net) == 4 * 4 + 10 * 4
    # randomized SVD on a layer where the sketch is narrower than the matrix: still the top subspace
    big = nn.Sequential(nn.Linear(200, 120))
    with torch.no_grad():  # a clear spectral gap after the top 3
        q1 = torch.linalg.qr(torch.randn(120, 120)).Q
        q2 = torch.linalg.qr(torch.randn(200, 120)).Q
        sv = torch.cat([torch.tensor([10.0, 8.0, 6.0]), torch.full((117,), 0.5)])
        big[0].weight.copy_(q1 @ torch.diag(sv) @ q2.t())
    rw.adapt(big, "lamda", rank=3, targets=["0"], seed=1)
    b = big[0].adapters["default"].lamda_B
    torch.testing.assert_close((q1[:, :3].t() @ b).abs(), torch.eye(3), atol=1e-3, rtol=0)


def test_lamda_freezing_schedule(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(9, 7))
    net = copy.deepcopy(base)
    rw.adapt(net, "lamda", rank=4, freeze_steps=8, targets=["0"], seed=0)
    ad = net[0].adapters["default"]
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    x = torch.randn(16, 9, generator=torch.Generator().manual_seed(1))
    snapshots = {}
    for step in range(1, 11):
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        frozen = lamda.freeze_step(net, step)["0"]
        assert frozen == min(4, step * 4 // 8)  # column j frozen at step ⌈8 (j+1) / 4⌉
        for j in range(frozen):  # largest singular value first: columns 0, 1, …
            snapshots.setdefault(j, ad._b()[:, j].detach().clone())
        for j, col in snapshots.items():  # a frozen column never moves again (momentum, weight decay)
            assert torch.equal(ad._b()[:, j], col), (step, j)
        if frozen < 4:
            assert ad.lamda_B.requires_grad
    assert not ad.lamda_B.requires_grad, "fully frozen: B stops requiring gradients"
    assert rw.trainable_parameters(net) == 4 * 4
    # saved and loaded with its frozen state
    rw.save(net, tmp_path / "ad")
    fresh = copy.deepcopy(base)
    rw.load(fresh, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))
    assert rw.trainable_parameters(fresh) == 16 and not fresh[0].adapters["default"].lamda_B.requires_grad


def test_lamda_freeze_options():
    net = nn.Sequential(nn.Linear(9, 7))
    rw.adapt(net, "lamda", rank=3, freeze_steps=0, targets=["0"], seed=0)
    assert rw.trainable_parameters(net) == 9 == rw.get_method("lamda").num_params(
        net[0].view, adapter_state(net)["default"]["config"])
    net = nn.Sequential(nn.Linear(9, 7))
    rw.adapt(net, "lamda", rank=3, freeze_steps=3, freeze_order="smallest", targets=["0"], seed=0)
    lamda.freeze_step(net, 1)
    assert net[0].adapters["default"].lamda_frozen.tolist() == [False, False, True]
    with pytest.raises(ConfigError, match="freeze_order"):
        rw.adapt(nn.Sequential(nn.Linear(4, 4)), "lamda", rank=2, freeze_order="random", targets=["0"])
    with pytest.raises(ConfigError, match="step"):
        lamda.freeze_step(net, -1)


# ================================================================================================
# compacter
# ================================================================================================
@pytest.mark.parametrize("shape", [(8, 12), (7, 10)])  # divisible by n = 4, and padded/cropped
def test_compacter_is_a_sum_of_kronecker_products(shape):
    n_out, n_in = shape
    net = nn.Sequential(nn.Linear(n_in, n_out))
    rw.adapt(net, "compacter", phm_dim=4, phm_rank=2, targets=["0"], seed=0)
    ad = net[0].adapters["default"]
    _perturb(ad.parameters(), seed=4)
    a, s, t = ad.rules.phm_rule.detach(), ad.compacter_S.detach(), ad.compacter_T.detach()
    dense = sum(torch.kron(a[i], s[i] @ t[i].t()) for i in range(4))[:n_out, :n_in]
    torch.testing.assert_close(net[0].delta_weight(), dense, atol=1e-6, rtol=0)
    x = torch.randn(3, 5, n_in, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(x), F.linear(x, net[0].base.weight + dense, net[0].base.bias),
                                   atol=ATOL, rtol=ATOL)
    p, q = -(-n_out // 4), -(-n_in // 4)
    assert rw.trainable_parameters(net) == 4 ** 3 + 4 * 2 * (p + q)


def test_compacter_rules_shared_by_layers_of_every_shape(bert):
    model = bert()
    rw.adapt(model, "compacter", phm_dim=4, phm_rank=1, seed=0)  # all-linear: 32x32, 64x32 and 32x64 layers
    layers = _layers(model)
    rules = {id(layer.adapters["default"].rules.phm_rule) for layer in layers.values()}
    assert len(rules) == 1
    own = sum(4 * 1 * (-(-layer.view.out_features // 4) + -(-layer.view.in_features // 4))
              for layer in layers.values())
    assert rw.trainable_parameters(model) == 4 ** 3 + own


def test_methods_registered_with_docs():
    for name in ("lotr", "flora_tucker", "lamda", "sora", "compacter", "hydra"):
        cls = rw.get_method(name)
        doc = __import__(f"rankwise.methods.{name}", fromlist=["_"]).__doc__
        assert "arXiv" in doc and "Parameters" in doc, name
        assert cls.summary and cls.default_lr > 0


# ================================================================================================
# training hooks: rw.rank_step / rw.rank_regularization (what rankwise.train calls) drive SoRA's
# proximal step and pruning and LaMDA's freezing schedule
# ================================================================================================
def test_sora_rank_step_thresholds_by_the_gate_group_lr_and_prunes_at_the_end():
    net = nn.Sequential(nn.Linear(8, 6))
    rw.adapt(net, "sora", rank=5, lam=0.3, targets=["0"], seed=0)
    ad = net[0].adapters["default"]
    _perturb([ad.sora_B], seed=3)
    with torch.no_grad():
        ad.sora_gate.copy_(torch.tensor([0.5, -0.05, 0.2, -0.9, 0.1]))
    # the gates sit in their own group with lr 0.5 (threshold 0.15); A, B in another
    opt = torch.optim.SGD([{"params": [ad.sora_A, ad.sora_B], "lr": 9.0}, {"params": [ad.sora_gate], "lr": 0.5}])
    info = rw.rank_step(net, 1, opt, total_steps=2)
    torch.testing.assert_close(ad.sora_gate.detach(), torch.tensor([0.35, 0.0, 0.05, -0.75, 0.0]), atol=1e-7, rtol=0)
    assert info == {"default": {"nonzero gates": 3}}
    a_full, b_full = ad.sora_A.detach().clone(), ad.sora_B.detach().clone()
    info = rw.rank_step(net, 2, opt, total_steps=2)  # last step: threshold again, then prune
    expect = torch.tensor([0.2, -0.6])  # 0.05 hits zero at the second threshold
    assert info["default"]["ranks"] == {"0": 2} and ad.rank == 2
    torch.testing.assert_close(ad.sora_gate.detach(), expect, atol=1e-7, rtol=0)
    # ΔW of the pruned adapter = the unpruned factors with the twice-thresholded gate (zeros included)
    gate2 = torch.tensor([0.2, 0.0, 0.0, -0.6, 0.0])
    torch.testing.assert_close(net[0].delta_weight(), ad.scale * (b_full * gate2) @ a_full, atol=1e-6, rtol=0)
    # no optimizer holding the gates: no proximal step
    net2 = nn.Sequential(nn.Linear(8, 6))
    rw.adapt(net2, "sora", rank=3, targets=["0"], seed=0)
    assert rw.rank_step(net2, 1, None) == {}
    assert torch.equal(net2[0].adapters["default"].sora_gate, torch.ones(3))


def test_train_runs_sora_proximal_steps_and_lamda_freezing():
    from rankwise.train import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(12, generator=g), torch.randn(10, generator=g)) for _ in range(32)]

    def collate(items):
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    def loss_fn(m, batch):
        return (m(batch[0]) - batch[1]).square().mean()

    cfg = TrainConfig(steps=6, batch_size=4, lr=0.05, warmup=0, weight_decay=0.0)
    # SoRA with a λ so large that the first threshold (λ·lr = 50·0.05) zeroes every gate: all ranks pruned
    net = rw.adapt(nn.Sequential(nn.Linear(12, 10)), "sora", rank=4, lam=50.0, targets=["0"], seed=0)
    train(net, data, collate, loss_fn, cfg, progress=False)
    assert net[0].adapters["default"].rank == 0
    assert adapter_state(net)["default"]["config"].rank_pattern == {"0": 0}
    # λ = 0: plain training, no pruning
    net = rw.adapt(nn.Sequential(nn.Linear(12, 10)), "sora", rank=4, lam=0.0, targets=["0"], seed=0)
    train(net, data, collate, loss_fn, cfg, progress=False)
    assert net[0].adapters["default"].rank == 4
    # LaMDA: B frozen column by column over freeze_steps=4 optimizer steps
    net = rw.adapt(nn.Sequential(nn.Linear(12, 10)), "lamda", rank=4, freeze_steps=4, targets=["0"], seed=0)
    train(net, data, collate, loss_fn, cfg, progress=False)
    ad = net[0].adapters["default"]
    assert ad.frozen_columns() == 4 and not ad.lamda_B.requires_grad
    assert rw.trainable_parameters(net) == 16
