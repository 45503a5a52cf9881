"""A killed worker, then a resume, reproduces the uninterrupted run: 2 CPU processes, gloo, through
``rankwise.train.train`` (which wraps the model in DDP when torch.distributed runs with 2 processes),
and the same with the model FSDP2-sharded (``fully_shard``: the checkpoint gathers the shards).

The run: an MLP with dropout (so each rank's RNG state matters), all weights trained by GaLore with
staggered subspace refreshes every 2 steps, 6 steps of a global batch of 8 (4 per rank), a checkpoint
every 2 steps. Launch 1 runs it uninterrupted, then again into another checkpoint folder where rank 1
SIGKILLs itself at the start of step 5 (after the step-4 checkpoint) and the test SIGKILLs rank 0, as
torchrun does with the survivors. Launch 2 restarts both with ``resume=True``. Oracle: the
uninterrupted run's final parameters, bitwise. Also checked: rank 0 alone wrote the checkpoint (no
temporaries of another writer), it holds GaLore's state (projector bases, refresh offsets, step
counters) and every rank's RNG state, and the projector bases are identical on both ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = textwrap.dedent("""
    import os, signal, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    import rankwise as rw
    from rankwise.io.atomic import save_tensors
    from rankwise.train import TrainConfig, train

    rank, init, out, phase, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(3)
    data = list(zip(torch.randn(32, 16, generator=g), torch.randn(32, 8, generator=g)))
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup=1, checkpoint_every=2)

    def collate(items):
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.2), nn.Tanh(), nn.Linear(32, 8))
        if mode == "fsdp":  # FSDP2: every Linear its own unit, then the root; train() does not wrap it in DDP
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh("cpu", (2,))
            for layer in (m[0], m[3]):
                fully_shard(layer, mesh=mesh)
            fully_shard(m, mesh=mesh)
        return m

    from rankwise.core.distributed import full_state_dict

    def optimizer(m):
        groups = rw.optim.param_groups(m, rank=4, update_proj_gap=2, stagger_refresh=True)
        return rw.optim.GaLoreAdamW(groups, lr=1e-2)

    def loss_fn(kill_at=None):
        calls = [0]

        def loss(model, batch):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            x, y = batch
            return (model(x) - y).square().mean()
        return loss

    def run(folder, resume=False, kill_at=None):
        m = build()
        opt = optimizer(m)
        train(m, data, collate, loss_fn(kill_at), cfg, optimizer=opt, checkpoint_dir=f"{out}/{folder}",
              resume=resume, progress=False)
        return m, opt

    if phase == "first":
        m, opt = run("uninterrupted")
        weights = full_state_dict(m)  # every rank (FSDP2 gathers)
        if rank == 0:
            save_tensors(f"{out}/uninterrupted.safetensors", weights)
        bases = {f"{i}": opt.state[p]["proj_basis"] for i, p in enumerate(opt.param_groups[-1]["params"])}
        save_tensors(f"{out}/bases{rank}.safetensors", bases)
        dist.barrier()
        run("killed", kill_at=5 if rank == 1 else None)  # rank 1 dies at the start of step 5
    else:
        m, _ = run("killed", resume=True)
        weights = full_state_dict(m)
        if rank == 0:
            save_tensors(f"{out}/resumed.safetensors", weights)
    from rankwise.core.distributed import shutdown
    shutdown()  # barrier, then destroy the group: no rank tears down while the other still sends
    sys.stdout.flush()
    os._exit(0)  # skip interpreter finalization, where leftover gloo threads can abort the process
""")


def _launch(tmp: Path, phase: str, mode: str) -> list[subprocess.Popen]:
    init = tmp / f"init-{phase}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, str(tmp / "worker.py"), str(r), str(init), str(tmp), phase, mode],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def runs(tmp_path_factory, request):
    """ddp: train() wraps the model in DDP. fsdp: the model is FSDP2-sharded; the checkpoint gathers the
    weights and the optimizer's DTensor state (AdamW moments of the biases) and each rank re-shards them."""
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"resume-{mode}")
    (tmp / "worker.py").write_text(WORKER)
    first = _launch(tmp, "first", mode)
    _, err1 = first[1].communicate(timeout=300)
    assert first[1].returncode == -signal.SIGKILL, err1[-3000:]  # killed itself mid-run
    first[0].send_signal(signal.SIGKILL)  # the launcher stops the survivor (blocked in an all-reduce)
    first[0].communicate(timeout=60)
    state = json.loads((tmp / "killed" / "trainer_state.json").read_text())
    saved = {"model": load_file(tmp / "killed" / "model.safetensors"),
             "optimizer": load_file(tmp / "killed" / "optimizer.safetensors")}
    leftovers = sorted(p.name for p in tmp.iterdir() if ".rw-" in p.name)
    second = _launch(tmp, "resume", mode)
    outs = [p.communicate(timeout=300) for p in second]
    for p, (_, err) in zip(second, outs):
        assert p.returncode == 0, err[-3000:]
    return tmp, state, leftovers, saved, mode


def test_resume_after_a_killed_worker_is_bitwise_the_uninterrupted_run(runs):
    tmp, state, _, saved, _ = runs
    assert state["step"] == 4  # the kill came after the step-4 checkpoint, before step 6's
    want = load_file(tmp / "uninterrupted.safetensors")
    got = load_file(tmp / "resumed.safetensors")
    assert set(got) == set(want)
    for name, w in want.items():
        assert torch.equal(got[name], w), name
    start = saved["model"]  # the step-4 weights: the resumed run trained on from there
    assert set(start) == set(want) and any(not torch.equal(start[k], want[k]) for k in start)


def test_checkpoint_holds_galore_state_and_every_rank_rng(runs):
    _, state, leftovers, saved, mode = runs
    assert leftovers == []  # only rank 0 wrote: no other writer's temporaries
    assert {k: tuple(v.shape) for k, v in saved["model"].items()} == {
        "0.weight": (32, 16), "0.bias": (32,), "3.weight": (8, 32), "3.bias": (8,)}  # whole tensors
    assert state["world_size"] == 2
    tensors = saved["optimizer"]
    low = [i for i, g in enumerate(state["optimizer"]["param_groups"]) if g.get("rank")]
    assert low and all(state["optimizer"]["param_groups"][i]["stagger_refresh"] for i in low)
    projected = state["optimizer"]["param_groups"][low[0]]["params"]
    entries = state["optimizer"]["state"]["__int_keys__"]
    for k, pid in enumerate(projected):
        entry = entries[str(pid)]
        assert entry["step"] == 4 and entry["proj_offset"] == k * 2 // len(projected)
        assert f"state.{pid}.proj_basis" in tensors and f"state.{pid}.exp_avg" in tensors
    for r in (0, 1):
        assert tensors[f"rng.rank{r}.cpu"].dtype == torch.uint8
    others = [pid for i, g in enumerate(state["optimizer"]["param_groups"]) if i not in low for pid in g["params"]]
    for pid in others:  # the biases' AdamW moments: DTensor shards under FSDP2, gathered whole and marked
        entry = entries[str(pid)]["exp_avg"]
        assert entry.get("__sharded__", False) is (mode == "fsdp")
        assert tensors[f"state.{pid}.exp_avg"].ndim == 1 and tensors[f"state.{pid}.exp_avg"].numel() in (32, 8)


def test_projector_bases_are_identical_on_both_ranks(runs):
    tmp = runs[0]  # under FSDP2 too: computed from the gathered matrix and gradient on every rank
    b0, b1 = load_file(tmp / "bases0.safetensors"), load_file(tmp / "bases1.safetensors")
    assert set(b0) == set(b1) and b0
    assert all(torch.equal(b0[k], b1[k]) for k in b0)
