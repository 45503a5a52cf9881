"""rankwise.compose: mixtures over trained adapters, collapse to a LoRA, bad input leaves the model alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise import compose
from rankwise.core.api import adapted_layers, adapter_state
from rankwise.errors import AdapterExistsError, AdapterNotFoundError, ConfigError, ShapeMismatchError

pytestmark = pytest.mark.usefixtures("single_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 6)
        self.v = nn.Linear(6, 9)
        self.head = nn.Linear(9, 3)

    def forward(self, x):
        return self.head(torch.relu(self.v(self.q(x))))


def base(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def randomize(model, name, seed, std=0.4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            if name in layer.adapters:
                for p in [*layer.adapters[name].parameters(), *layer.adapters[name].buffers()]:
                    if p.is_floating_point():
                        p.copy_(torch.randn(p.shape, generator=g).to(p) * std)


def with_adapters():
    model = base()
    rw.adapt(model, "lora", name="a", rank=2, alpha=4.0, targets=["q", "v"], seed=1)
    rw.adapt(model, "lora", name="b", rank=3, alpha=1.5, targets=["q", "v"], seed=2)
    rw.adapt(model, "dora", name="c", rank=2, targets=["q"], seed=3)  # another method, on q only
    for i, n in enumerate("abc"):
        randomize(model, n, 10 + i)
    return model


def x_of():
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(0))


def fingerprint(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, sorted(adapter_state(model)),
            {n: (list(lay.active), list(lay.merged)) for n, lay in adapted_layers(model)})


def same(a, b):
    return (a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1:] == b[1:])


def test_experts_are_exactly_the_inputs_of_any_method_and_a_missing_one_is_zero():
    model = with_adapters()
    compose.mixture(model, ["a", "b", "c"], "mix")
    layers = dict(adapted_layers(model))
    for mname in ("q", "v"):
        ad = layers[mname].adapters["mix"]
        r = ad.rank
        for e, n in enumerate("abc"):
            d = (ad.experts_B[:, e * r:(e + 1) * r] @ ad.experts_A[e * r:(e + 1) * r]) * ad.scale
            want = layers[mname].delta_weight([n]) if n in layers[mname].adapters else torch.zeros_like(d)
            torch.testing.assert_close(d, want, atol=1e-5, rtol=1e-5)
    # the rank of each module: the largest input rank there (DoRA rescales every column, so its ΔW has full rank)
    dora_rank = int(torch.linalg.matrix_rank(layers["q"].delta_weight(["c"])))
    assert (layers["q"].adapters["mix"].rank, layers["v"].adapters["mix"].rank) == (max(3, dora_rank), 3)


def test_collapse_of_layer_gates_is_a_lora_with_the_same_outputs(tmp_path):
    from peft import PeftModel

    model = with_adapters()
    compose.mixture(model, ["a", "b", "c"], "mix")
    with torch.no_grad():
        for _, ad in compose.mixture_layers(model, "mix"):
            ad.gate_logits.copy_(torch.tensor([1.5, -0.3, 0.4]))
    compose.mask_experts(model, "mix", drop="b")
    x = x_of()
    with torch.no_grad():
        want = model(x)
    compose.collapse(model, "mix", "flat")
    assert rw.active_adapters(model) == ["flat"]
    assert adapter_state(model)["flat"]["config"].method == "lora"
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    # a plain LoRA: it merges and exports to PEFT, which loads it
    rw.export_peft(model, tmp_path / "peft", name="flat")
    pm = PeftModel.from_pretrained(base(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(pm(x), want, atol=1e-5, rtol=1e-5)
        rw.merge(model)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_a_zero_router_collapses_and_a_live_one_is_refused():
    model = with_adapters()
    compose.mixture(model, ["a", "b"], "mix", router="token")
    x = x_of()
    before = fingerprint(model)
    with pytest.raises(ConfigError, match="routes per token"):
        compose.collapse(model, "mix")
    assert same(before, fingerprint(model))
    with torch.no_grad():
        for _, ad in compose.mixture_layers(model, "mix"):
            ad.router_weight.zero_()
        want = model(x)
    compose.collapse(model, "mix")
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    # ... and the collapsed update is the mean of the two experts
    for _, layer in adapted_layers(model):
        mean = (layer.delta_weight(["a"]) + layer.delta_weight(["b"])) / 2
        torch.testing.assert_close(layer.delta_weight(["mix_lora"]), mean, atol=1e-5, rtol=1e-5)


def test_mixture_trains_only_its_router_with_rankwise_train_loop():
    model = with_adapters()
    compose.mixture(model, ["a", "b", "c"], "mix", router="topk", top_k=2, balance=0.05)
    params = rw.trainable_parameters(model)
    assert {p.shape for p in params} == {torch.Size([3, 8]), torch.Size([3, 6])}
    frozen = {n: t.clone() for n, t in model.state_dict().items() if "experts_" in n}
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    x = x_of()
    for _ in range(3):
        loss = model(x).square().mean()
        reg = rw.rank_regularization(model)
        assert reg is not None and reg.requires_grad
        (loss + reg).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in frozen.items())


@pytest.mark.parametrize("call,error,match", [
    (lambda m: compose.mixture(m, [], "mix"), ConfigError, "empty list"),
    (lambda m: compose.mixture(m, ["a", "zz"], "mix"), AdapterNotFoundError, "no adapter 'zz'"),
    (lambda m: compose.mixture(m, ["a", "a"], "mix"), ConfigError, "twice"),
    (lambda m: compose.mixture(m, ["a", "b"], "a"), AdapterExistsError, "already has"),
    (lambda m: compose.mixture(m, ["a", "b"], "mix", router="topk", top_k=3), ConfigError, "top_k=3"),
    (lambda m: compose.mixture(m, ["a", "b"], "mix", rank=4), ConfigError, "no option"),
    (lambda m: compose.mixture(m, "a", "mix"), ConfigError, "list of adapter names"),
    (lambda m: compose.collapse(m, "a"), ConfigError, "not a mixture"),
    (lambda m: compose.mask_experts(m, "nope"), AdapterNotFoundError, "no adapter 'nope'"),
    (lambda m: compose.preset("mixlor"), ConfigError, "unknown mixture preset"),
])
def test_bad_input_is_refused_and_the_model_is_unchanged(call, error, match):
    model = with_adapters()
    before = fingerprint(model)
    with pytest.raises(error, match=match):
        call(model)
    assert same(before, fingerprint(model))


def test_experts_of_another_layer_shape_are_refused_before_any_change():
    model = with_adapters()
    layer = dict(adapted_layers(model))["v"]
    layer.adapters["b"].lora_A = nn.Parameter(torch.zeros(3, 4))  # made for a 4-input layer, not 6
    before = fingerprint(model)
    with pytest.raises(ShapeMismatchError, match="module 'v'"):
        compose.mixture(model, ["a", "b"], "mix")
    assert same(before, fingerprint(model))


def test_presets_build_their_mixtures():
    x = x_of()
    for name in compose.PRESETS:
        model = base()
        opts = compose.preset(name, rank=1 if name == "smora" else 2)
        if name == "smora":
            opts["experts"] = 6
        rw.adapt(model, "mole", targets=["q", "v"], seed=0, **opts)
        randomize(model, "default", 1)
        with torch.no_grad():
            assert torch.isfinite(model(x)).all()
        ad = compose.mixture_layers(model, "default")[0][1]
        assert ad.router == opts["router"]
