"""A small training loop: AdamW, linear warmup then cosine decay, gradient accumulation,
clipping, periodic evaluation, and exact-resume checkpoints in safetensors + JSON.

    cfg = TrainConfig(steps=200, batch_size=16, lr=1e-3)
    result = train(model, data, collate, loss_fn, cfg, eval_fn=evaluate, checkpoint_dir="ckpt")

Determinism: micro-batch ``k`` of a run is a pure function of ``(seed, k)`` (epoch ``e`` is the
permutation ``torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + e))``,
cut into ``len(data) // batch_size`` batches; the last partial batch is dropped), and the
torch RNG (dropout) is seeded with ``seed`` inside a forked RNG, so the caller's global RNG is
untouched. A checkpoint holds everything else the next step depends on (trainable weights,
optimizer and scheduler state, RNG state), so a resumed run is bitwise identical to an
uninterrupted one.

Mixed precision (``TrainConfig(precision=...)``): ``"fp32"`` (default) runs as written; ``"bf16"`` and
``"fp16"`` run ``loss_fn`` (the forward) under ``torch.autocast(device_type, dtype)``, with the device
type of the model's first trainable parameter, and the backward, clipping and optimizer step outside it
on the float32 weights (the usual AMP recipe, as in the PyTorch AMP guide and the Hugging Face
Trainer's ``bf16=`` / ``fp16=``). ``"fp16"`` also scales the loss with ``torch.amp.GradScaler`` (float16's
range is too narrow for small gradients): gradients are unscaled before clipping, a step whose
gradients overflow is skipped by the scaler, which halves its scale (the AMP behaviour: such a step is
listed in ``TrainResult.skipped`` and is not a non-finite *loss*), and the scaler's state is in the
checkpoint, so a resume stays exact. ``eval_fn`` runs outside autocast. Trainable parameters must be
float32 for ``"fp16"`` (GradScaler cannot unscale float16 gradients). Both work on CPU in torch ≥ 2.3.

Checkpoint directory (written atomically, replacing the previous one; never pickle):

- ``model.safetensors``: the trainable parameters by name (frozen ones come from the model).
- ``optimizer.safetensors``: every tensor of the optimizer state (``state.<param_index>.<key>``),
  of its param groups and of the scheduler, and the RNG state (``rng.cpu``, ``rng.cuda.<i>``).
- ``trainer_state.json``: the step, the non-tensor parts of the optimizer and scheduler state
  (tensors appear as ``{"__tensor__": key}``), the GradScaler state (``"scaler"``, fp16 only), the
  config, and the loss/lr/eval history.

Several processes (``torch.distributed`` initialized with world size ``w > 1``, e.g. under
``torchrun`` or ``accelerate launch``; ``rankwise finetune/pretrain --nproc N`` launch it):

- the model is wrapped in ``DistributedDataParallel`` (unless it already is, is FSDP2-sharded, or
  the optimizer is a layer-wise handle, which averages gradients itself), so gradients are averaged
  over processes after each backward; ``loss_fn`` receives the wrapper, ``eval_fn`` the bare model
  (on every rank, so a sharded model's collectives match);
- ``batch_size`` is the **global** micro-batch: micro-batch ``k`` is the same indices as in one process
  (a pure function of ``(seed, k)``), and rank ``r`` takes the contiguous ``r``-th of its ``w`` equal
  parts (``batch_size`` must divide by ``w``) — a pure function of ``(seed, k, r)``. With a mean loss
  the averaged gradient is the whole batch's, so the run matches one process up to float rounding;
  gradient accumulation skips DDP's all-reduce (``no_sync``) on all but the last micro-batch;
- the logged loss is the mean over processes (one all-reduce of a scalar per step);
- checkpoints: every rank calls :func:`save_checkpoint` with the same directory; the ranks' RNG
  states are gathered, **rank 0 alone writes**, and a barrier holds the others until the folder is
  complete. Parameters and optimizer state are rank 0's (DDP keeps them identical). On resume every
  rank reads the folder and restores its own RNG state. An FSDP2-sharded model (``fully_shard``: its
  parameters and their elementwise optimizer state are ``DTensor`` shards) is checkpointed whole:
  every ``DTensor`` is all-gathered (a collective on every rank; the whole state passes through each
  rank's memory, so a model too large for one device wants ``torch.distributed.checkpoint``) and
  marked ``"__sharded__"`` in the JSON; on resume each rank keeps its own shard of it again
  (:func:`rankwise.core.distributed.shard_like`), so the checkpoint also resumes with another number
  of processes, or without sharding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .core.distributed import barrier, full, is_fsdp_sharded, is_sharded, rank, shard_like, unwrap, world_size
from .core.rank import has_rank_hooks, rank_regularization, rank_step
from .errors import ConfigError, CorruptFileError, NonFiniteLossError, ShapeMismatchError, close_names
from .io.atomic import (
    atomic_dir,
    check_output_dir,
    read_dir,
    read_json,
    read_tensors,
    recover,
    save_tensors,
    write_json,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "load_checkpoint",
    "make_optimizer",
    "make_scheduler",
    "save_checkpoint",
    "train",
    "warmup_cosine",
]

CHECKPOINT_FORMAT = "rankwise.train/1"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # TrainConfig.precision -> autocast dtype


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train`; every field is checked in ``__post_init__``."""

    steps: int = 100  # optimizer steps
    batch_size: int = 16  # examples per micro-batch (all processes together); a step sees batch_size * grad_accum
    lr: float = 1e-3  # peak learning rate (ignored when train() is given an optimizer)
    weight_decay: float = 0.0  # AdamW decoupled decay on parameters with ndim >= 2 only
    warmup: float = 0.06  # fraction of steps if < 1, else a number of steps; linear warmup then cosine to 0
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None = no clipping
    eval_every: int = 0  # 0 = only at the end (if eval_fn given)
    checkpoint_every: int = 0  # 0 = no periodic checkpoints (a final one is written if checkpoint_dir)
    seed: int = 0  # batch order and torch RNG (dropout)
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: "stop" (raise, last checkpoint kept) or "skip" the step
    precision: str = "fp32"  # "fp32"; "bf16" / "fp16": the forward under torch.autocast (fp16 with a GradScaler)

    def __post_init__(self):
        _check_int("steps", self.steps, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("grad_accum", self.grad_accum, 1)
        _check_int("eval_every", self.eval_every, 0)
        _check_int("checkpoint_every", self.checkpoint_every, 0)
        _check_int("seed", self.seed, 0)
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"TrainConfig: on_nonfinite={self.on_nonfinite!r}; use 'stop' (raise at the first NaN/inf "
                              "loss or gradient, keeping the last checkpoint) or 'skip' (drop that step's update).")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"TrainConfig: precision={self.precision!r}; use 'fp32' (no autocast), 'bf16' or "
                              "'fp16' (the forward under torch.autocast in that dtype; fp16 adds loss scaling).")
        _check_float("lr", self.lr, "a learning rate >= 0, e.g. 1e-3")
        _check_float("weight_decay", self.weight_decay, "a decay >= 0, e.g. 0.01")
        _check_float("warmup", self.warmup, "a fraction of steps (< 1, e.g. 0.06) or a number of steps")
        if self.warmup >= 1:
            if self.warmup != int(self.warmup):
                raise ConfigError(f"TrainConfig: warmup={self.warmup!r} is >= 1, so it counts steps and must be "
                                  "a whole number; use a fraction < 1 for a share of the steps.")
            if self.warmup > self.steps:
                raise ConfigError(f"TrainConfig: warmup={self.warmup!r} steps is more than steps={self.steps}; "
                                  "lower warmup or raise steps.")
        if self.max_grad_norm is not None:
            _check_float("max_grad_norm", self.max_grad_norm, "a norm > 0 (e.g. 1.0) or None for no clipping")
            if self.max_grad_norm == 0:
                raise ConfigError("TrainConfig: max_grad_norm=0 would zero every gradient; use a norm > 0 "
                                  "(e.g. 1.0) or None for no clipping.")

    @property
    def warmup_steps(self) -> int:
        """Number of warmup steps: ``round(warmup * steps)`` for a fraction, else ``warmup``."""
        return round(self.warmup * self.steps) if self.warmup < 1 else int(self.warmup)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"TrainConfig: {name}={value!r} must be an int >= {low}.")


def _check_float(name: str, value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"TrainConfig: {name}={value!r} is invalid; use {what}.")


@dataclass
class TrainResult:
    losses: list[float]  # one per optimizer step (mean over accumulation micro-batches)
    evals: list[tuple[int, dict]]  # (step, metrics)
    wall_time: float  # seconds spent in this call
    steps: int  # optimizer steps done in total (including those before a resume)
    lrs: list[float] = field(default_factory=list)  # learning rate (first param group) used at each step
    skipped: list[int] = field(default_factory=list)  # steps of this call whose update was dropped (on_nonfinite="skip")


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule


def warmup_cosine(steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier for ``LambdaLR``: linear warmup to 1, then cosine to 0.

    ``LambdaLR`` calls it with ``s`` = optimizer steps already taken, so optimizer step
    ``k = s + 1`` (1-based) runs at ``lr * k / W`` for ``k <= W`` (no wasted step at lr 0),
    then at ``lr * (1 + cos(pi * (k - 1 - W) / (steps - W))) / 2``, which reaches 0 just
    after the last step.
    """

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        if s >= steps:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * (s - warmup_steps) / (steps - warmup_steps)))

    return factor


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norm weights (ndim < 2)."""
    params = _trainable(model)
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": ps, "weight_decay": wd}
              for ps, wd in ((decay, config.weight_decay), (no_decay, 0.0)) if ps]
    return torch.optim.AdamW(groups, lr=config.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.steps, config.warmup_steps))


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError(f"train: {type(model).__name__} has no parameters with requires_grad=True; adapt it "
                          "first (rw.adapt) or unfreeze the parameters to train.")
    return params


def _mixed_precision(model: nn.Module, params: list, config: TrainConfig):
    """``(autocast context factory, GradScaler or None)`` for ``config.precision``; checked before training."""
    dtype = PRECISIONS[config.precision]
    if dtype is None:
        return contextlib.nullcontext, None
    device_type = params[0].device.type if params else "cpu"
    if config.precision == "fp16":
        low = [n for n, p in unwrap(model).named_parameters() if p.requires_grad and p.dtype == torch.float16]
        if low:
            raise ConfigError(f"train: precision='fp16' needs float32 trainable parameters (GradScaler cannot unscale "
                              f"float16 gradients), but {low[0]!r} is float16. Keep the trainable parameters in "
                              "float32 (model.float(), or adapt a float32 model), or use precision='bf16'.")
    try:
        torch.autocast(device_type, dtype=dtype)
    except RuntimeError as e:  # a device type without autocast in that dtype
        raise ConfigError(f"train: precision={config.precision!r} is not available on {device_type!r} in torch "
                          f"{torch.__version__} ({e}); use precision='fp32'.") from e
    scaler = torch.amp.GradScaler(device_type) if config.precision == "fp16" else None
    return (lambda: torch.autocast(device_type, dtype=dtype)), scaler


def _checkpointed(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: the trainable parameters, and every tensor (frozen parameters,
    persistent buffers) of a module with ``checkpoint_frozen = True`` — a module whose frozen state
    changes while training (ReLoRA merges into its frozen ``W``; LoQT re-quantizes its base; SST
    swaps its sampled vectors), so a resume restores it too. Names are the bare model's (a DDP
    wrapper is looked through), so a checkpoint resumes with any number of processes."""
    model = unwrap(model)
    out = dict(_trainable(model))
    for prefix, module in model.named_modules():
        if getattr(module, "checkpoint_frozen", False) is True:
            for k, t in module.state_dict(prefix=f"{prefix}." if prefix else "", keep_vars=True).items():
                out.setdefault(k, t)
    return out


# ---------------------------------------------------------------------------------------------
# The loop


def train(
    model: nn.Module,
    train_data: Sequence,
    collate: Callable[[list], object],
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    config: TrainConfig | None = None,
    *,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
    optimizer: torch.optim.Optimizer | None = None,
    lr_lambda: Callable[[int], float] | None = None,
) -> TrainResult:
    """Train ``model`` for ``config.steps`` optimizer steps; return losses, evals and wall time.

    ``train_data``: any sequence (``len`` and integer indexing); ``collate(items) -> batch``;
    ``loss_fn(model, batch) -> scalar tensor``, the mean over the batch (each micro-batch loss is
    scaled by ``1 / grad_accum``, so accumulation matches one big batch); ``eval_fn(model) ->
    {metric: float}`` runs in eval mode under ``no_grad`` every ``eval_every`` steps and at the
    end. ``optimizer`` replaces the default AdamW (``config.lr``/``weight_decay`` then do not
    apply; the warmup-cosine schedule scales its learning rates). ``lr_lambda(step) -> factor``
    replaces that schedule (e.g. ReLoRA's jagged cosine, ``rankwise.pretrain.relora.jagged_cosine``). ``checkpoint_dir``: write a
    checkpoint there every ``checkpoint_every`` steps and at the end; with ``resume=True`` an
    existing checkpoint there is loaded and training continues from its step (the result then
    holds the whole history). The model must be built the same way as for the first run: only
    trainable parameters are saved. Under ``torch.distributed`` (world size > 1) every process calls
    ``train`` with the same arguments; see the module docstring (DDP, global ``batch_size``, rank 0
    writes the checkpoints).
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"train: config must be a TrainConfig, got {type(config).__name__}.")
    n = len(train_data)
    if n < config.batch_size:
        raise ConfigError(f"train: {n} training examples is fewer than batch_size={config.batch_size}; "
                          "lower batch_size or add data (the last partial batch of an epoch is dropped).")
    world, me = world_size(), rank()
    if config.batch_size % world:
        raise ConfigError(f"train: batch_size={config.batch_size} is the global micro-batch and must divide evenly "
                          f"over the {world} processes; use a multiple of {world} (e.g. "
                          f"{max(world, config.batch_size // world * world)}).")
    if resume and checkpoint_dir is None:
        raise ConfigError("train: resume=True needs checkpoint_dir= (the directory of the checkpoint to resume).")
    if checkpoint_dir is not None:
        _check_replaceable(Path(checkpoint_dir))
    if optimizer is None:
        optimizer = make_optimizer(model, config)
    scheduler = (make_scheduler(optimizer, config) if lr_lambda is None
                 else torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    autocast, scaler = _mixed_precision(model, params, config)
    batches = _BatchOrder(n, config.batch_size, config.seed, rank=me, world=world)
    bare = unwrap(model)
    ranked = has_rank_hooks(bare)

    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    t0 = time.perf_counter()
    was_training = model.training
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(config.seed)
        step, losses, lrs, evals, skipped = 0, [], [], [], []
        digest = _fingerprint(train_data) if checkpoint_dir is not None else None
        if resume and has_checkpoint(checkpoint_dir):
            saved_state = _read_state(Path(checkpoint_dir))
            done = int(saved_state.get("step", 0))
            if done > config.steps:  # checked before anything is loaded: the model stays as it was
                raise ConfigError(f"train: the checkpoint in {checkpoint_dir} is at step {done}, past steps="
                                  f"{config.steps}; resuming would return the {done}-step model as if it had "
                                  f"{config.steps}. Pass steps >= {done}, or another checkpoint_dir to start anew.")
            # a checkpoint of another precision resumes with a fresh scaler (_history warns of the change)
            resume_scaler = scaler if saved_state.get("scaler") is not None else None
            step = load_checkpoint(checkpoint_dir, model, optimizer, scheduler, scaler=resume_scaler)
            losses, lrs, evals = _history(checkpoint_dir, config, digest)
        model = _ddp(model, optimizer)  # after loading: every rank starts from the same weights
        model.train()
        bar = _progress(config.steps, step, desc, progress)
        while step < config.steps:
            optimizer.zero_grad(set_to_none=True)
            total = None
            for micro in range(config.grad_accum):
                batch = collate([train_data[i] for i in batches[step * config.grad_accum + micro]])
                sync = micro == config.grad_accum - 1 or not isinstance(model, nn.parallel.DistributedDataParallel)
                with contextlib.nullcontext() if sync else model.no_sync():  # all-reduce on the last micro-batch
                    with autocast():
                        loss = loss_fn(model, batch)
                    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                        raise ConfigError(f"train: loss_fn must return a scalar tensor, got "
                                          f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss)}; "
                                          "reduce it with .mean() over the batch.")
                    reg = rank_regularization(bare) if ranked else None  # e.g. AdaLoRA's orthogonality term
                    scaled = (loss if reg is None else loss + reg) / config.grad_accum
                    (scaled if scaler is None else scaler.scale(scaled)).backward()
                total = loss.detach() if total is None else total + loss.detach()
            if world > 1:  # the logged loss (and the NaN check) is the mean over processes, the same on each
                total = total.clone()
                torch.distributed.all_reduce(total)
                total = total / world
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip and check the true gradients
            # the loss and the gradient norm (clipped or not) read together: one host sync per step
            norm = full(nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf))  # FSDP2: a DTensor
            mean_loss, norm_value = torch.stack([(total / config.grad_accum).float(),
                                                 norm.float().to(total.device)]).tolist()
            lr = optimizer.param_groups[0]["lr"]
            finite = math.isfinite(mean_loss) and math.isfinite(norm_value)
            overflow = scaler is not None and math.isfinite(mean_loss) and not finite  # fp16: the scaler's to handle
            if not finite and not overflow and config.on_nonfinite == "stop":
                kept = f" (the last checkpoint in {checkpoint_dir} is intact)" if checkpoint_dir is not None else ""
                raise NonFiniteLossError(
                    f"train: step {step + 1} has loss {mean_loss} and gradient norm {norm_value} at lr {lr:.3g}; "
                    f"nothing was stepped or saved for it{kept}. Lower the learning rate, keep gradient clipping "
                    "on (max_grad_norm), check the data for empty or extreme examples, or pass "
                    "TrainConfig(on_nonfinite='skip') to drop such steps.")
            if finite:
                optimizer.step() if scaler is None else scaler.step(optimizer)
            else:  # on_nonfinite="skip", or an fp16 overflow: drop this step's update; the schedule moves on
                optimizer.zero_grad(set_to_none=True)
                skipped.append(step + 1)
            if scaler is not None:
                scaler.update()  # unscale_ recorded the overflow, if any: then it halves the scale
            step += 1
            if ranked and finite:  # rank allocation, SoRA's proximal step, LaMDA's freezing: needs this step's .grad
                rank_step(bare, step, optimizer, total_steps=config.steps)  # and lr (before the scheduler moves it)
            scheduler.step()
            losses.append(mean_loss)
            lrs.append(float(lr))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{float(lr):.2e}", refresh=False)
            bar.update(1)

            if eval_fn is not None and (step == config.steps or (config.eval_every and step % config.eval_every == 0)):
                evals.append((step, _evaluate(bare, eval_fn)))
            if checkpoint_dir is not None and (step == config.steps or (
                    config.checkpoint_every and step % config.checkpoint_every == 0)):
                save_checkpoint(checkpoint_dir, model, optimizer, scheduler, step, config=config,
                                history={"losses": losses, "lrs": lrs, "evals": evals, "data": digest},
                                scaler=scaler)
        bar.close()
        if eval_fn is not None and (not evals or evals[-1][0] != step):
            evals.append((step, _evaluate(bare, eval_fn)))  # resumed at the end: nothing ran yet
    bare.train(was_training)
    return TrainResult(losses=losses, evals=evals, wall_time=time.perf_counter() - t0, steps=step, lrs=lrs,
                       skipped=skipped)


class _BatchOrder:
    """Indices of micro-batch ``k`` on rank ``rank`` of ``world``: a pure function of ``(seed, k, rank)``.
    One permutation per epoch cut into global micro-batches of ``batch_size``; rank ``r`` takes the
    ``r``-th of ``world`` equal contiguous parts of each."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self.local = batch_size // world
        self.start = rank * self.local
        self._epoch, self._perm = -1, None

    def __getitem__(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        first = j * self.batch_size + self.start
        return self._perm[first:first + self.local]


def _ddp(model: nn.Module, optimizer) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when several processes run and nothing else averages
    the gradients: not when it is already wrapped, FSDP2-sharded (FSDP reduces them) or stepped by a
    layer-wise handle (its hooks all-reduce). CUDA models get ``device_ids=[their device]``."""
    if world_size() <= 1 or isinstance(model, nn.parallel.DistributedDataParallel) or is_fsdp_sharded(model):
        return model
    from .optim.layerwise import LayerwiseHandle

    if isinstance(optimizer, LayerwiseHandle):
        return model
    devices = {p.device for p in model.parameters()}
    device = next(iter(devices))
    ids = [device] if len(devices) == 1 and device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _evaluate(model: nn.Module, eval_fn) -> dict[str, float]:
    model.eval()
    try:
        with torch.no_grad():
            metrics = eval_fn(model)
    finally:
        model.train()
    if not isinstance(metrics, dict):
        raise ConfigError(f"train: eval_fn must return a dict of metric name -> float, got "
                          f"{type(metrics).__name__}.")
    return {str(k): float(v) for k, v in metrics.items()}


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)


def _fingerprint(data: Sequence) -> str:
    """A cheap digest of the training data: its length and its first, middle and last examples (the
    tensors' bytes): another file, split or tokenization length gives another digest."""
    import hashlib

    h = hashlib.sha256(str(len(data)).encode())

    def feed(x):
        if isinstance(x, torch.Tensor):
            h.update(f"{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                feed(v)
        else:
            h.update(repr(x).encode())

    for i in sorted({0, len(data) // 2, len(data) - 1}) if len(data) else ():
        feed(data[i])
    return h.hexdigest()[:16]


def _history(checkpoint_dir, config: TrainConfig, data_digest: str | None = None):
    state = _read_state(Path(checkpoint_dir))
    saved = state.get("config") or {}
    changed = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(config).items()
               if k in saved and saved[k] != v and k not in ("steps", "eval_every", "checkpoint_every")]
    if changed:
        warnings.warn(f"train: resuming from {checkpoint_dir} with a different config ({'; '.join(changed)}); "
                      "the run will not match an uninterrupted one.", stacklevel=3)
    hist = state.get("history") or {}
    if data_digest is not None and hist.get("data") not in (None, data_digest):
        warnings.warn(f"train: resuming from {checkpoint_dir} with different training data (another file, split "
                      "or tokenization length than the run that wrote it); the run will not match an "
                      "uninterrupted one.", stacklevel=3)
    evals = [(int(s), dict(m)) for s, m in hist.get("evals", [])]
    return [float(v) for v in hist.get("losses", [])], [float(v) for v in hist.get("lrs", [])], evals


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors + JSON, never pickle


def save_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler=None,
    step: int = 0,
    *,
    config: TrainConfig | None = None,
    history: dict | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write a checkpoint directory atomically (an existing one is replaced only once complete).

    Saves the trainable parameters of ``model`` (and the whole state of its modules marked
    ``checkpoint_frozen = True``, see :func:`_checkpointed`), the optimizer and scheduler state (either may be
    ``None``), the torch RNG state, ``step``, and optionally the config, a JSON-able history and the
    ``GradScaler`` state of an fp16 run (its scale and growth tracker: numbers, in the JSON).
    """
    directory = Path(directory)
    _check_replaceable(directory)
    params = _checkpointed(model)
    world = world_size()
    rngs = _gather_rng() if world > 1 else None  # collective: every rank calls save_checkpoint
    # FSDP2 shards are gathered here, on every rank in the same order (collectives), before rank 0 writes
    weights = {name: full(p).detach() for name, p in params.items()}
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "params": {name: list(p.shape) for name, p in params.items()},
        "optimizer": None if optimizer is None else _encode(optimizer.state_dict(), "", tensors),
        "scheduler": None if scheduler is None else _encode(scheduler.state_dict(), "scheduler.", tensors),
        "scaler": None if scaler is None else _encode(scaler.state_dict(), "scaler.", tensors),
        "config": None if config is None else dataclasses.asdict(config),
        "history": history,
        "world_size": world,
    }
    if world > 1 and rank() != 0:
        barrier()  # returns once rank 0 has written the folder
        return directory
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            tensors[f"rng.cuda.{i}"] = torch.cuda.get_rng_state(i)
    for r, states in enumerate(rngs or ()):  # each process's own RNG state, restored on its rank
        tensors.update({f"rng.rank{r}.{k}": v for k, v in states.items()})
    try:
        with atomic_dir(directory, CHECKPOINT_NAMES, "checkpoint_dir", _is_checkpoint) as tmp:
            save_tensors(tmp / "model.safetensors", weights)
            save_tensors(tmp / "optimizer.safetensors", tensors)
            write_json(tmp / "trainer_state.json", state)
    finally:
        if world > 1:
            barrier()
    return directory


def _gather_rng() -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG state (CPU, and the current CUDA device's when CUDA is in use), on every rank."""
    import torch.distributed as dist

    mine = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mine["cuda"] = torch.cuda.get_rng_state()
    out: list = [None] * world_size()
    dist.all_gather_object(out, mine)
    return out


def load_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, *, scaler: torch.amp.GradScaler | None = None) -> int:
    """Load a :func:`save_checkpoint` directory into ``model`` (and optimizer, scheduler, GradScaler);
    return the step.

    Everything is checked before anything changes: a parameter whose name or shape differs
    from the model's trainable ones raises :class:`~rankwise.errors.ShapeMismatchError`; a
    ``scaler`` with a checkpoint that holds none (a run that was not fp16) raises
    :class:`~rankwise.errors.CorruptFileError`. Also restores the torch RNG state saved with the checkpoint.
    """
    directory = Path(directory)
    fix = "load_checkpoint: the checkpoint is incomplete or damaged, write a new one."
    state, saved, extra = read_dir(directory, lambda d: (_read_state(d), read_tensors(d / "model.safetensors", fix),
                                                         read_tensors(d / "optimizer.safetensors", fix)))
    params = _checkpointed(model)
    _check_params(directory, saved, params)
    opt_state = None
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise CorruptFileError(f"load_checkpoint: {directory} holds no optimizer state; pass optimizer=None "
                                   "to load the weights only.")
        opt_state = _decode(state["optimizer"], extra)
        _check_groups(directory, opt_state, optimizer)
    if scheduler is not None and state.get("scheduler") is None:
        raise CorruptFileError(f"load_checkpoint: {directory} holds no scheduler state; pass scheduler=None.")
    if scaler is not None and state.get("scaler") is None:
        raise CorruptFileError(f"load_checkpoint: {directory} holds no GradScaler state (the run that wrote it was not "
                               "precision='fp16'); resume with the precision it was trained in, or pass scaler=None.")

    with torch.no_grad():
        for name, p in params.items():
            p.copy_(shard_like(saved[name].to(p.device), p))  # an FSDP2 shard takes its own part
    if optimizer is not None:
        optimizer.load_state_dict(_reshard(opt_state, optimizer))
    if scheduler is not None:
        scheduler.load_state_dict(_decode(state["scheduler"], extra))
    if scaler is not None:
        scaler.load_state_dict(_decode(state["scaler"], extra))
    torch.set_rng_state(extra["rng.cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"rng.cuda.{i}" in extra:
                torch.cuda.set_rng_state(extra[f"rng.cuda.{i}"], i)
    me = f"rng.rank{rank()}." if world_size() > 1 else None  # a multi-process checkpoint: this rank's own
    if me is not None and me + "cpu" in extra:
        torch.set_rng_state(extra[me + "cpu"])
        if me + "cuda" in extra and torch.cuda.is_available():
            torch.cuda.set_rng_state(extra[me + "cuda"])
    return int(state["step"])


#: What a checkpoint folder holds; replacing it never deletes anything else.
CHECKPOINT_NAMES = ("model.safetensors", "optimizer.safetensors", "trainer_state.json")


def _is_checkpoint(directory: Path) -> bool:
    return (directory / "trainer_state.json").is_file()


def _check_replaceable(directory: Path) -> Path:
    """Refuse to replace a path that is not a checkpoint folder (its files would be deleted)."""
    return check_output_dir(directory, CHECKPOINT_NAMES, "checkpoint_dir", _is_checkpoint)


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a checkpoint (after repairing a swap a crash interrupted)."""
    return _is_checkpoint(recover(directory))


def _read_state(directory: Path) -> dict:
    path = directory / "trainer_state.json"
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: {directory} is not a rankwise checkpoint (no trainer_state.json); "
                                "pass the directory given to train(checkpoint_dir=...).")
    state = read_json(path, "load_checkpoint: the checkpoint is damaged, write a new one.")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CorruptFileError(f"load_checkpoint: {path} has format {state.get('format')!r}, expected "
                               f"{CHECKPOINT_FORMAT!r}.")
    return state


def _check_params(directory: Path, saved: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> None:
    extra = [name for name in saved if name not in params]
    if extra:
        shown = ", ".join(f"{n!r} {tuple(saved[n].shape)}" for n in extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise ShapeMismatchError(
            f"load_checkpoint: {directory} holds parameter(s) {shown} that are not trainable parameters of the "
            f"model.{close_names(extra[0], params)} Adapt (or unfreeze) the model the same way as the run that "
            "wrote the checkpoint.")
    for name, p in params.items():  # in model order, so the first mismatch reported is the earliest
        if name in saved and tuple(saved[name].shape) != tuple(p.shape):
            raise ShapeMismatchError(
                f"load_checkpoint: parameter {name!r} has shape {tuple(saved[name].shape)} in {directory} but "
                f"shape {tuple(p.shape)} in the model; build the model (and adapters, rank) as in the run "
                "that wrote the checkpoint.")
    missing = [name for name in params if name not in saved]
    if missing:
        raise ShapeMismatchError(
            f"load_checkpoint: {directory} has no value for trainable parameter(s) "
            f"{', '.join(map(repr, missing[:5]))}{' ...' if len(missing) > 5 else ''} of the model; adapt the "
            "model the same way as the run that wrote the checkpoint (or freeze these parameters).")


def _check_groups(directory: Path, saved: dict, optimizer: torch.optim.Optimizer) -> None:
    have = [len(g["params"]) for g in optimizer.param_groups]
    got = [len(g["params"]) for g in saved["param_groups"]]
    if have != got:
        raise ShapeMismatchError(
            f"load_checkpoint: the optimizer state in {directory} has param groups of sizes {got}, the "
            f"optimizer has {have}; use the same optimizer (and trainable parameters) as the saved run.")


class _Shard:
    """A whole tensor read from a checkpoint that was an FSDP2 shard when saved (see :func:`_reshard`)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _reshard(opt_state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The decoded optimizer state with each entry saved from a ``DTensor`` laid out again like its
    parameter (this rank's shard; the whole tensor when the parameter is not sharded now)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, entry in opt_state.get("state", {}).items():
        for k, v in entry.items():
            if isinstance(v, _Shard):
                p = params[i]
                entry[k] = shard_like(v.tensor.to(p.device), p)
    return opt_state


def _encode(obj, path: str, tensors: dict[str, torch.Tensor]):
    """A JSON-able copy of ``obj``; each tensor goes to ``tensors[path]`` and is left as a marker (an
    FSDP2 ``DTensor`` is all-gathered — a collective — and its marker says ``"__sharded__"``)."""
    if isinstance(obj, torch.Tensor) and is_sharded(obj):
        return {**_encode(obj.full_tensor(), path, tensors), "__sharded__": True}
    if isinstance(obj, torch.Tensor):
        key = path.rstrip(".")
        # safetensors stores tensors contiguous; a transposed view (a projector's basis, column-major
        # from LAPACK) is stored as its contiguous permutation and restored as the same view, so the
        # resumed matmuls read memory in the same order and the run stays bitwise identical
        dims = sorted(range(obj.ndim), key=lambda d: -obj.stride(d))
        if obj.ndim > 1 and not obj.is_contiguous() and obj.permute(dims).is_contiguous():
            tensors[key] = obj.permute(dims)
            return {"__tensor__": key, "__dims__": dims}
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, f"{path}{k}.", tensors) for k, v in obj.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {"__int_keys__": {str(k): _encode(v, f"{path}{k}.", tensors) for k, v in obj.items()}}
    elif isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}{i}.", tensors) for i, v in enumerate(obj)]}
    elif isinstance(obj, list):
        return [_encode(v, f"{path}{i}.", tensors) for i, v in enumerate(obj)]
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ConfigError(f"save_checkpoint: state entry {path.rstrip('.')!r} is a {type(obj).__name__}, which cannot "
                      "be stored without pickle; keep optimizer/scheduler state to tensors, numbers and strings.")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if obj.get("__sharded__") is True:
            return _Shard(_decode({k: v for k, v in obj.items() if k != "__sharded__"}, tensors))
        if set(obj) in ({"__tensor__"}, {"__tensor__", "__dims__"}):
            key = obj["__tensor__"]
            if key not in tensors:
                raise CorruptFileError(f"load_checkpoint: tensor {key!r} is missing from optimizer.safetensors; "
                                       "the checkpoint is damaged.")
            dims = obj.get("__dims__")
            return tensors[key] if dims is None else tensors[key].permute(sorted(range(len(dims)), key=dims.__getitem__))
        if set(obj) == {"__int_keys__"}:
            return {int(k): _decode(v, tensors) for k, v in obj["__int_keys__"].items()}
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj
