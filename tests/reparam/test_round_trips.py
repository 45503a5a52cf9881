"""Round trips of issue 19's registered methods (``intrinsic``, ``sara``, ``pego``, ``mask_tuning``, ``pst``),
the ones PyTorch parametrizations are known to break: deepcopy, pickle, ``torch.compile``, DDP,
``rw.save`` → ``rw.load``, and merge + unadapt baking the update into plain weights.

Every test runs on one small MLP adapted on both linears, with every trainable tensor perturbed so the
update is non-zero (and, for ``mask_tuning`` and ``pst``, the binary mask really drops entries). The oracle
is always the adapted eager model itself (outputs, gradients, an SGD step) or, for merge, the base
weights plus the adapter's own ``ΔW`` — properties the round trip must keep, whatever the method computes.
"""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
import torch.distributed as dist
from torch import nn

import rankwise as rw
from rankwise.core.adapted import AdaptedLayer
from rankwise.core.api import adapter_state

pytestmark = pytest.mark.usefixtures("single_thread")

# small options per method; every one has a non-trivial update once its tensors are perturbed below
OPTIONS = {
    "intrinsic": {"dim": 24},
    "sara": {"fraction": 0.25},
    "pego": {"rank": 2, "num_loras": 2},
    "mask_tuning": {},
    "pst": {"rank": 2, "score_rank": 2, "sparsity": 0.3, "total_steps": 4},
}
METHODS = sorted(OPTIONS)
PLAIN_KEYS = {"0.weight", "0.bias", "2.weight", "2.bias"}


def _base() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(seed))


def _adapted(method: str) -> tuple[nn.Sequential, nn.Sequential]:
    """``(base, model)``: a copy of the base model, and the same model adapted with ``method`` on both
    linears, trained tensors moved off their init (so ``ΔW ≠ 0``), in eval mode."""
    base = _base()
    model = copy.deepcopy(base)
    rw.adapt(model, method, targets=["0", "2"], seed=0, **OPTIONS[method])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in rw.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    if method == "pst":  # the end of the sparsity schedule: the Top-k mask is in force
        for layer in (model[0], model[2]):
            layer.adapters["default"].finish_warmup()
    return base.eval(), model.eval()


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (a compiled model's names without its ``_orig_mod.`` prefix)."""
    return {n.removeprefix("_orig_mod."): p for n, p in model.named_parameters() if p.requires_grad}


def _grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in _trainable(model).items()}


def test_the_updates_are_not_trivial():
    """The fixture really changes every adapted layer (else the round trips below would prove nothing)."""
    for method in METHODS:
        base, model = _adapted(method)
        for i in (0, 2):
            assert model[i].delta_weight().abs().max() > 1e-4, (method, i)
        assert (model(_x()) - base(_x())).abs().max() > 1e-4, method
    _, mt = _adapted("mask_tuning")
    assert (mt[0].delta_weight() == -mt[0].base.weight).any()  # some entries masked out
    _, pst = _adapted("pst")
    assert pst[0].adapters["default"].sparsity == pytest.approx(0.3)


# ---- (1) deepcopy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_deepcopy_is_equal_and_independent(method):
    _, model = _adapted(method)
    x = _x()
    ref = model(x).detach()
    keys = set(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = copy.deepcopy(model)
    assert torch.equal(other(x), ref)
    assert set(other.state_dict()) == keys
    assert adapter_state(other)["default"]["config"] == adapter_state(model)["default"]["config"]
    # train the copy: the original's tensors (and output) do not move
    other.train()
    opt = torch.optim.SGD(rw.trainable_parameters(other), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        other(x).square().mean().backward()
        opt.step()
    assert not torch.equal(other.eval()(x), ref)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(model(x), ref)
    if method == "intrinsic":  # θ is shared by both layers in the copy too, and not with the original
        shared = other[0].adapters["default"].vector
        assert other[2].adapters["default"].vector is shared
        assert shared is adapter_state(other)["default"]["shared"]
        assert shared is not model[0].adapters["default"].vector


# ---- (2) pickle --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_pickle_round_trip(method):
    _, model = _adapted(method)
    x = _x()
    ref, grads = _grads(model, x)
    model.zero_grad(set_to_none=True)
    other = pickle.loads(pickle.dumps(model))
    assert torch.equal(other(x), ref)
    assert set(other.state_dict()) == set(model.state_dict())
    out, g = _grads(other, x)
    assert g.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(g[n], grads[n], atol=0, rtol=0)


# ---- (3) torch.compile -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_torch_compile_matches_eager(method):
    """aot_eager runs dynamo and AOT autograd (the part that traces the adapters) without codegen: the
    compiled forward and its gradients equal eager, and at least one graph was really compiled."""
    from torch._dynamo.testing import CompileCounterWithBackend

    _, model = _adapted(method)
    x = _x()
    ref, grads = _grads(model, x)
    keys = set(model.state_dict())
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=False)
    out, got = _grads(compiled, x)
    assert counter.frame_count >= 1
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert got.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(got[n], grads[n], atol=1e-6, rtol=1e-6)
    assert set(model.state_dict()) == keys
    assert {k.removeprefix("_orig_mod.") for k in compiled.state_dict()} == keys
    torch._dynamo.reset()


def test_torch_compile_inductor_mask_tuning():
    """The default backend (inductor: generated C++ kernels) on the method whose straight-through
    ``autograd.Function`` is the least ordinary thing to compile; one method only, it is slow on CPU
    (about 13 s with a cold cache here)."""
    _, model = _adapted("mask_tuning")
    x = _x()
    ref, grads = _grads(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    out, got = _grads(compiled, x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert got.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(got[n], grads[n], atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


# ---- (4) DDP -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_ddp_step_equals_plain_step(method, tmp_path):
    """DDP (gloo, world size 1) around an adapted model: two SGD steps give the same losses and the same
    trained tensors as on the unwrapped model (the second step would fail if DDP missed a gradient)."""
    _, model = _adapted(method)
    twin = copy.deepcopy(model)
    x = _x()

    def step(m, params):
        opt = torch.optim.SGD(params, lr=0.1)
        losses = []
        for _ in range(2):
            opt.zero_grad()
            loss = m(x).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    model.train()
    twin.train()
    ref = step(model, rw.trainable_parameters(model))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(twin)
        loss = step(ddp, rw.trainable_parameters(twin))
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    want, got = _trainable(model), _trainable(twin)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-6)
    assert set(twin.state_dict()) == set(model.state_dict())


# ---- (5) rw.save / rw.load ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(method, tmp_path):
    base, model = _adapted(method)
    x = _x()
    ref = model(x)
    rw.save(model, tmp_path / "adapter")
    fresh = copy.deepcopy(base)
    rw.load(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(x), ref)
    assert set(fresh.state_dict()) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


# ---- (6) merge, then unadapt, bakes the weights in ----------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_merge_and_unadapt_bake_the_update_in(method):
    base, model = _adapted(method)
    x = _x()
    ref = model(x).detach()
    want = {i: base[i].weight + model[i].delta_weight().detach() for i in (0, 2)}
    rw.merge(model)
    torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-5)
    plain = rw.unadapt(model, merge=True)
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    assert set(plain.state_dict()) == PLAIN_KEYS
    assert all(type(plain[i].weight) is nn.Parameter for i in (0, 2))
    for i in (0, 2):
        torch.testing.assert_close(plain[i].weight, want[i], atol=1e-6, rtol=1e-6)
        assert torch.equal(plain[i].bias, base[i].bias)
    torch.testing.assert_close(plain(x), ref, atol=1e-6, rtol=1e-5)
    assert adapter_state(plain) == {}


@pytest.mark.parametrize("method", METHODS)
def test_unadapt_without_merge_is_the_base(method):
    """The other "remove": ``rw.unadapt(model)`` without ``merge`` drops the update (even one merged
    before) and returns the exact base model."""
    base, model = _adapted(method)
    x = _x()
    rw.merge(model)
    plain = rw.unadapt(model)
    assert set(plain.state_dict()) == PLAIN_KEYS
    for k, v in base.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[k], v, atol=1e-6, rtol=0)
    torch.testing.assert_close(plain(x), base(x), atol=1e-6, rtol=1e-5)
