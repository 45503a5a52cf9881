"""Layer-wise GaLore under the Hugging Face Trainer on 2 processes (issue 18).

transformers' own layer-wise GaLore refuses DDP ("Layer-wise {optimizer} does not support DDP at this
time", transformers/trainer_optimizer.py): its per-parameter hooks would step on the local gradient before DDP averages it. ``rw.optim.layerwise``
averages each gradient in its hook before stepping, so the Trainer may wrap the model in
``DistributedDataParallel`` as it does under ``torchrun``: every replica steps on the averaged gradient
(DDP's own reduction comes after the step and the gradients are then dropped: it costs a second
all-reduce and DDP's gradient buckets, but changes no weight).

Script: a small MLP with a ``loss`` output, ``RankwiseTrainer`` with ``optimizers=(handle, scheduler)``,
3 steps of a global batch of 8 (4 per process under ``torchrun --nproc-per-node 2``). Oracle: the same
script as one plain process (batch 8). Tolerance: float32 sums of two half-batch means in another order,
amplified by Adam's normalisation over 3 steps: atol 1e-5 on weights of scale ~0.2 (measured 7e-7).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from torch import nn
    from transformers import TrainingArguments

    import rankwise as rw
    from rankwise.integrations.hf_trainer import RankwiseTrainer

    torch.set_num_threads(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))

        def forward(self, x, y):
            return {"loss": (self.net(x) - y).square().mean()}

    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)
    data = [{"x": X[i], "y": Y[i]} for i in range(8)]
    model = Net()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    handle = rw.optim.layerwise(model, lambda groups: rw.optim.GaLoreAdamW(groups, lr=1e-2),
                                params=rw.optim.param_groups(model, rank=4, update_proj_gap=2))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = TrainingArguments(output_dir=sys.argv[1], per_device_train_batch_size=8 // world, max_steps=3,
                             report_to=[], save_strategy="no", learning_rate=1e-2, lr_scheduler_type="constant",
                             use_cpu=True, dataloader_drop_last=True, seed=0, disable_tqdm=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(handle, lambda s: 1.0)
    trainer = RankwiseTrainer(model=model, args=args, train_dataset=data, optimizers=(handle, schedule))
    trainer.train()
    print("wrapped:", type(trainer.model_wrapped).__name__)
    if int(os.environ.get("RANK", "0")) == 0:
        from rankwise.io.atomic import save_tensors
        after = {k: v.detach() for k, v in model.state_dict().items()}
        save_tensors(os.path.join(sys.argv[1], "weights.safetensors"),
                     {**after, **{"before." + k: v for k, v in before.items()}})
    from rankwise.core.distributed import shutdown
    shutdown()  # every rank done, then the group destroyed (nothing in one plain process)
""")


def _run(tmp_path, name, launcher):
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([*launcher, str(script), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    return load_file(out / "weights.safetensors"), proc.stdout


def test_layerwise_galore_under_the_trainer_on_two_processes_matches_one(tmp_path):
    two, out2 = _run(tmp_path, "two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc-per-node=2"])
    one, out1 = _run(tmp_path, "one", [sys.executable])
    assert out2.count("wrapped: DistributedDataParallel") == 2  # the Trainer did wrap the model in DDP
    assert "wrapped: Net" in out1
    weights = [k for k in one if not k.startswith("before.")]
    assert weights
    for k in weights:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)
        assert torch.equal(two["before." + k], one["before." + k])
        assert (one[k] - one["before." + k]).abs().max() > 1e-3, k  # it trained
