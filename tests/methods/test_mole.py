"""The "mole" mixture layer against oracles written here: per-token loops over the experts (the
routing equations transcribed), the Switch / MixLoRA load-balance formula, and the dense update."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise import compose
from rankwise.core.api import adapted_layers
from rankwise.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


class Block(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.q = nn.Linear(d, 5)
        self.o = nn.Linear(5, d)

    def forward(self, x):
        return x + self.o(torch.tanh(self.q(x)))


class Net(nn.Module):
    """Four blocks (names ``layers.<i>.q`` / ``.o``: MoLA groups them by depth)."""

    def __init__(self, depth=4, d=6):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(depth))

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return x


def net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Net().to(dtype).eval()


def x_of(seed=1, dtype=torch.float32):
    return torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(seed)).to(dtype)


def perturb(model, name, seed=7, std=0.4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            if name in layer.adapters:
                for p in [*layer.adapters[name].parameters(), *layer.adapters[name].buffers()]:
                    if p.is_floating_point():
                        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p) * std)


def one_layer(config, seed=0, dtype=torch.float64):
    """A single Linear(6 → 5) wrapped, adapted with ``config``; the adapter perturbed."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5)).to(dtype)
    rw.adapt(model, config.replace(targets=["0"]) if config.targets == "all-linear" else config, seed=seed)
    perturb(model, "default", seed + 3)
    return model, model[0].adapters["default"]


def oracle(ad, x, mask=None):
    """``W0 x + b + s Σ_e g_e(x) B_e A_e x`` token by token, with ``g`` from the router's equations."""
    view, e, r, s = ad.view, ad.n_experts, ad.rank, ad.scale
    w0, b0 = view.weight2d(), view.base.bias
    mask = ad.expert_mask if mask is None else mask
    out = []
    for t in x.reshape(-1, x.shape[-1]):
        if ad.router == "layer":
            logits = ad.gate_logits / ad.temperature
        else:
            logits = ad.router_weight @ t / ad.temperature
        logits = torch.where(mask, logits, torch.tensor(-math.inf, dtype=logits.dtype))
        p = torch.exp(logits - logits.max())
        p = p / p.sum()
        if ad.router == "topk":
            k = min(ad.config.top_k, int(mask.sum()))
            order = sorted(range(e), key=lambda i: -float(p[i].detach()))[:k]
            g = torch.zeros_like(p)
            for i in order:
                g[i] = p[i] / sum(p[j] for j in order)
        else:
            g = p
        y = w0 @ t + b0
        for i in range(e):
            a_i = ad.experts_A if ad.config.shared_a else ad.experts_A[i * r:(i + 1) * r]
            b_i = ad.experts_B[:, i * r:(i + 1) * r]
            y = y + s * g[i] * (b_i @ (a_i @ t))
        out.append(y)
    return torch.stack(out).reshape(*x.shape[:-1], -1)


ROUTERS = [
    dict(router="layer"),
    dict(router="token"),
    dict(router="topk", top_k=2),
    dict(router="topk", top_k=1),
    dict(router="token", shared_a=True),
    dict(router="topk", top_k=2, shared_a=True),
    dict(router="topk", rank=1, experts=5, top_k=2),  # SMoRA: every rank an expert
]


@pytest.mark.parametrize("opts", ROUTERS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_forward_equals_per_token_oracle_and_gradients_agree(opts):
    cfg = rw.get_method("mole").Config(**{"rank": 2, "experts": 3, "alpha": 3.0, **opts})
    model, ad = one_layer(cfg)
    x = x_of(dtype=torch.float64).requires_grad_(True)
    out = model(x)
    ref = oracle(ad, x)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    params = [p for p in ad.parameters()] + [x]
    got = torch.autograd.grad((out * g).sum(), params)
    want = torch.autograd.grad((ref * g).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_topk_with_k_equal_to_all_experts_is_dense_routing():
    cfg = rw.get_method("mole").Config(rank=2, experts=4, router="topk", top_k=4)
    model, ad = one_layer(cfg, dtype=torch.float32)
    dense = copy.deepcopy(model)
    dense[0].adapters["default"].router = "token"
    x = x_of()
    with torch.no_grad():
        assert torch.equal(model(x), dense(x))
        # and a strict top-k differs (the test can tell them apart)
        ad.config = ad.config.replace(top_k=2)
        assert not torch.allclose(model(x), dense(x))


def lora_pair(n=3, ranks=(2, 3, 1), seed=0):
    """Model with LoRA adapters e0..e{n-1} of different ranks and scales, random non-zero factors."""
    model = net(seed)
    for i in range(n):
        rw.adapt(model, "lora", name=f"e{i}", rank=ranks[i], alpha=float(i + 1), targets=["q", "o"], seed=i)
        perturb(model, f"e{i}", seed=10 + i)
    return model


def lora_output(model, name, x):
    rw.set_active(model, name)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("router", ["layer", "token", "topk"])
def test_mixture_of_one_expert_equals_that_expert(router):
    model = lora_pair(1, ranks=(3,))
    x = x_of()
    want = lora_output(model, "e0", x)
    opts = {"top_k": 1} if router == "topk" else {}
    compose.mixture(model, ["e0"], "mix", router=router, **opts)
    assert rw.active_adapters(model) == ["mix"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-6)


def test_mixture_experts_are_the_inputs_and_start_as_their_mean():
    model = lora_pair()
    x = x_of()
    outs = [lora_output(model, f"e{i}", x) for i in range(3)]
    rw.set_active(model, None)
    with torch.no_grad():
        base_out = model(x)
    compose.mixture(model, ["e0", "e1", "e2"], "mix")  # layer gates 0: g = 1/3 in every layer
    # the mean of three updates in every layer is not the mean of three outputs (the net is non-linear):
    # compare the weight view, which is exact, and the frozen experts
    for _, layer in adapted_layers(model):
        want = sum(layer.delta_weight([f"e{i}"]) for i in range(3)) / 3
        torch.testing.assert_close(layer.delta_weight(["mix"]), want, atol=1e-6, rtol=1e-6)
        ad = layer.adapters["mix"]
        assert not any(p.requires_grad for p in [ad.experts_A, ad.experts_B])
        assert ad.gate_logits.requires_grad
    assert rw.parameter_count(model).trainable == 8 * 3  # only the gates train (MoLE)
    with torch.no_grad():
        assert not torch.allclose(model(x), base_out)
    assert all(not torch.allclose(o, base_out) for o in outs)


def test_masking_renormalizes_the_kept_weights():
    model = lora_pair()
    compose.mixture(model, ["e0", "e1", "e2"], "mix", router="token")
    perturb(model, "mix", seed=3)  # router weights only (experts are buffers: perturb them too, then keep)
    x = x_of()
    layers = [ad for _, ad in compose.mixture_layers(model, "mix")]
    ad = layers[0]
    xin = x.reshape(-1, 6)
    with torch.no_grad():
        weights, probs, _ = ad.route(xin)
        compose.mask_experts(model, "mix", drop=["e1"])
        masked, _, _ = ad.route(xin)
        keep = torch.tensor([1.0, 0.0, 1.0])
        torch.testing.assert_close(masked, weights * keep / (weights * keep).sum(-1, keepdim=True))
        # the layer output is the oracle with expert 1 removed and the others renormalized
        torch.testing.assert_close(model.layers[0].q(x), oracle(ad, x), atol=1e-6, rtol=1e-6)
        compose.mask_experts(model, "mix", keep=[0])
        torch.testing.assert_close(ad.route(xin)[0], torch.tensor([1.0, 0.0, 0.0]).expand(len(xin), 3))
        compose.mask_experts(model, "mix")  # all back on
        torch.testing.assert_close(ad.route(xin)[0], weights)
    with pytest.raises(ConfigError, match="every expert"):
        compose.mask_experts(model, "mix", keep=[])
    with pytest.raises(ConfigError, match="neither"):
        compose.mask_experts(model, "mix", drop=["nope"])
    assert bool(ad.expert_mask.all())


def switch_loss(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Fedus et al. 2021 eq. (4), with top-k dispatch: ``E · Σ_e f_e P_e``; ``f_e`` = share of the
    ``N·k`` assignments routed to ``e``, ``P_e`` = mean router probability."""
    n, e = probs.shape
    chosen = probs.topk(k, dim=-1).indices
    f = torch.stack([(chosen == i).any(-1).float().sum() for i in range(e)]) / (n * k)
    p = probs.mean(0)
    return e * (f * p).sum()


@pytest.mark.parametrize("k", [1, 2])
def test_load_balance_loss_is_the_switch_formula(k):
    model = net()
    rw.adapt(model, "mole", rank=2, experts=4, router="topk", top_k=k, balance=0.01, targets=["q"], seed=0)
    perturb(model, "default", seed=4)
    model.train()
    x = x_of()
    model(x)
    reg = rw.rank_regularization(model)
    # the oracle: each layer's router on the layer's own input, recorded by a hook
    model.eval()
    inputs = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, layer in adapted_layers(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    terms = []
    for n, layer in adapted_layers(model):
        ad = layer.adapters["default"]
        probs = torch.softmax(inputs[n].reshape(-1, 6) @ ad.router_weight.t(), dim=-1)
        terms.append(switch_loss(probs, k))
    torch.testing.assert_close(reg, 0.01 * torch.stack(terms).mean())
    assert reg.requires_grad
    assert rw.rank_regularization(model) is None  # consumed: one term per forward
    # perfectly balanced routing gives 1
    balanced = torch.full((8, 4), 0.1) + 0.6 * torch.eye(4).repeat(2, 1)
    assert float(switch_loss(balanced, 1)) == pytest.approx(1.0)


def test_layer_router_balance_is_moles_gating_loss():
    model = net()
    rw.adapt(model, "mole", rank=2, experts=3, balance=0.5, targets=["q"], seed=0)
    perturb(model, "default", seed=4)
    model.train()
    model(x_of())
    want = torch.stack([-torch.log(torch.softmax(layer.adapters["default"].gate_logits, 0)).sum()
                        for _, layer in adapted_layers(model)]).mean()
    torch.testing.assert_close(rw.rank_regularization(model), 0.5 * want)


def test_mola_schedule_gives_more_experts_to_higher_layers_and_reloads(tmp_path):
    model = net()
    rw.adapt(model, "mole", rank=2, router="topk", top_k=2, expert_schedule=[2, 4], targets=["q", "o"], seed=0)
    counts = {n: layer.adapters["default"].n_experts for n, layer in adapted_layers(model)}
    assert counts == {"layers.0.q": 2, "layers.0.o": 2, "layers.1.q": 2, "layers.1.o": 2,
                      "layers.2.q": 4, "layers.2.o": 4, "layers.3.q": 4, "layers.3.o": 4}
    perturb(model, "default")
    x = x_of()
    with torch.no_grad():
        want = model(x)
    rw.save(model, tmp_path / "mola")
    fresh = net()
    rw.load(fresh, tmp_path / "mola")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="at least top_k"):
        rw.adapt(net(), "mole", router="topk", top_k=3, expert_schedule=[2, 4], targets=["q"])


def test_token_routed_mixture_saves_and_reloads_with_its_mask(tmp_path):
    model = lora_pair()
    compose.mixture(model, ["e0", "e1", "e2"], "mix", router="topk", top_k=2)
    perturb(model, "mix", seed=9)
    compose.mask_experts(model, "mix", drop=[2])
    x = x_of()
    with torch.no_grad():
        want = model(x)
    rw.save(model, tmp_path / "mix", names="mix")
    fresh = net()
    rw.load(fresh, tmp_path / "mix")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, atol=0, rtol=0)
    ad = compose.mixture_layers(fresh, "mix")[0][1]
    assert ad.config.expert_names == ["e0", "e1", "e2"] and ad.expert_mask.tolist() == [True, True, False]


def test_input_dependent_mixture_has_no_weight_view_and_refuses_merge():
    model = net()
    rw.adapt(model, "mole", rank=2, router="token", targets=["q"], seed=0)
    perturb(model, "default")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="routes per token"):
        rw.merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_config_is_refused():
    Cfg = rw.get_method("mole").Config
    with pytest.raises(ConfigError, match="top_k=5 is more than the 4 experts"):
        Cfg(router="topk", top_k=5, experts=4)
    with pytest.raises(ConfigError, match="router"):
        Cfg(router="switch")
    with pytest.raises(ConfigError, match="expert_names"):
        Cfg(experts=2, expert_names=["a"])
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="top_k=3 is more than the 2 experts"):
        rw.adapt(model, "mole", router="topk", top_k=3, experts=4, targets=["q"],
                 module_overrides={"layers.0.q": {"experts": 2}})
    assert rw.core.api.adapter_state(model) == {}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("router", ["token", "topk"])
def test_token_routers_train_in_bf16_and_under_autocast(router):
    model = net(dtype=torch.bfloat16)
    rw.adapt(model, "mole", rank=2, router=router, balance=0.01, targets=["q", "o"], seed=0)
    perturb(model, "default", std=0.1)
    model.train()
    out = model(x_of(dtype=torch.bfloat16))
    loss = out.float().square().mean() + rw.rank_regularization(model)
    loss.backward()
    for p in rw.trainable_parameters(model):
        assert p.dtype == torch.bfloat16 and p.grad is not None and torch.isfinite(p.grad).all()
    model32 = net()
    rw.adapt(model32, "mole", rank=2, router=router, targets=["q", "o"], seed=0)
    perturb(model32, "default", std=0.1)
    with torch.no_grad():
        ref = model32(x_of())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model32(x_of())
    assert (got.float() - ref).abs().max() < 0.05 * (ref.abs().max() + 1)
