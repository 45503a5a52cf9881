"""weight_compander: the derived function ``α tanh(γ v / α)`` (odd, bounded, slope γ at 0, a compander),
the parametrization's forward against the formula transcribed here, its inverse (the model is unchanged
at registration), learned hyperparameters, and the round trips parametrizations are known to break:
deepcopy, pickle, torch.compile, DDP, state_dict keys, save → load, remove."""

from __future__ import annotations

import copy
import io
import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import rankwise as rw
from rankwise.errors import ConfigError, TargetError
from rankwise.reparam.weight_compander import WeightCompander, compand, expand

pytestmark = pytest.mark.usefixtures("single_thread")


def f_paper(v, alpha, gain):
    """The derived function, transcribed independently: α·tanh(γv/α) = α(e^{2γv/α} − 1)/(e^{2γv/α} + 1)."""
    e = torch.exp(2 * gain * v.double() / alpha)
    return alpha * (e - 1) / (e + 1)


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc1 = nn.Linear(3 * 4 * 4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.conv(x)).flatten(1)
        return self.fc2(F.relu(self.fc1(h)))


def _x(seed=1):
    return torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(seed))


# ---- the function ------------------------------------------------------------------------------
def test_function_is_odd_bounded_increasing_and_expands_near_zero():
    v = torch.linspace(-20, 20, 4001, dtype=torch.float64)
    alpha, gain = 0.7, 2.5
    w = compand(v, alpha, gain)
    torch.testing.assert_close(w, f_paper(v, alpha, gain), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(compand(-v, alpha, gain), -w, rtol=0, atol=0)  # odd
    assert w.abs().max() <= alpha and w.abs().max() > 0.999 * alpha  # bounded, and the bound is reached
    assert (w.diff() >= 0).all() and (w.diff()[1800:2200] > 0).all()  # increasing (strictly on [-2, 2])
    # slope γ at 0 (a central difference) and |f(v)| > |v| just off zero (expansion), < |v| far out (compression)
    h = 1e-6
    slope = (compand(torch.tensor(h, dtype=torch.float64), alpha, gain)
             - compand(torch.tensor(-h, dtype=torch.float64), alpha, gain)) / (2 * h)
    assert math.isclose(float(slope), gain, rel_tol=1e-9)
    small, large = torch.tensor([0.01, 0.05], dtype=torch.float64), torch.tensor([2.0, 5.0], dtype=torch.float64)
    assert (compand(small, alpha, gain) > small).all() and (compand(large, alpha, gain) < large).all()
    # the inverse on |w| < α
    ws = torch.linspace(-0.69, 0.69, 101, dtype=torch.float64)
    torch.testing.assert_close(compand(expand(ws, alpha, gain), alpha, gain), ws, rtol=1e-12, atol=1e-12)


def test_gradient_is_gain_near_zero_and_vanishes_at_the_bound():
    """``∂W/∂V = γ sech²(γV/α)``: small raw weights get γ× the gradient, saturated ones almost none."""
    v = torch.tensor([0.0, 1e-4, 3.0], dtype=torch.float64, requires_grad=True)
    alpha, gain = 0.5, 3.0
    (g,) = torch.autograd.grad(compand(v, alpha, gain).sum(), v)
    want = gain / torch.cosh(gain * v.detach() / alpha) ** 2
    torch.testing.assert_close(g, want)
    assert g[0] == pytest.approx(gain) and g[2] < 1e-6


# ---- the parametrization on a model -------------------------------------------------------------
@pytest.mark.parametrize("learn", [False, True])
def test_apply_keeps_the_model_and_forward_is_the_formula(learn):
    net = Net()
    x = _x()
    w0 = {n: net.get_submodule(n).weight.detach().clone() for n in ("conv", "fc1", "fc2")}
    ref = net(x)
    rw.reparam.apply(net, "weight_compander", bound=3.0, gain=2.0, learn=learn)
    torch.testing.assert_close(net(x), ref, atol=1e-6, rtol=1e-5)  # W = f(f⁻¹(W0)) = W0
    for n, w in w0.items():
        m = net.get_submodule(n)
        assert parametrize.is_parametrized(m, "weight")
        alpha = 3.0 * float(w.abs().max())
        v = m.parametrizations.weight.original
        torch.testing.assert_close(m.weight, f_paper(v, alpha, 2.0).float(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(m.weight, w, atol=1e-6, rtol=1e-5)
    # move the raw weights: the forward follows the formula, not the old weights
    with torch.no_grad():
        for n in w0:
            net.get_submodule(n).parametrizations.weight.original.mul_(4.0)
    for n, w in w0.items():
        m = net.get_submodule(n)
        alpha = 3.0 * float(w.abs().max())
        assert m.weight.abs().max() < alpha
        torch.testing.assert_close(m.weight, f_paper(m.parametrizations.weight.original, alpha, 2.0).float(),
                                   atol=1e-6, rtol=1e-6)


def test_learned_hyperparameters_get_gradients_and_train():
    net = Net()
    rw.reparam.apply(net, "weight_compander", learn=True)
    names = {n for n, _ in net.named_parameters()}
    assert "fc1.parametrizations.weight.0.log_alpha" in names and "fc1.parametrizations.weight.0.log_gain" in names
    net(_x()).square().mean().backward()
    for n, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    fixed = Net()
    rw.reparam.apply(fixed, "weight_compander", learn=False)
    assert not any("log_alpha" in n for n, _ in fixed.named_parameters())
    assert "fc1.parametrizations.weight.0.log_alpha" in fixed.state_dict()  # a buffer: saved, not trained


def test_bfloat16_weights():
    net = Net().to(torch.bfloat16)
    x = _x().to(torch.bfloat16)
    ref = net(x).float()
    rw.reparam.apply(net, "weight_compander", gain=1.5)
    assert net.fc1.weight.dtype == torch.bfloat16
    out = net(x).float()
    assert (out - ref).abs().max() <= 0.05 * (ref.abs().max() + 1)


# ---- bad input leaves the model unchanged ----------------------------------------------------------
@pytest.mark.parametrize("kw,err,words", [
    ({"gain": 0.0}, ConfigError, "gain"),
    ({"bound": 1.0}, ConfigError, "bound > 1"),
    ({"alpha": 1e-4}, ConfigError, "beyond the bound"),
    ({"nonsense": 1}, ConfigError, "no option 'nonsense'"),
    ({"targets": "nothing_here"}, TargetError, "no linear"),
])
def test_bad_input_is_refused_before_any_change(kw, err, words):
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(err, match=words):
        rw.reparam.apply(net, "weight_compander", **kw)
    assert not any(parametrize.is_parametrized(m) for m in net.modules())
    assert net.state_dict().keys() == before.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    assert rw.reparam.reparametrized(net) is None


def test_unknown_name_and_double_apply():
    net = Net()
    with pytest.raises(ConfigError, match="weight_compander"):
        rw.reparam.apply(net, "weight_compandr")
    rw.reparam.apply(net, "weight_compander", targets=r"fc")
    assert not parametrize.is_parametrized(net.conv) and parametrize.is_parametrized(net.fc1)
    with pytest.raises(ConfigError, match="already"):
        rw.reparam.apply(net, "weight_compander")


# ---- round trips -------------------------------------------------------------------------------------
def _trained(learn=True):
    net = Net()
    rw.reparam.apply(net, "weight_compander", learn=learn)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net


KEYS = {"conv.bias", "fc1.bias", "fc2.bias"} | {f"{m}.parametrizations.weight.{s}" for m in ("conv", "fc1", "fc2")
                                                 for s in ("original", "0.log_alpha", "0.log_gain")}


def test_state_dict_keys_are_stable():
    net = _trained()
    assert set(net.state_dict()) == KEYS
    assert set(copy.deepcopy(net).state_dict()) == KEYS
    assert set(pickle.loads(pickle.dumps(net)).state_dict()) == KEYS


def test_deepcopy_and_pickle_round_trip():
    net, x = _trained(), _x()
    ref = net(x)
    for other in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert torch.equal(other(x), ref)
        assert parametrize.is_parametrized(other.fc1, "weight")
        assert other.fc1.parametrizations.weight.original is not net.fc1.parametrizations.weight.original
        other(x).sum().backward()
        assert other.fc1.parametrizations.weight.original.grad is not None
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    fresh = Net(seed=5)
    rw.reparam.apply(fresh, "weight_compander", learn=True)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), ref)


def test_torch_compile_matches_eager_and_keeps_keys():
    """torch.compile traces through the parametrization (dynamo + AOT autograd; the aot_eager backend
    keeps the test fast on CPU): same outputs and gradients, and the wrapped module's own keys unchanged."""
    net, x = _trained(), _x()
    ref = net(x)
    ref.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    out.square().sum().backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)
    assert set(net.state_dict()) == KEYS
    assert {k.removeprefix("_orig_mod.") for k in compiled.state_dict()} == KEYS


def test_ddp_single_process_matches_plain(tmp_path):
    """DDP (gloo, world size 1) wraps a reparameterized model: same forward, gradients on the raw
    tensors and the learned hyperparameters (parameters created by the parametrization are seen by DDP)."""
    import torch.distributed as dist

    net, x = _trained(), _x()
    ref = net(x)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(net)
        out = ddp(x)
        torch.testing.assert_close(out, ref)
        out.square().sum().backward()
        for n, p in net.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    finally:
        dist.destroy_process_group()


def test_save_load_round_trip(tmp_path):
    net, x = _trained(), _x()
    ref = net(x)
    rw.reparam.save(net, tmp_path / "wc")
    assert sorted(os.listdir(tmp_path / "wc")) == ["model.safetensors", "reparam.json"]
    fresh = Net(seed=9)
    rw.reparam.load(fresh, tmp_path / "wc")
    assert torch.equal(fresh(x), ref)
    assert set(fresh.state_dict()) == KEYS
    assert rw.reparam.reparametrized(fresh)["options"]["learn"] is True
    # onto another architecture: refused, the model unchanged
    other = nn.Sequential(nn.Linear(3, 3))
    before = other[0].weight.detach().clone()
    with pytest.raises(TargetError):
        rw.reparam.load(other, tmp_path / "wc")
    assert torch.equal(other[0].weight, before) and not parametrize.is_parametrized(other[0])


def test_load_with_wrong_tensors_changes_nothing(tmp_path):
    net = _trained()
    rw.reparam.save(net, tmp_path / "wc")

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.fc2 = nn.Linear(8, 4)

    fresh = Wider()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(TargetError, match="do not fit"):
        rw.reparam.load(fresh, tmp_path / "wc")
    assert rw.reparam.reparametrized(fresh) is None
    assert fresh.state_dict().keys() == before.keys()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


def test_remove_bakes_the_weights_in():
    net, x = _trained(), _x()
    ref = net(x)
    baked = {n: net.get_submodule(n).weight.detach().clone() for n in ("conv", "fc1", "fc2")}
    rw.reparam.remove(net)
    assert not any(parametrize.is_parametrized(m) for m in net.modules())
    assert set(net.state_dict()) == {"conv.weight", "conv.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    for n, w in baked.items():
        assert torch.equal(net.get_submodule(n).weight, w)
        assert type(net.get_submodule(n).weight) is nn.Parameter
    assert torch.equal(net(x), ref)
    assert rw.reparam.reparametrized(net) is None
    with pytest.raises(ConfigError, match="no reparameterization"):
        rw.reparam.remove(net)


def test_parametrization_module_alone():
    """``WeightCompander`` used directly with ``register_parametrization`` (no rankwise wrapper)."""
    lin = nn.Linear(4, 3)
    w = lin.weight.detach().clone()
    parametrize.register_parametrization(lin, "weight", WeightCompander(alpha=1.0, gain=2.0))
    torch.testing.assert_close(lin.weight, w, atol=1e-6, rtol=1e-6)
    lin.weight = torch.full((3, 4), 0.25)  # assignment goes through right_inverse
    torch.testing.assert_close(lin.weight, torch.full((3, 4), 0.25), atol=1e-6, rtol=1e-6)
    with pytest.raises(ConfigError, match="beyond the bound"):
        lin.weight = torch.full((3, 4), 1.5)
