"""Loading a saved adapter into an FSDP2-sharded model (issue 18: "loading before or after wrapping").

The adapter is saved once by one process (LoRA and DoRA, every tensor moved off its init). Two CPU
processes (gloo) then load it two ways:

a. before wrapping: ``rw.load`` onto the plain base, then ``fully_shard``;
b. after wrapping, the big-model recipe (torchtune's LoRA + FSDP2 one): build and ``rw.adapt`` on the
   meta device, ``fully_shard``, ``to_empty``, a forward on placeholder values (it fills DoRA's ``‖W0‖²``
   cache), the base weights copied shard by shard from a full state dict (``p.copy_(shard_like(full, p))``,
   no ``torch.distributed.checkpoint``), then ``rw.load(..., overwrite=True)`` into the existing, sharded
   adapter parameters, and 2 AdamW steps with the optimizer built before the load.

The oracle is one process: the plain base with the adapter loaded by ``rw.load`` (its forward, its
tensors, the same 2 steps on the whole batch; each rank takes half of it and FSDP2 averages the
gradients). Tolerance 1e-6 (float32 sums in another order); the saved-back tensors are bitwise equal.
The refusals of ``overwrite=True`` (another rank, method, modules; a merged adapter; a meta base) are
checked in one process: the model is left bitwise unchanged.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from _gloo import EPILOGUE, PREAMBLE, run_two
from safetensors.torch import load_file

import rankwise as rw
from rankwise.core.api import active_adapters, adapter_state
from rankwise.errors import AdapterExistsError, ConfigError

SETUP = textwrap.dedent("""
    import torch
    from torch import nn
    import rankwise as rw

    STEPS = 2
    METHODS = ("lora", "dora")

    def batch():
        g = torch.Generator().manual_seed(1)
        return torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))

    def adapter(m):
        return {n: p for n, p in m.named_parameters() if ".adapters." in n}

    def loss_of(m, x, y):
        return (m(x) - y).square().mean()
""")

WORKER = SETUP + PREAMBLE + textwrap.dedent("""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from rankwise.core.distributed import shard_like

    mesh = init_device_mesh("cpu", (2,))

    def shard(m):  # every adapted layer its own unit, then the root
        for layer in (m[0], m[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        return m

    def all_sharded(params):
        return torch.tensor(float(bool(params) and all(isinstance(p, DTensor) for p in params.values())))

    for method in METHODS:
        saved = f"{out}/{method}"

        # a. before wrapping
        m = shard(rw.load(build(), saved))
        results[f"before/{method}/sharded"] = all_sharded(adapter(m))
        with torch.no_grad():
            results[f"before/{method}/out"] = m(x)
        rw.save(m, f"{out}/before_{method}")  # every rank: gathered, rank 0 writes

        # b. after wrapping: meta-device model, sharded, materialized, base then adapter loaded
        with torch.device("meta"):
            m = build()
            rw.adapt(m, method, rank=4, targets=["0", "2"])
        shard(m)
        m.to_empty(device="cpu")
        params = adapter(m)
        opt = torch.optim.AdamW(params.values(), lr=1e-2)  # built before the load
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(0.5)
            m(x)  # caches of W0 (DoRA's row norms) now hold these placeholder values
            full = build().state_dict()
            for n, p in m.named_parameters():
                if ".adapters." not in n:
                    p.copy_(shard_like(full[n.replace(".base.", ".")], p))
        rw.load(m, saved, overwrite=True, trainable=True)
        now = adapter(m)
        same = set(now) == set(params) and all(now[n] is p for n, p in params.items())
        results[f"after/{method}/same_params"] = torch.tensor(float(same))
        results[f"after/{method}/sharded"] = all_sharded(now)
        with torch.no_grad():
            results[f"after/{method}/out"] = m(x)
        rw.save(m, f"{out}/after_{method}")
        for _ in range(STEPS):
            loss_of(m, xs, ys).backward()
            opt.step()
            opt.zero_grad()
        results.update({f"after/{method}/trained/{n}": p.full_tensor().detach() for n, p in now.items()})
""") + EPILOGUE


def _env() -> dict:
    env: dict = {}
    exec(compile(SETUP, "setup", "exec"), env)
    return env


def _save_adapter(env: dict, method: str, path, rank: int = 4) -> None:
    """The adapter the tests load: on the seeded base, every tensor moved off its init (B ≠ 0, m ≠ ‖W0‖)."""
    m = env["build"]()
    rw.adapt(m, method, rank=rank, targets=["0", "2"], seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for p in env["adapter"](m).values():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
    rw.save(m, path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_load")
    env = _env()
    for method in env["METHODS"]:
        _save_adapter(env, method, tmp / method)
    return tmp


@pytest.fixture(scope="module")
def distributed(saved):
    return run_two(WORKER, saved)[0]


def _oracle(saved, method: str):
    """One process: the plain base with the adapter loaded by rw.load; its output, then 2 AdamW steps
    on the whole batch."""
    env = _env()
    x, y = env["batch"]()
    m = rw.load(env["build"](), saved / method, trainable=True)
    with torch.no_grad():
        out = m(x)
    opt = torch.optim.AdamW(env["adapter"](m).values(), lr=1e-2)
    for _ in range(env["STEPS"]):
        env["loss_of"](m, x, y).backward()
        opt.step()
        opt.zero_grad()
    return out, {n: p.detach() for n, p in env["adapter"](m).items()}


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_sharded_model_with_loaded_adapter_matches_one_process(saved, distributed, when, method):
    """Before wrapping (load, then fully_shard) and after (meta recipe, overwrite=True): the adapter is
    sharded, the FSDP2 forward equals one process's, and rw.save of the sharded model (every rank)
    gives back the file's tensors bitwise. For DoRA the forward run on placeholder weights before the
    base was loaded left no stale ‖W0‖² behind."""
    results = distributed
    want_out, _ = _oracle(saved, method)
    assert float(results[f"{when}/{method}/sharded"]) == 1.0
    torch.testing.assert_close(results[f"{when}/{method}/out"], want_out, rtol=0, atol=1e-6)
    original = load_file(saved / method / "adapter_model.safetensors")
    back = load_file(saved / f"{when}_{method}" / "adapter_model.safetensors")
    assert set(back) == set(original) and original
    for k, t in original.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_overwrite_keeps_the_parameters_an_optimizer_holds(saved, distributed, method):
    """After wrapping: the load copies into the same DTensor parameters, so AdamW built before it
    trains the loaded values — 2 steps on 2 processes equal 2 steps in one."""
    results = distributed
    assert float(results[f"after/{method}/same_params"]) == 1.0
    _, want = _oracle(saved, method)
    got = {k.split("/", 3)[3]: v for k, v in results.items() if k.startswith(f"after/{method}/trained/")}
    assert set(got) == set(want) and got
    for name, p in want.items():
        torch.testing.assert_close(got[name], p, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    loaded = load_file(saved / method / "adapter_model.safetensors")
    assert not torch.equal(want["0.adapters.default.lora_B"], loaded["default/0/lora_B"])  # it trained


# ---- one process ------------------------------------------------------------------------------------------
def _same(now: dict, before: dict) -> bool:
    return set(now) == set(before) and all(now[n] is p for n, p in before.items())


def test_overwrite_in_one_process(saved):
    """The existing adapter takes the file's values in place (same objects, values bitwise the file's,
    forward equal to a plain rw.load); trainable=False freezes it, trainable=True keeps its flags."""
    env = _env()
    x, _ = env["batch"]()
    m = rw.adapt(env["build"](), "lora", rank=4, targets=["0", "2"], seed=5)
    params = env["adapter"](m)
    rw.load(m, saved / "lora", overwrite=True, trainable=True)
    assert _same(env["adapter"](m), params) and all(p.requires_grad for p in params.values())
    file = load_file(saved / "lora" / "adapter_model.safetensors")
    for n, p in params.items():
        layer, _, _, pname = n.split(".")
        assert torch.equal(p.detach(), file[f"default/{layer}/{pname}"]), n
    with torch.no_grad():
        torch.testing.assert_close(m(x), rw.load(env["build"](), saved / "lora")(x), rtol=0, atol=0)
    rw.load(m, saved / "lora", overwrite=True)
    assert _same(env["adapter"](m), params) and not any(p.requires_grad for p in params.values())


def _state(m):
    return ({k: v.clone() for k, v in m.state_dict().items()}, [p.requires_grad for p in m.parameters()],
            sorted(adapter_state(m)), active_adapters(m), repr(m))


@pytest.mark.parametrize("change, error, match", [
    (dict(rank=8), ConfigError, r"adapter 'default'.*differ in config: rank=4 in the file, 8 in the model"),
    (dict(method="dora"), ConfigError, r"differ in method: 'dora' in the model, 'lora' in the file"),
    (dict(targets=["0"]), ConfigError, r"adapt different modules: only in the file \['2'\], only in the model \[\]"),
    (dict(alpha=8), ConfigError, r"alpha=None in the file, 8 in the model"),
    (dict(merge=True), ConfigError, r"'default' is merged into module '0'.*rw.unmerge"),
    (dict(overwrite=False), AdapterExistsError, r"already has an adapter 'default'.*overwrite=True"),
])
def test_overwrite_refuses_another_adapter_and_changes_nothing(saved, change, error, match):
    env = _env()
    change = dict(change)
    method, merge, overwrite = change.pop("method", "lora"), change.pop("merge", False), change.pop("overwrite", True)
    m = rw.adapt(env["build"](), method, **{"rank": 4, "targets": ["0", "2"], "seed": 5, **change})
    if merge:
        rw.merge(m)
    before = _state(m)
    with pytest.raises(error, match=match):
        rw.load(m, saved / "lora", overwrite=overwrite)
    after = _state(m)
    assert set(after[0]) == set(before[0]) and all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert after[1:] == before[1:]


@pytest.mark.parametrize("materialized, match", [
    (False, r"module '0' is on the meta device.*to_empty.*then rw\.load"),
    (True, r"'0\.adapters\.default\.lora_A' is on the meta device.*would be dropped"),
])
def test_overwrite_onto_a_meta_model_is_refused(saved, materialized, match):
    """Adapted on meta, never materialized (or only the base): the values would be dropped (copy_ into a
    meta tensor does nothing), as for a fresh load."""
    env = _env()
    with torch.device("meta"):
        m = rw.adapt(env["build"](), "lora", rank=4, targets=["0", "2"])
    if materialized:
        for layer in (m[0], m[2]):
            layer.base.to_empty(device="cpu")
    with pytest.raises(ConfigError, match=match):
        rw.load(m, saved / "lora", overwrite=True)
    assert all(p.device.type == "meta" for n, p in m.named_parameters() if ".adapters." in n)
