"""rankwise.train: the loop, its schedule, gradient accumulation, and exact-resume checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankwise as rw
from rankwise.errors import ConfigError, ShapeMismatchError
from rankwise.train import (
    TrainConfig,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    save_checkpoint,
    train,
    warmup_cosine,
)


def make_data(n: int = 64, dim: int = 6, classes: int = 3, seed: int = 0):
    """Linearly separable-ish classification: list of (features, label)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    y = (x @ w).argmax(-1)
    return [(x[i], int(y[i])) for i in range(n)]


def collate(items):
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)  # a mean over the batch


def make_mlp(seed: int = 0, hidden: int = 16, dropout: float = 0.0, dim: int = 6, classes: int = 3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, classes))


def accuracy_fn(data):
    x, y = collate(data)

    def evaluate(model):
        assert not model.training and not torch.is_grad_enabled()
        return {"accuracy": (model(x).argmax(-1) == y).float().mean().item()}

    return evaluate


def test_loss_decreases_and_result_shape():
    data = make_data()
    model = make_mlp()
    cfg = TrainConfig(steps=60, batch_size=8, lr=1e-2, eval_every=20)
    res = train(model, data, collate, ce_loss, cfg, eval_fn=accuracy_fn(data), progress=False)
    assert res.steps == 60 and len(res.losses) == 60 and len(res.lrs) == 60
    assert all(isinstance(v, float) for v in res.losses)
    assert sum(res.losses[-10:]) / 10 < 0.6 * sum(res.losses[:10]) / 10
    assert [s for s, _ in res.evals] == [20, 40, 60]
    assert res.evals[-1][1]["accuracy"] > res.evals[0][1]["accuracy"] - 0.1
    assert res.evals[-1][1]["accuracy"] > 0.8
    assert model.training and res.wall_time > 0


def test_warmup_cosine_matches_closed_form():
    steps, base = 20, 0.5
    cfg = TrainConfig(steps=steps, batch_size=4, lr=base, warmup=0.2)
    assert cfg.warmup_steps == 4
    assert TrainConfig(steps=steps, warmup=3).warmup_steps == 3

    def closed(k, w=4):  # learning rate of optimizer step k = 1..steps
        return base * k / w if k <= w else base * 0.5 * (1 + math.cos(math.pi * (k - 1 - w) / (steps - w)))

    res = train(make_mlp(), make_data(), collate, ce_loss, cfg, progress=False)
    for k in (1, 2, 4, 5, 10, 19, 20):
        assert res.lrs[k - 1] == pytest.approx(closed(k), rel=1e-12, abs=1e-15), k
    assert res.lrs[3] == base and res.lrs[4] == base  # peak at the end of warmup and first cosine step
    assert 0 < res.lrs[-1] < 0.01 * base

    opt = make_optimizer(make_mlp(), cfg)
    sched = make_scheduler(opt, cfg)
    got = []
    for _ in range(steps):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx([closed(k) for k in range(1, steps + 1)], rel=1e-12)
    assert opt.param_groups[0]["lr"] == 0.0  # cosine reaches 0 after the last step
    f = warmup_cosine(10, 0)
    assert f(0) == 1.0 and f(10) == 0.0


def test_optimizer_groups_skip_decay_on_biases_and_norms():
    model = make_mlp()
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_grad_accumulation_matches_one_big_batch():
    data = make_data(n=48)
    a, b = make_mlp(), make_mlp()
    common = dict(steps=8, lr=1e-2, weight_decay=0.01, seed=3)
    ra = train(a, data, collate, ce_loss, TrainConfig(batch_size=8, grad_accum=1, **common), progress=False)
    rb = train(b, data, collate, ce_loss, TrainConfig(batch_size=4, grad_accum=2, **common), progress=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0)
    assert ra.losses == pytest.approx(rb.losses, abs=1e-6)


def test_batches_depend_only_on_seed_and_index():
    seen = []

    def record(items):
        seen.append([float(x[0]) for x, _ in items])
        return collate(items)

    data = make_data(n=20)
    train(make_mlp(), data, record, ce_loss, TrainConfig(steps=6, batch_size=8, seed=5), progress=False)
    assert len(seen) == 6  # 2 full batches per epoch of 20 (the partial one is dropped)
    for k, batch in enumerate(seen):
        perm = torch.randperm(20, generator=torch.Generator().manual_seed(5 + k // 2)).tolist()
        assert batch == [float(data[i][0][0]) for i in perm[(k % 2) * 8:(k % 2 + 1) * 8]]


def test_resume_is_bitwise_identical(tmp_path):
    data = make_data()
    cfg = TrainConfig(steps=10, batch_size=8, lr=1e-2, weight_decay=0.01, grad_accum=2, seed=1, warmup=2)
    # dropout makes the run depend on the torch RNG, which the checkpoint must restore too
    straight = make_mlp(dropout=0.2)
    full = train(straight, data, collate, ce_loss, cfg, progress=False)

    # the same 10-step run, checkpointed at step 6 and killed right after
    ck = tmp_path / "ck"
    _crash_after(make_mlp(dropout=0.2), data, cfg, ck, stop_at=6)
    assert json.loads((ck / "trainer_state.json").read_text())["step"] == 6

    fresh = make_mlp(dropout=0.2, seed=123)  # other init: everything trainable comes from the checkpoint
    resumed = train(fresh, data, collate, ce_loss, cfg, checkpoint_dir=ck, resume=True, progress=False)
    assert resumed.steps == 10
    assert resumed.losses[6:] == full.losses[6:]  # steps 7..10, bitwise
    assert resumed.losses == full.losses and resumed.lrs == full.lrs  # history kept from the checkpoint
    for (name, p), q in zip(straight.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name

    # periodic checkpoints do not perturb the run
    periodic = make_mlp(dropout=0.2)
    res = train(periodic, data, collate, ce_loss, TrainConfig(**{**cfg.__dict__, "checkpoint_every": 3}),
                checkpoint_dir=tmp_path / "periodic", progress=False)
    assert res.losses == full.losses
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), periodic.parameters()))


class _Crash(Exception):
    pass


def _crash_after(model, data, cfg, ckdir, stop_at):
    """Run ``cfg`` with a checkpoint every ``stop_at`` steps; crash in the step after the first one."""
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        if len(calls) > stop_at * cfg.grad_accum:
            raise _Crash
        return ce_loss(m, batch)

    with pytest.raises(_Crash):
        train(model, data, collate, loss_fn, TrainConfig(**{**cfg.__dict__, "checkpoint_every": stop_at}),
              checkpoint_dir=ckdir, progress=False)


def test_resume_from_finished_run_and_history(tmp_path):
    data = make_data()
    cfg = TrainConfig(steps=5, batch_size=8)
    evaluate = accuracy_fn(data)
    done = train(make_mlp(), data, collate, ce_loss, cfg, eval_fn=evaluate, checkpoint_dir=tmp_path / "c",
                 progress=False)
    again = train(make_mlp(), data, collate, ce_loss, cfg, eval_fn=evaluate, checkpoint_dir=tmp_path / "c",
                  resume=True, progress=False)
    assert again.losses == done.losses and again.evals == done.evals and again.steps == 5
    # resume=True with no checkpoint yet starts from scratch
    new = train(make_mlp(), data, collate, ce_loss, cfg, checkpoint_dir=tmp_path / "new", resume=True,
                progress=False)
    assert new.losses == done.losses


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path):
    model = make_mlp()
    train(model, make_data(), collate, ce_loss, TrainConfig(steps=3, batch_size=8, checkpoint_every=1),
          checkpoint_dir=tmp_path / "ck", progress=False)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "trainer_state.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary leftovers
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert set(weights) == {n for n, _ in model.named_parameters()}
    opt = load_file(str(tmp_path / "ck" / "optimizer.safetensors"))
    assert "state.0.exp_avg" in opt and "state.0.exp_avg_sq" in opt and opt["rng.cpu"].dtype == torch.uint8
    state = json.loads((tmp_path / "ck" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["config"]["steps"] == 3 and len(state["history"]["losses"]) == 3
    assert state["scheduler"]["last_epoch"] == 3


def test_load_checkpoint_shape_mismatch_changes_nothing(tmp_path):
    model = make_mlp(hidden=16)
    opt = make_optimizer(model, TrainConfig())
    save_checkpoint(tmp_path / "ck", model, opt, make_scheduler(opt, TrainConfig()), 0)
    other = make_mlp(hidden=8, seed=1)
    before = [p.clone() for p in other.parameters()]
    opt2 = make_optimizer(other, TrainConfig())
    with pytest.raises(ShapeMismatchError) as e:
        load_checkpoint(tmp_path / "ck", other, opt2, make_scheduler(opt2, TrainConfig()))
    msg = str(e.value)
    assert "'0.weight'" in msg and "(16, 6)" in msg and "(8, 6)" in msg
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))

    frozen_head = make_mlp(hidden=16)
    frozen_head[4].requires_grad_(False)
    with pytest.raises(ShapeMismatchError, match=r"'4\.bias' \(3,\), '4\.weight' \(3, 16\)"):
        load_checkpoint(tmp_path / "ck", frozen_head)
    assert load_checkpoint(tmp_path / "ck", make_mlp(hidden=16, seed=2)) == 0  # weights only


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="notes.txt.*rankwise did not write|rankwise did not write.*notes.txt"):
        train(make_mlp(), make_data(), collate, ce_loss, TrainConfig(steps=1, batch_size=8),
              checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_train_on_lora_adapted_model_changes_only_adapters(tmp_path):
    model = make_mlp()
    rw.adapt(model, "lora", rank=2, targets=["0", "4"], seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("adapter" in n or "lora" in n.lower() for n in trainable), trainable
    res = train(model, make_data(), collate, ce_loss, TrainConfig(steps=40, batch_size=8, lr=2e-2),
                checkpoint_dir=tmp_path / "ck", progress=False)
    assert sum(res.losses[-8:]) < 0.8 * sum(res.losses[:8]), res.losses
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n  # adapters moved, the base did not
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "ck" / "model.safetensors"))) == trainable


def test_custom_optimizer_and_config_errors():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    res = train(model, make_data(), collate, ce_loss, TrainConfig(steps=5, batch_size=8, warmup=0),
                optimizer=opt, progress=False)
    assert res.lrs[0] == 0.1 and res.lrs[-1] < 0.1

    for kw, word in [({"steps": 0}, "steps"), ({"batch_size": 2.5}, "batch_size"), ({"lr": -1}, "lr"),
                     ({"warmup": 1.5}, "warmup"), ({"warmup": 200}, "warmup"), ({"grad_accum": 0}, "grad_accum"),
                     ({"max_grad_norm": 0}, "max_grad_norm"), ({"eval_every": -1}, "eval_every"),
                     ({"lr": float("nan")}, "lr"), ({"seed": True}, "seed")]:
        with pytest.raises(ConfigError, match=word):
            TrainConfig(**kw)
    with pytest.raises(ConfigError, match="fewer than batch_size"):
        train(make_mlp(), make_data(n=4), collate, ce_loss, TrainConfig(batch_size=8), progress=False)
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        train(make_mlp(), make_data(), collate, ce_loss, TrainConfig(steps=1), resume=True, progress=False)
    with pytest.raises(ConfigError, match="scalar"):
        train(make_mlp(), make_data(), collate, lambda m, b: m(b[0]), TrainConfig(steps=1, batch_size=8),
              progress=False)
    frozen = make_mlp().requires_grad_(False)
    with pytest.raises(ConfigError, match="requires_grad"):
        train(frozen, make_data(), collate, ce_loss, TrainConfig(steps=1, batch_size=8), progress=False)


def test_train_leaves_global_rng_alone():
    model = make_mlp(dropout=0.5)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    train(model, make_data(), collate, ce_loss, TrainConfig(steps=2, batch_size=8), progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_progress_bar_shows_loss_and_lr(capsys):
    train(make_mlp(), make_data(), collate, ce_loss, TrainConfig(steps=3, batch_size=8), desc="mlp", progress=True)
    err = capsys.readouterr().err
    assert "mlp" in err and "loss=" in err and "lr=" in err


# ---- non-finite losses and gradients ---------------------------------------------------------------
def _poisoned(at_step: int, where: str):
    """ce_loss, but at optimizer step ``at_step`` (1-based) the loss is NaN (``where="loss"``) or finite
    with a NaN gradient (``where="grad"``: sqrt at 0 has an infinite derivative, times 0)."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = ce_loss(model, batch)
        if calls["n"] == at_step:
            w = model[0].weight
            if where == "loss":
                return loss * float("nan")
            return loss + torch.sqrt((w - w.detach()).sum())
        return loss

    return loss_fn


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_step_stops_and_keeps_the_last_checkpoint(tmp_path, where):
    """Reliability case T1: a NaN step ran on, and a NaN checkpoint replaced the good one."""
    data = make_data()
    model = make_mlp()
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, checkpoint_every=1)
    with pytest.raises(rw.errors.NonFiniteLossError, match=r"step 3 .*intact.*on_nonfinite='skip'"):
        train(model, data, collate, _poisoned(3, where), cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the poisoned update was applied"
    state = json.loads((tmp_path / "ck" / "trainer_state.json").read_text())
    assert state["step"] == 2
    # the checkpoint holds the model of step 2, which is the model left in memory
    resumed = make_mlp(seed=1)
    load_checkpoint(tmp_path / "ck", resumed)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_step_is_skipped_when_asked(where):
    data = make_data()
    model = make_mlp()
    res = train(model, data, collate, _poisoned(3, where),
                TrainConfig(steps=6, batch_size=8, lr=1e-2, on_nonfinite="skip"), progress=False)
    assert res.skipped == [3] and res.steps == 6 and len(res.losses) == 6
    assert (math.isnan(res.losses[2])) == (where == "loss")
    assert all(math.isfinite(v) for i, v in enumerate(res.losses) if i != 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_on_nonfinite_is_validated():
    with pytest.raises(ConfigError, match="on_nonfinite='ignore'.*'stop'.*'skip'"):
        TrainConfig(on_nonfinite="ignore")


def test_resume_past_the_requested_steps_is_refused(tmp_path):
    """Reliability case R4: a step-5 checkpoint resumed with steps=3 returned the 5-step model."""
    data = make_data()
    train(make_mlp(), data, collate, ce_loss, TrainConfig(steps=5, batch_size=8), checkpoint_dir=tmp_path / "c",
          progress=False)
    model = make_mlp(seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=r"step 5, past steps=3.*steps >= 5"):
        train(model, data, collate, ce_loss, TrainConfig(steps=3, batch_size=8), checkpoint_dir=tmp_path / "c",
              resume=True, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "the model must stay unchanged"


def test_resume_on_other_data_warns(tmp_path):
    """Reliability case R3: resuming on another data file (or tokenization length) went unnoticed."""
    import warnings as _w

    data, other = make_data(seed=0), make_data(seed=1)
    cfg = TrainConfig(steps=4, batch_size=8, checkpoint_every=2)
    train(make_mlp(), data, collate, ce_loss, TrainConfig(steps=2, batch_size=8), checkpoint_dir=tmp_path / "c",
          progress=False)
    with pytest.warns(UserWarning, match="different training data"):
        train(make_mlp(), other, collate, ce_loss, cfg, checkpoint_dir=tmp_path / "c", resume=True, progress=False)
    train(make_mlp(), data, collate, ce_loss, TrainConfig(steps=2, batch_size=8), checkpoint_dir=tmp_path / "d",
          progress=False)
    with _w.catch_warnings():
        _w.simplefilter("error")  # the same data resumes silently
        train(make_mlp(), data, collate, ce_loss, TrainConfig(steps=2, batch_size=8), checkpoint_dir=tmp_path / "d",
              resume=True, progress=False)


def test_lr_lambda_replaces_the_schedule():
    """train(lr_lambda=f): step s + 1 runs at lr · f(s) (ReLoRA's jagged cosine through the same loop)."""
    from rankwise.pretrain.relora import jagged_cosine

    f = jagged_cosine(total_steps=12, warmup=2, reset_every=4, restart_warmup=1, min_ratio=0.1)
    res = train(make_mlp(), make_data(), collate, ce_loss, TrainConfig(steps=12, batch_size=8, lr=0.5),
                progress=False, lr_lambda=f)
    assert res.lrs == [0.5 * f(s) for s in range(12)]
    assert res.lrs[4] < res.lrs[3] and res.lrs[8] < res.lrs[7]  # a re-warmup right after each reset


# ---- mixed precision --------------------------------------------------------------------------------
def _autocast_probe(dtype):
    """ce_loss that also checks that the forward runs under autocast in ``dtype`` (the first layer's
    output is in ``dtype``), counting the calls."""
    calls = []

    def loss_fn(model, batch):
        x, y = batch
        assert torch.is_autocast_enabled("cpu") == (dtype is not None)
        h = model[0](x)
        assert h.dtype == (dtype or torch.float32)
        calls.append(1)
        return F.cross_entropy(model[1:](h), y)

    return loss_fn, calls


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_training_is_close_to_fp32(precision, dtype):
    """The forward runs under ``torch.autocast("cpu", dtype)``; weights stay float32; the loss curve stays
    within low-precision rounding of the float32 run's over 40 steps (tolerance: 0.01 absolute per step
    for bf16's 8 significant bits, 0.005 for fp16's 11, on losses of 0.2-1.4; measured: 9e-4 and 1.1e-3),
    yet is not bitwise the float32 one."""
    data = make_data()
    cfg = dict(steps=40, batch_size=8, lr=2e-2, seed=2)
    ref = train(make_mlp(), data, collate, _autocast_probe(None)[0], TrainConfig(**cfg), progress=False)
    model = make_mlp()
    loss_fn, calls = _autocast_probe(dtype)
    res = train(model, data, collate, loss_fn, TrainConfig(**cfg, precision=precision), progress=False)
    assert len(calls) == 40 and res.skipped == []
    assert all(p.dtype == torch.float32 for p in model.parameters())
    diffs = [abs(a - b) for a, b in zip(res.losses, ref.losses)]
    assert max(diffs) <= (0.01 if precision == "bf16" else 0.005), max(diffs)
    assert max(diffs) > 0, "autocast had no effect"
    assert sum(res.losses[-5:]) < 0.5 * sum(res.losses[:5])  # it trains


def test_bf16_resume_is_bitwise_identical(tmp_path):
    data = make_data()
    cfg = TrainConfig(steps=8, batch_size=8, lr=1e-2, grad_accum=2, seed=1, warmup=2, precision="bf16")
    straight = make_mlp(dropout=0.2)
    full = train(straight, data, collate, ce_loss, cfg, progress=False)
    ck = tmp_path / "ck"
    _crash_after(make_mlp(dropout=0.2), data, cfg, ck, stop_at=5)
    fresh = make_mlp(dropout=0.2, seed=123)
    resumed = train(fresh, data, collate, ce_loss, cfg, checkpoint_dir=ck, resume=True, progress=False)
    assert resumed.losses == full.losses  # steps 6..8 recomputed, bitwise
    for (name, p), q in zip(straight.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


def _overflow_at(step: int):
    """ce_loss, but at optimizer step ``step`` the loss is multiplied by 1e36: finite in float32, while
    its gradient times GradScaler's initial scale 2¹⁶ overflows."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = ce_loss(model, batch)
        return loss * 1e36 if calls["n"] == step else loss

    return loss_fn


def test_fp16_scaler_state_is_checkpointed_and_resumed(tmp_path):
    """fp16 with a GradScaler: an overflowing step is skipped (not a non-finite loss) and halves the scale;
    the checkpoint holds the scaler state of GradScaler's documented rule (init scale 2¹⁶; ×0.5 on an
    overflow, which resets the growth tracker; +1 per clean step), and a crashed run resumed from a
    checkpoint taken after the overflow ends with the uninterrupted run's losses, weights and scaler state."""
    data = make_data()
    cfg = TrainConfig(steps=7, batch_size=8, lr=1e-2, seed=1, precision="fp16")
    straight = make_mlp()
    full = train(straight, data, collate, _overflow_at(3), cfg, checkpoint_dir=tmp_path / "full", progress=False)
    assert full.skipped == [3] and all(math.isfinite(v) for v in full.losses)
    final = json.loads((tmp_path / "full" / "trainer_state.json").read_text())["scaler"]
    assert final["scale"] == 2.0**15 and final["_growth_tracker"] == 7 - 3  # steps 4..7 clean

    # the same run crashes in step 6; the checkpoint of step 5 holds the halved scale
    calls = {"n": 0}
    poisoned = _overflow_at(3)

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] > 5:
            raise _Crash
        return poisoned(model, batch)

    ck = tmp_path / "ck"
    with pytest.raises(_Crash):
        train(make_mlp(), data, collate, crashing, TrainConfig(**{**cfg.__dict__, "checkpoint_every": 5}),
              checkpoint_dir=ck, progress=False)
    saved = json.loads((ck / "trainer_state.json").read_text())["scaler"]
    assert saved["scale"] == 2.0**15 and saved["_growth_tracker"] == 2
    fresh = make_mlp(seed=9)
    resumed = train(fresh, data, collate, ce_loss, cfg, checkpoint_dir=ck, resume=True, progress=False)
    assert resumed.losses == full.losses
    assert json.loads((ck / "trainer_state.json").read_text())["scaler"] == final
    for (name, p), q in zip(straight.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


def test_precision_errors_change_nothing(tmp_path):
    with pytest.raises(ConfigError, match="precision='fp8'.*'fp32'.*'bf16'.*'fp16'"):
        TrainConfig(precision="fp8")
    model = make_mlp().half()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=r"precision='fp16' needs float32 .*'0.weight' is float16"):
        train(model, make_data(), collate, ce_loss, TrainConfig(steps=2, batch_size=8, precision="fp16"),
              progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # load_checkpoint with a scaler, from a run that had none: refused before anything is loaded
    train(make_mlp(), make_data(), collate, ce_loss, TrainConfig(steps=2, batch_size=8), checkpoint_dir=tmp_path / "c",
          progress=False)
    other = make_mlp(seed=4)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(rw.errors.CorruptFileError, match="no GradScaler state"):
        load_checkpoint(tmp_path / "c", other, scaler=torch.amp.GradScaler("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))
    # train() resumes an fp32 checkpoint in fp16 with a fresh scaler, warning of the changed config
    with pytest.warns(UserWarning, match="precision: 'fp32' -> 'fp16'"):
        res = train(make_mlp(), make_data(), collate, ce_loss, TrainConfig(steps=3, batch_size=8, precision="fp16"),
                    checkpoint_dir=tmp_path / "c", resume=True, progress=False)
    assert res.steps == 3
