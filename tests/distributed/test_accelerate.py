"""A script written for ``torchrun`` runs unchanged under ``accelerate launch`` (issue 18).

The script below uses rankwise only: ``init_from_env()`` joins the group the launcher describes,
``rankwise.train.train`` wraps the model in DDP and gives rank ``r`` its ``r``-th contiguous half of
each global batch, rank 0 writes. It trains two cases for 3 steps on a fixed global batch of 8: LoRA
on a small MLP (``rw.adapt``), and GaLore (``rw.optim.param_groups`` + ``GaLoreAdamW``) on the plain
MLP. It is launched by ``accelerate launch --multi_gpu --num_processes 2`` on CPU (accelerate hands
the processes to ``torch.distributed.run``; rankwise picks gloo) with a fresh ``HF_HOME``, so no
``accelerate config`` file is read or needed. (``accelerate launch --cpu --num_processes 2`` would
start a single process: accelerate's multi-CPU mode expects ``mpirun`` and a hostfile; the test
checks that two ranks ran.)

Oracle: the same script in one plain process (no launcher, so no process group) on the whole batch.
Tolerance: the two-process gradient is the mean of two half-batch means, summed in another order
than the one-process mean, so the weights agree up to float32 rounding, amplified by Adam's division
by ``sqrt(v)`` in 3 steps: atol 1e-5 on weights of scale ~0.2-0.3, as ``test_nproc.py`` (measured:
at most 7e-7, GaLore's second matrix; LoRA ~2e-8). GaLore's projector is an SVD of that gradient, whose
top singular values are apart here, so the basis moves by rounding only. Both runs must also have moved
every trained tensor (by ~2e-2, far more than 1e-5).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch
    from torch import nn

    import rankwise as rw
    from rankwise.core.distributed import init_from_env, rank, shutdown, world_size
    from rankwise.io.atomic import save_tensors
    from rankwise.train import TrainConfig, train

    init_from_env()  # under a launcher: the gloo group of RANK / WORLD_SIZE; alone: nothing
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)
    data = list(zip(x, y))  # one global batch of 8: every step sees all of it (in a per-epoch order)
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-2, warmup=0)

    def collate(items):
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    seen = set()

    def loss_fn(model, batch):
        seen.add((type(model).__name__, len(batch[0])))  # the wrapper train() passes, and the local batch
        return (model(batch[0]) - batch[1]).square().mean()

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))

    def trainable(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    lora = rw.adapt(mlp(), "lora", rank=4, targets=["0", "2"], seed=0)
    with torch.no_grad():  # B = 0 at init: move it so that A gets a gradient at the first step
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    plain = mlp()
    galore = rw.optim.GaLoreAdamW(rw.optim.param_groups(plain, rank=4, update_proj_gap=2), lr=1e-2)

    tensors = {}
    for case, model, opt in (("lora", lora, None), ("galore", plain, galore)):
        tensors.update({f"init/{case}/{k}": v for k, v in trainable(model).items()})
        train(model, data, collate, loss_fn, cfg, optimizer=opt, checkpoint_dir=out / f"ckpt_{case}",
              progress=False)
        tensors.update({f"trained/{case}/{k}": v for k, v in trainable(model).items()})
    print(f"rank {rank()} of {world_size()}: {sorted(seen)}", flush=True)
    if rank() == 0:
        save_tensors(out / "weights.safetensors", tensors)
        print(f"rank {rank()} wrote weights", flush=True)
    shutdown()  # every rank done, then the group destroyed (nothing without a launcher)
""")


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items()  # a launcher around pytest must not leak into the runs
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf_home"),  # no accelerate config file is read
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def _run(cmd, env):
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_accelerate_launch_on_two_cpu_processes_matches_one_process(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    env = _env(tmp_path)
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    launched = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                     "--main_process_port", "0", str(script), str(two)], env)
    alone = _run([sys.executable, str(script), str(one)], env)

    # two ranks ran, each DDP-wrapped on its half of the batch of 8; one process ran bare on all 8
    for r in (0, 1):
        assert f"rank {r} of 2: [('DistributedDataParallel', 4)]" in launched, launched
    assert "rank 0 of 1: [('Sequential', 8)]" in alone, alone
    # rank 0 alone wrote: one weights file, one checkpoint per case, nothing else (no temp folders)
    assert launched.count("wrote weights") == 1 and "rank 0 wrote weights" in launched
    listing = sorted(p.name for p in two.iterdir())
    assert listing == ["ckpt_galore", "ckpt_lora", "weights.safetensors"], listing
    assert listing == sorted(p.name for p in one.iterdir())

    got, want = load_file(two / "weights.safetensors"), load_file(one / "weights.safetensors")
    assert set(got) == set(want)
    assert {k.split("/")[1] for k in want} == {"lora", "galore"}
    trained = [k for k in want if k.startswith("trained/")]
    assert any("lora_A" in k for k in trained) and any("lora_B" in k for k in trained)
    assert not any("lora" in k for k in trained if k.startswith("trained/galore/"))
    for k in trained:
        init = want[k.replace("trained/", "init/", 1)]
        torch.testing.assert_close(got[k.replace("trained/", "init/", 1)], init, rtol=0, atol=0)  # same start
        assert (want[k] - init).abs().max() > 1e-3, k  # it trained (3 steps at lr 1e-2 move each weight)
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5, msg=k)
    for case in ("lora", "galore"):  # the checkpoint rank 0 wrote holds the same trained tensors
        ckpt = load_file(two / f"ckpt_{case}" / "model.safetensors")
        assert set(ckpt) == {k.split("/", 2)[2] for k in trained if k.startswith(f"trained/{case}/")}
        for name, t in ckpt.items():
            torch.testing.assert_close(t, got[f"trained/{case}/{name}"], rtol=0, atol=0)
