"""Adapters and low-rank optimizers under torch.distributed: 2 CPU processes, gloo backend.

Each scenario trains on 2 processes, each on its half of a batch, and is compared with one
process training on the whole batch (the loss is a mean over equal halves, so the averaged
gradient is the whole-batch gradient): DDP with LoRA and DoRA, FSDP2 (``fully_shard``) with LoRA
(its adapter saved by ``rw.save`` on every rank: gathered, complete; then merged shard by shard with
``rw.merge`` and saved dense from rank 0 via ``full_state_dict(dense=True)``; FSDP2 DoRA merged too),
GaLore under DDP, layer-wise GaLore (which averages in its hooks; on a DDP- or FSDP2-wrapped model it is
refused), and every low-rank optimizer on an FSDP2 model (each sharded matrix stepped whole).
Tolerance: float32 sums in another order, 1e-6.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from _gloo import EPILOGUE, PREAMBLE, run_two
from safetensors.torch import load_file
from torch import nn

import rankwise as rw
from rankwise.errors import ConfigError

SETUP = textwrap.dedent("""
    import torch
    from torch import nn
    import rankwise as rw

    STEPS = 3

    def batch():
        g = torch.Generator().manual_seed(1)
        return torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)

    def build(method=None):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
        if method is not None:
            rw.adapt(m, method, rank=4, targets=["0", "2"], seed=0)
            with torch.no_grad():  # B = 0 at init: move it so every factor gets a gradient
                for n, p in m.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        return m

    def galore(params):
        return rw.optim.GaLoreAdamW(params, lr=1e-2)

    def build_mixed(method):  # a bfloat16 base with float32 adapter factors (PEFT's default on a bf16 model)
        m = build(method)
        for layer in (m[0], m[2]):
            layer.base.to(torch.bfloat16)
        return m

    def loss_autocast(m, x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        return (out.float() - y).square().mean()

    # optimizers whose step is not elementwise (projections, factored or sign-compressed moments)
    FSDP_OPTIMIZERS = ("GaLoreAdamW", "GaLoreAdamW8bit", "QGaLoreAdamW", "Fira", "APOLLO", "APOLLOMini", "FRUGAL",
                       "GradNormLoRP", "Adafactor", "SMMF", "Flora")

    def optimizer(name, m):
        cls = getattr(rw.optim, name)
        if name in ("Adafactor", "SMMF", "Flora"):
            return cls(m.parameters(), lr=1e-2, **({"rank": 4} if name == "Flora" else {}))
        return cls(rw.optim.param_groups(m, rank=4, update_proj_gap=2), lr=1e-2)

    def galore_groups(m):
        return rw.optim.param_groups(m, rank=4, update_proj_gap=2)

    def trainable(m):
        return {n.removeprefix("module."): p for n, p in m.named_parameters() if p.requires_grad}

    def loss_of(m, x, y):
        return (m(x) - y).square().mean()
""")

WORKER = SETUP + PREAMBLE + textwrap.dedent("""
    from torch.nn.parallel import DistributedDataParallel as DDP

    def run(model, opt):
        for _ in range(STEPS):
            loss_of(model, xs, ys).backward()
            opt.step()
            opt.zero_grad()

    for method in ("lora", "dora"):  # DDP
        m = DDP(build(method))
        run(m, torch.optim.AdamW(trainable(m).values(), lr=1e-2))
        results.update({f"ddp_{method}/{k}": v.detach() for k, v in trainable(m).items()})
        if rank == 0:
            rw.save(m, f"{out}/ddp_{method}")  # a DDP-wrapped model saves like the bare one

    m = DDP(build())  # GaLore, all weights trained
    run(m, galore(galore_groups(m.module)))
    results.update({f"ddp_galore/{k}": v.detach() for k, v in trainable(m).items()})

    m = build()  # layer-wise GaLore: no DDP wrapper, the hooks average
    handle = rw.optim.layerwise(m, galore, params=galore_groups(m))
    for _ in range(STEPS):
        loss_of(m, xs, ys).backward()
    results.update({f"layerwise_galore/{k}": v.detach() for k, v in trainable(m).items()})
    handle.remove()
    try:
        rw.optim.layerwise(DDP(build()), galore)
    except rw.errors.ConfigError as e:
        results["layerwise_ddp_refused"] = torch.tensor(1.0)
        if rank == 0:
            print(e)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    m = build("lora")  # FSDP2: every adapted layer its own unit
    mesh = init_device_mesh("cpu", (2,))
    for layer in (m[0], m[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    run(m, torch.optim.AdamW(trainable(m).values(), lr=1e-2))
    results.update({f"fsdp_lora/{k}": v.full_tensor().detach() for k, v in trainable(m).items()})
    rw.save(m, f"{out}/fsdp_lora")  # on every rank: gathers, rank 0 writes

    from rankwise.core.distributed import full_state_dict
    from rankwise.io.atomic import save_tensors

    def merge_sharded(kind, m):  # rw.merge on every rank: each adds its shard of the whole ΔW
        before = {k: v.detach().clone() for k, v in full_state_dict(m).items()}
        rw.merge(m)
        m.eval()
        with torch.no_grad():
            results[f"{kind}_merged_out"] = m(x)  # FSDP forward through the merged shards
        dense = full_state_dict(m, dense=True)  # every rank gathers; rank 0 writes
        if rank == 0:
            save_tensors(f"{out}/{kind}_merged.safetensors", dense)
        rw.unmerge(m)
        results.update({f"{kind}_unmerged/{k}": (v - before[k]).abs().max().reshape(1)
                        for k, v in full_state_dict(m).items() if v.is_floating_point()})

    merge_sharded("fsdp_lora", m)  # the trained FSDP2 LoRA model
    m = build("dora")  # DoRA reads W0: its ΔW needs the gathered base weight
    for layer in (m[0], m[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    merge_sharded("fsdp_dora", m)

    from rankwise.core.distributed import shard_adapters

    for method in ("lora", "dora"):  # adapters in their own FSDP2 units: float32 factors on a bfloat16 base
        m = build_mixed(method)
        units = shard_adapters(m, mesh=mesh)
        for layer in (m[0], m[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        opt = torch.optim.AdamW(trainable(m).values(), lr=1e-2)
        for _ in range(STEPS):
            loss_autocast(m, xs, ys).backward()
            opt.step()
            opt.zero_grad()
        results.update({f"fsdp_units_{method}/{k}": v.full_tensor().detach() for k, v in trainable(m).items()})
        results[f"fsdp_units_{method}_count"] = torch.tensor(float(len(units)))
        results[f"fsdp_units_{method}_dtypes_ok"] = torch.tensor(float(
            all(isinstance(p, torch.distributed.tensor.DTensor) and p.dtype == torch.float32
                for p in trainable(m).values())
            and all(layer.base.weight.dtype == torch.bfloat16 for layer in (m[0], m[2]))))
    m = build("vera")
    try:
        shard_adapters(m, mesh=mesh)
    except rw.errors.ConfigError as e:
        results["shard_adapters_vera_refused"] = torch.tensor(1.0)
        if rank == 0:
            print(e)

    for name in FSDP_OPTIMIZERS:  # every low-rank optimizer on an FSDP2 model (no adapter: all weights trained)
        m = build()
        for layer in (m[0], m[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        opt = optimizer(name, m)
        run(m, opt)
        results.update({f"fsdp_{name}/{k}": v.full_tensor().detach() for k, v in trainable(m).items()})
        if name == "GaLoreAdamW":  # the low-rank state is replicated: rank 1's equals rank 0's
            for i, st in opt.state_dict()["state"].items():
                for k, v in st.items():
                    if torch.is_tensor(v) and v.ndim == 2 and not isinstance(v, torch.distributed.tensor.DTensor):
                        results[f"galore_state_rank{rank}/{i}/{k}"] = v
    # GaLoreAdamW projects the shard: count the gathers (DTensor.full_tensor) of each optimizer step
    from torch.distributed.tensor import DTensor
    gathers = [0]
    original_full = DTensor.full_tensor

    def counting(self, *a, **k):
        gathers[0] += 1
        return original_full(self, *a, **k)

    for name in ("GaLoreAdamW", "APOLLO"):
        m = build()
        for layer in (m[0], m[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        opt = getattr(rw.optim, name)(rw.optim.param_groups(m, rank=4, update_proj_gap=3), lr=1e-2)
        counts = []
        for _ in range(4):  # refreshes at steps 0 and 3
            loss_of(m, xs, ys).backward()
            DTensor.full_tensor = counting
            gathers[0] = 0
            try:
                opt.step()
            finally:
                DTensor.full_tensor = original_full
            counts.append(gathers[0])
            opt.zero_grad()
        results[f"gathers/{name}"] = torch.tensor(counts, dtype=torch.float32)
        if name == "GaLoreAdamW":
            st = opt.state[m[0].weight]  # 32 x 16: right projection, moments sharded by rows like W
            results["galore_sharded_moment"] = torch.tensor([float(isinstance(st["exp_avg"], DTensor)),
                                                            *st["exp_avg"].to_local().shape])
            st = opt.state[m[2].weight]  # 8 x 32: left projection, moments r x n on every rank
            results["galore_left_moment"] = torch.tensor([float(isinstance(st["exp_avg"], DTensor)),
                                                         *st["exp_avg"].shape])
    try:
        m = build()
        fully_shard(m, mesh=mesh)
        rw.optim.layerwise(m, galore)
    except rw.errors.ConfigError as e:
        results["layerwise_fsdp_refused"] = torch.tensor(1.0)
        if rank == 0:
            print(e)
    m = build()
    fully_shard(m[0], mesh=mesh)
    fully_shard(m, mesh=mesh)
    before = repr(m)
    try:
        rw.adapt(m, "lora", rank=4, targets=["0", "2"])
    except rw.errors.ConfigError as e:
        results["adapt_sharded_refused"] = torch.tensor(float(repr(m) == before))
        if rank == 0:
            print(e)

    states = [None, None]
    dist.all_gather_object(states, {k: v for k, v in results.items() if k.startswith("galore_state_rank")})
    if rank == 0:
        results.update(states[1])
""") + EPILOGUE


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    results, out = run_two(WORKER, tmp)
    return tmp, results, out


def _single(kind: str) -> dict[str, torch.Tensor]:
    """The same training in one process on the whole batch."""
    env: dict = {}
    exec(compile(SETUP, "setup", "exec"), env)
    x, y = env["batch"]()
    method = {"ddp_lora": "lora", "ddp_dora": "dora", "fsdp_lora": "lora", "fsdp_units_lora": "lora",
              "fsdp_units_dora": "dora"}.get(kind)
    m = env["build_mixed" if kind.startswith("fsdp_units_") else "build"](method)
    loss_of = env["loss_autocast" if kind.startswith("fsdp_units_") else "loss_of"]
    if kind == "layerwise_galore":
        handle = rw.optim.layerwise(m, env["galore"], params=env["galore_groups"](m))
        for _ in range(env["STEPS"]):
            env["loss_of"](m, x, y).backward()
        handle.remove()
        return env["trainable"](m)
    if kind == "ddp_galore":
        opt = env["galore"](env["galore_groups"](m))
    elif kind.removeprefix("fsdp_") in env["FSDP_OPTIMIZERS"]:
        opt = env["optimizer"](kind.removeprefix("fsdp_"), m)
    else:
        opt = torch.optim.AdamW(env["trainable"](m).values(), lr=1e-2)
    for _ in range(env["STEPS"]):
        loss_of(m, x, y).backward()
        opt.step()
        opt.zero_grad()
    return env["trainable"](m)


# GradNormLoRP: Adam on the magnitude gradient ∇g = rowsum(G ⊙ V̂), a sum of ~±equal terms for some rows, divides
# its rounding by a √v of the same size: one weight in 256 measured 1.5e-6 off (value 1.5e-3), the others < 1e-7.
ATOL = {"fsdp_GradNormLoRP": 5e-6}
# bfloat16 autocast (fsdp_units_*): the base matmuls round to 8 bits of mantissa, and a batch of 4 and one of 8 can
# take other kernel blockings, so per-example outputs differ at bf16's relative precision 2^-8 = 3.9e-3; after 3
# AdamW steps measured 1.4e-4 on factors of ~0.08 (relative 1.8e-3). Training on one rank's half of the batch
# alone (a gradient not averaged) moves them by 6e-2 (measured).
RTOL = {"fsdp_units_lora": 4e-3, "fsdp_units_dora": 4e-3}
ATOL.update({"fsdp_units_lora": 2e-4, "fsdp_units_dora": 2e-4})
FSDP_KINDS = ["fsdp_GaLoreAdamW", "fsdp_GaLoreAdamW8bit", "fsdp_QGaLoreAdamW", "fsdp_Fira", "fsdp_APOLLO",
              "fsdp_APOLLOMini", "fsdp_FRUGAL", "fsdp_GradNormLoRP", "fsdp_Adafactor", "fsdp_SMMF", "fsdp_Flora"]


@pytest.mark.parametrize("kind", ["ddp_lora", "ddp_dora", "fsdp_lora", "ddp_galore", "layerwise_galore", *FSDP_KINDS,
                                  "fsdp_units_lora", "fsdp_units_dora"])
def test_two_processes_train_like_one_on_the_whole_batch(distributed, kind):
    """Every low-rank optimizer on an FSDP2 model steps each sharded matrix whole (before this, SMMF
    trained silently wrong there — weights 0.019 off after 3 steps — and APOLLO, Flora, FRUGAL and
    Q-GaLore crashed on mixed Tensor/DTensor arithmetic)."""
    _, results, _ = distributed
    single = _single(kind)
    got = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(kind + "/")}
    assert set(got) == set(single) and got
    for name, p in single.items():
        torch.testing.assert_close(got[name], p.detach(), rtol=RTOL.get(kind, 1e-5), atol=ATOL.get(kind, 1e-6),
                                   msg=lambda m, name=name: f"{kind}: {name}: {m}")
    before = _single_untrained(kind)
    assert all(not torch.equal(before[n], p) for n, p in single.items() if n.endswith("weight"))  # it trained


def test_adapters_in_their_own_units_keep_their_dtype(distributed):
    """shard_adapters: one FSDP2 unit per adapter (2 layers), float32 DTensor factors next to the bfloat16
    base; training matches one process (the test above); VeRA (bases shared between layers) is refused."""
    _, results, out = distributed
    for method in ("lora", "dora"):
        assert float(results[f"fsdp_units_{method}_count"]) == 2.0
        assert float(results[f"fsdp_units_{method}_dtypes_ok"]) == 1.0
    assert float(results["shard_adapters_vera_refused"]) == 1.0
    assert "adapter 'default' of module '0' holds tensors in submodules" in out


def test_galore_projects_fsdp_shards_without_gathering_between_refreshes(distributed):
    """GaLoreAdamW on FSDP2: the two weights are gathered (one all-gather of the gradient each) only on the
    refresh steps 0 and 3; APOLLO steps each matrix whole (weight and gradient gathered: 2 per matrix, every
    step). The right-projected 32 x 16 weight keeps its 32 x 4 moments sharded by rows (16 x 4 here), the
    left-projected 8 x 32 one keeps 4 x 32 moments on every rank."""
    _, results, _ = distributed
    assert results["gathers/GaLoreAdamW"].tolist() == [2, 0, 0, 2]
    assert results["gathers/APOLLO"].tolist() == [4, 4, 4, 4]
    assert results["galore_sharded_moment"].tolist() == [1, 16, 4]
    assert results["galore_left_moment"].tolist() == [0, 4, 32]


def test_fsdp_low_rank_state_is_identical_on_every_rank(distributed):
    """GaLore's projector and projected moments on an FSDP2 model: rank 1's equal rank 0's bitwise
    (computed from the same gathered gradient; no broadcast)."""
    _, results, _ = distributed
    zero = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith("galore_state_rank0/")}
    one = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith("galore_state_rank1/")}
    assert set(zero) == set(one) and any(k.endswith("exp_avg") for k in zero)
    assert all(torch.equal(zero[k], one[k]) for k in zero)


def test_adapting_a_sharded_module_is_refused(distributed):
    """An adapter added after fully_shard would be a plain tensor FSDP does not manage (its gradient never
    averaged: the ranks drift apart silently); refused before the model changes, naming the module."""
    _, results, out = distributed
    assert float(results["adapt_sharded_refused"]) == 1.0  # refused, and the model's repr is unchanged
    assert "module '0' is already sharded" in out and "Adapt before fully_shard" in out


def test_layerwise_on_an_fsdp_model_is_refused(distributed):
    _, results, out = distributed
    assert float(results["layerwise_fsdp_refused"]) == 1.0
    assert "sharded (FSDP2" in out and "optimizer.step()" in out


def _single_untrained(kind):
    env: dict = {}
    exec(compile(SETUP, "setup", "exec"), env)
    method = {"ddp_lora": "lora", "ddp_dora": "dora", "fsdp_lora": "lora", "fsdp_units_lora": "lora",
              "fsdp_units_dora": "dora"}.get(kind)
    return {k: v.detach().clone() for k, v in env["trainable"](env["build"](method)).items()}


@pytest.mark.parametrize("kind", ["ddp_lora", "ddp_dora", "fsdp_lora"])
def test_adapter_saved_from_a_distributed_run_is_complete(distributed, kind):
    """FSDP2 gathers the shards (a rank's shard, or nothing, is the classic failure elsewhere)."""
    tmp, results, _ = distributed
    env: dict = {}
    exec(compile(SETUP, "setup", "exec"), env)
    loaded = rw.load(env["build"](), Path(tmp) / kind)
    got = {k: v for k, v in loaded.named_parameters() if ".adapters." in k}
    want = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(kind + "/")}
    assert set(got) == set(want)
    for name, p in got.items():
        assert torch.equal(p.detach(), want[name]), name


@pytest.mark.parametrize("kind", ["fsdp_lora", "fsdp_dora"])
def test_merging_sharded_weights_matches_one_process(distributed, kind):
    """rw.merge on an FSDP2 model (every rank adds its shard of ΔW), the dense state dict gathered by
    full_state_dict(dense=True) and written by rank 0, against one process: the same model trained on
    the whole batch (LoRA; 1e-6 as above) or untrained (DoRA: ΔW is computed from the same gathered
    factors, so the merged weights are bitwise equal), then rw.unadapt(merge=True).state_dict().
    rw.unmerge restores the sharded weights (float rounding of (W + ΔW) − ΔW)."""
    tmp, results, _ = distributed
    env: dict = {}
    exec(compile(SETUP, "setup", "exec"), env)
    x, _ = env["batch"]()
    m = env["build"]("dora" if kind == "fsdp_dora" else "lora")
    if kind == "fsdp_lora":
        trained = _single(kind)
        with torch.no_grad():
            for name, p in trained.items():
                m.get_parameter(name).copy_(p)
    rw.merge(m)
    m.eval()
    with torch.no_grad():
        want_out = m(x)
    want = rw.unadapt(m, merge=True).state_dict()
    got = load_file(Path(tmp) / f"{kind}_merged.safetensors")
    assert set(got) == set(want) and {"0.weight", "0.bias", "2.weight", "2.bias"} <= set(got)
    for name, w in want.items():
        if kind == "fsdp_dora":
            assert torch.equal(got[name], w), name
        else:
            torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(results[f"{kind}_merged_out"], want_out, rtol=1e-5, atol=1e-6)
    restored = {k: float(v) for k, v in results.items() if k.startswith(f"{kind}_unmerged/")}
    assert restored and max(restored.values()) < 1e-6


def test_dense_state_dict_in_one_process():
    """full_state_dict(dense=True) without sharding: rw.unadapt(merge=True)'s state dict, the model
    left adapted; refused (before anything changes) while an adapter is unmerged."""
    from rankwise.core.distributed import full_state_dict

    env: dict = {}
    exec(compile(SETUP, "setup", "exec"), env)
    m = env["build"]("lora")
    with pytest.raises(ConfigError, match="not merged.*rw.merge"):
        full_state_dict(m, dense=True)
    rw.merge(m)
    got = full_state_dict(m, dense=True)
    assert any(".adapters." in k for k in m.state_dict())  # still adapted
    want = rw.unadapt(m, merge=True).state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_layerwise_on_a_ddp_model_is_refused(distributed):
    _, results, out = distributed
    assert float(results["layerwise_ddp_refused"]) == 1.0
    assert "DistributedDataParallel" in out and "model.module" in out


def test_layerwise_refuses_ddp_in_one_process():
    with pytest.raises(ConfigError, match="DistributedDataParallel.*model.module"):
        rw.optim.layerwise(_FakeDDP(), lambda g: torch.optim.SGD(g, lr=0.1))


class _FakeDDP(nn.parallel.DistributedDataParallel):
    def __init__(self):  # no process group needed to test the refusal
        nn.Module.__init__(self)
        self.module = nn.Linear(2, 2)
