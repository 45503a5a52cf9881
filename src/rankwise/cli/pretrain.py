"""``rankwise pretrain``: train a small LLaMA from scratch with a memory-efficient optimizer.

    rankwise pretrain --model-config llama-tiny --optimizer galore --rank 128 --steps 200 --out runs/galore

The recipe (also used by ``benchmarks/optimizers.py``):

* **Model** — ``LlamaForCausalLM`` with random weights from a named config (:data:`MODEL_CONFIGS`;
  ``llama-tiny`` has 10.8M parameters) or a JSON file of ``LlamaConfig`` fields.
* **Data** — the Python standard library's own ``.py`` source (nothing is downloaded), as a byte
  stream: one token per byte, vocabulary 256. Files are walked in sorted order (``test``,
  ``idlelib``, ``site-packages`` … skipped); every 20th file is held out for validation. The train
  stream is cut into non-overlapping windows of ``seq_len`` tokens, shuffled per epoch by seed.
* **Optimizer** — any of :data:`OPTIMIZERS`. Projected optimizers get the weight matrices of the
  attention and MLP blocks (embeddings, norms and the output layer take their AdamW fallback);
  ``--rank``, ``--update-gap``, ``--scale``, ``--projector`` set their group. Training uses
  :func:`rankwise.train.train` (linear warmup then cosine decay, gradient clipping at 1.0).
* **Parametrization** — ``--parametrization`` (:data:`PARAMETRIZATIONS`): ``full`` trains the dense
  weights; the others replace the attention and MLP projections by a :mod:`rankwise.pretrain`
  parametrization *before* the optimizer is built (ReLoRA, PeriodicLoRA, SLTrain, CoLA, SST, LoQT),
  so the optimizer trains its factors (projected optimizers project the factor matrices) and
  ``rank_step`` inside ``train`` runs its merges and restarts. ``--param-rank`` (default
  hidden_size / 4), ``--density``, ``--reset-every``, ``--refactorize-every`` set its options.
  ReLoRA runs its jagged cosine schedule (a re-warmup after each merge); the others train's
  warmup-cosine.

* **Checkpoints** — ``--checkpoint-every N`` writes ``out/checkpoint`` (atomically, through
  :func:`rankwise.train.train`) every N steps and at the end; it holds the parametrized layers'
  whole state (merged weights, quantized base, sampled vectors), the optimizer, scheduler and RNG.
  ``--resume`` continues from it, bit-exactly (merges and re-quantizations included). A resume
  must use the settings of the run that wrote it (``run.json``: model, parametrization and its
  options, optimizer and its options, seed, batch, sequence length, warmup, spike options); any
  other is refused naming both values, before anything is written. ``--steps`` may differ (not below
  the checkpoint's step), but the schedule then differs from the first run's.
* **Loss spikes** — a step whose loss is above ``--spike-factor`` (3) × the median of the last
  ``--spike-window`` (50) finite step losses is warned about and listed in the report;
  ``--skip-spikes`` drops its update (:class:`SpikeGuard`).

Output folder: ``report.md`` (summary table: losses, validation perplexity, stored and trainable
parameters, optimizer-state bytes, peak RSS, time per step, tokens/s, spikes), ``loss_curve.png``,
``model.safetensors`` (final weights, written atomically: a plain LLaMA state dict — a
parametrized model is turned dense first — except CoLA, saved in its factorized form),
``config.json`` (the model config), ``run.json`` (the run's settings and final metrics),
``checkpoint/`` (with ``--checkpoint-every`` / ``--resume``) and ``hf/`` (with ``--hf``: a plain
Hugging Face folder). :func:`rankwise.pretrain.load_pretrained` loads the folder back in one call;
:func:`rankwise.pretrain.export_dense` writes the plain folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ConfigError

VOCAB = 256  # byte-level

#: Named model configs (``LlamaConfig`` fields; vocabulary 256, untied output layer).
MODEL_CONFIGS: dict[str, dict] = {
    # 10.8M parameters: 6 x (4·384² attention + 3·384·1024 MLP) + 2·256·384 embeddings/output
    "llama-tiny": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                       num_key_value_heads=6),
    # 20.1M parameters
    "llama-small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                        num_key_value_heads=8),
    # 0.13M parameters: smoke runs
    "llama-micro": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4),
}
_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-6,
               bos_token_id=None, eos_token_id=None, pad_token_id=None, initializer_range=0.02)

#: Projected weights: the matrices of attention and MLP blocks (GaLore's choice).
TARGETS = r"(self_attn|mlp)\."

#: Optimizer name -> (default learning rate, what it is). Learning rates follow the papers' small-LLaMA
#: settings (projected optimizers use 10x AdamW's rate with scale 0.25, APOLLO-Mini scale 128).
OPTIMIZERS: dict[str, tuple[float, str]] = {
    "adamw": (1e-3, "torch.optim.AdamW, full state"),
    "galore": (1e-2, "GaLoreAdamW (exact SVD on CPU, randomized SVD on GPU, unless --projector)"),
    "galore8bit": (1e-2, "GaLoreAdamW8bit: 8-bit block-wise moments"),
    "qgalore": (1e-2, "QGaLoreAdamW: int4 projector, int8 weights, lazy subspace updates"),
    "fira": (1e-2, "Fira: GaLore + scaled out-of-subspace residual"),
    "flora": (1e-3, "Flora: Adafactor with momentum compressed by resampled random projections"),
    "apollo": (1e-2, "APOLLO: channel-wise scaling from a random rank-r space"),
    "apollo-mini": (1e-2, "APOLLO-Mini: rank 1, tensor-wise scaling"),
    "frugal": (1e-3, "FRUGAL: Adam in the subspace, signSGD on the rest"),
    "gradnorm-lorp": (1e-2, "GradNormLoRP: weight-normalized, projected direction gradient"),
    "adafactor": (1e-3, "Adafactor: factored second moment"),
    "smmf": (1e-3, "SMMF: rank-1 factored square-matricized moments"),
}
_DEFAULT_SCALE = {"galore": 0.25, "galore8bit": 0.25, "qgalore": 0.25, "fira": 0.25, "gradnorm-lorp": 0.25,
                  "apollo": 1.0, "apollo-mini": 128.0}


# ---------------------------------------------------------------------------------------------- model
def model_config(spec: str, **overrides) -> dict:
    """``LlamaConfig`` fields for a named config or a JSON file (vocabulary forced to 256 bytes)."""
    if spec in MODEL_CONFIGS:
        cfg = dict(_COMMON, **MODEL_CONFIGS[spec])
    elif spec.endswith(".json") or Path(spec).is_file():
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"pretrain: model config file {path} does not exist; give one of "
                              f"{', '.join(MODEL_CONFIGS)} or a JSON file of LlamaConfig fields.")
        try:
            fields = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"pretrain: {path} is not valid JSON ({e}).") from None
        if not isinstance(fields, dict):
            raise ConfigError(f"pretrain: {path} holds a JSON {type(fields).__name__}; it must be an object of "
                              "LlamaConfig fields, e.g. {\"hidden_size\": 256, \"num_hidden_layers\": 4}.")
        if fields.get("vocab_size", VOCAB) != VOCAB:
            raise ConfigError(f"pretrain: {path} sets vocab_size={fields['vocab_size']}; the byte-level data has a "
                              f"vocabulary of {VOCAB}. Remove the field.")
        cfg = dict(_COMMON, **fields)
    else:
        from ..errors import close_names

        raise ConfigError(f"pretrain: unknown model config {spec!r}; give one of {', '.join(MODEL_CONFIGS)} or a "
                          "path to a .json file." + close_names(spec, MODEL_CONFIGS))
    cfg.update(overrides)
    return cfg


def build_model(spec: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``LlamaForCausalLM`` with random weights seeded by ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = LlamaConfig(**model_config(spec))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


# ---------------------------------------------------------------------------------------------- data
_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"})


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (next to ``os.py``), in sorted walk order."""
    root = Path(os.__file__).parent
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def stdlib_bytes(train_tokens: int, valid_tokens: int, valid_every: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, valid)`` uint8 token streams of at least the requested lengths (files joined by a blank
    line; every ``valid_every``-th file goes to ``valid``). Raises if the stdlib is too small."""
    train, valid = bytearray(), bytearray()
    for i, path in enumerate(stdlib_files()):
        if len(train) >= train_tokens and len(valid) >= valid_tokens:
            break
        target = valid if i % valid_every == valid_every - 1 else train
        try:
            target += path.read_bytes() + b"\n\n"
        except OSError:
            continue
    if len(train) < train_tokens or len(valid) < valid_tokens:
        raise ConfigError(f"pretrain: the standard library under {Path(os.__file__).parent} holds only {len(train)} "
                          f"train / {len(valid)} validation bytes, fewer than the {train_tokens} / {valid_tokens} "
                          "asked for; lower --steps, --batch-size or --seq-len.")
    return (torch.frombuffer(train[:train_tokens], dtype=torch.uint8),
            torch.frombuffer(valid[:valid_tokens], dtype=torch.uint8))


class Windows(Sequence):
    """Non-overlapping windows of ``seq_len`` tokens of a stream (item ``i`` → a long tensor)."""

    def __init__(self, stream: torch.Tensor, seq_len: int):
        self.stream, self.seq_len = stream, seq_len

    def __len__(self) -> int:
        return self.stream.numel() // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.stream[i * self.seq_len:(i + 1) * self.seq_len].long()


def collate(items: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(items)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token); ``ids`` go to the model's device (``--device``)."""
    ids = ids.to(next(model.parameters()).device)
    return model(input_ids=ids, labels=ids).loss


def evaluator(windows: Windows, batch_size: int = 16):
    @torch.no_grad()
    def evaluate(model) -> dict[str, float]:
        total, n = 0.0, 0
        for i in range(0, len(windows), batch_size):
            ids = collate([windows[j] for j in range(i, min(i + batch_size, len(windows)))])
            total += lm_loss(model, ids).item() * ids.shape[0]
            n += ids.shape[0]
        loss = total / max(n, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    return evaluate


# ---------------------------------------------------------------------------------------------- parametrization
#: ``--parametrization`` choices: ``full`` (dense weights) or a :mod:`rankwise.pretrain` name.
PARAMETRIZATIONS = ("full", "relora", "periodic_lora", "sltrain", "cola", "sst", "loqt")
_PARAM_FLAGS = {"rank": "--param-rank", "density": "--density", "reset_every": "--reset-every",
                "refactorize_every": "--refactorize-every", "quant": "--quant"}
#: ``--reset-every N`` sets the period of the parametrization's training-time event: ReLoRA's and
#: PeriodicLoRA's merge-and-restart (``reset_every``), LoQT's first merge gap τ (``update_gap``; later
#: gaps grow as the paper's schedule) and SST's resampling period (``resample_every``).
_EVENT_FIELD = {"relora": "reset_every", "periodic_lora": "reset_every", "loqt": "update_gap",
                "sst": "resample_every"}


def parametrize_model(model, name: str, *, rank: int | None = None, density: float | None = None,
                      reset_every: int | None = None, refactorize_every: int | None = None, quant: str | None = None,
                      seed: int = 0):
    """Apply ``--parametrization name`` to ``model`` (in place; ``full`` leaves it as it is). Options
    go to the parametrization's ``Config`` fields of the same name (``reset_every`` to the field of
    :data:`_EVENT_FIELD`); one it has no field for is an error, and ``rank`` defaults to
    ``hidden_size // 4`` (the papers' ratio: rank 128 at width 512)."""
    values = {"rank": rank, "density": density, "reset_every": reset_every, "refactorize_every": refactorize_every,
              "quant": quant}
    given = [_PARAM_FLAGS[k] for k, v in values.items() if v is not None]
    if name not in PARAMETRIZATIONS:
        from ..errors import close_names

        raise ConfigError(f"pretrain: unknown parametrization {name!r}; choose one of {', '.join(PARAMETRIZATIONS)}."
                          + close_names(name, PARAMETRIZATIONS))
    if name == "full":
        if given:
            raise ConfigError(f"pretrain: {given[0]} sets an option of a low-rank parametrization, but "
                              "--parametrization is full; pass --parametrization relora / sltrain / ... or drop it.")
        return model
    from .. import pretrain as rp

    if name not in rp.PARAMETRIZATIONS:
        raise ConfigError(f"pretrain: --parametrization {name} is not available in this install (rankwise.pretrain "
                          f"has {', '.join(sorted(rp.PARAMETRIZATIONS))}); choose one of those.")
    fields = {f.name for f in dataclasses.fields(rp.PARAMETRIZATIONS[name].Config)}
    options = {}
    for key, value in values.items():
        field = _EVENT_FIELD.get(name, key) if key == "reset_every" else key
        if value is not None:
            if field not in fields:
                raise ConfigError(f"pretrain: {_PARAM_FLAGS[key]} does not apply to --parametrization {name} (its "
                                  f"options: {', '.join(sorted(fields))}).")
            options[field] = value
    if "rank" in fields and rank is None:
        options["rank"] = max(1, model.config.hidden_size // 4)
    return rp.parametrize(model, name, targets=TARGETS, seed=seed, **options)


def _factor_groups(model, **low):
    """Param groups for a projected optimizer over a parametrized model: the 2-D trainable factors of
    the parametrized layers are projected, everything else trainable takes the AdamW fallback."""
    from ..pretrain import wrapped_layers

    mats = [p for _, m in wrapped_layers(model) for p in m.parameters() if p.requires_grad and p.ndim == 2]
    ids = {id(p) for p in mats}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return ([{"params": rest}] if rest else []) + [{"params": mats, "proj_type": "std", **low}]


# ---------------------------------------------------------------------------------------------- optimizers
def make_optimizer(name: str, model, *, lr: float | None = None, rank: int | float = 128, update_gap: int = 200,
                   scale: float | None = None, projector: str | None = None, weight_decay: float = 0.0,
                   targets=TARGETS):
    """Build optimizer ``name`` (one of :data:`OPTIMIZERS`) over ``model`` with the pretraining recipe."""
    from .. import optim as ro

    if name not in OPTIMIZERS:
        from ..errors import close_names

        raise ConfigError(f"pretrain: unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}."
                          + close_names(name, OPTIMIZERS))
    lr = OPTIMIZERS[name][0] if lr is None else lr
    if name == "adamw":  # (frozen parameters, e.g. ReLoRA's W, are left out)
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        return ro.Adafactor(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "smmf":
        return ro.SMMF(model.parameters(), lr=lr, weight_decay=weight_decay, decay_rate=-0.8)
    if name == "flora":  # Adafactor-style: momentum compressed to rank r, projection resampled every T steps
        return ro.Flora(model.parameters(), lr=lr, rank=int(rank), kappa=update_gap, beta1=0.9,
                        scale_parameter=False, weight_decay=weight_decay)
    scale = _DEFAULT_SCALE.get(name, 1.0) if scale is None else scale
    extra = {} if projector is None else {"projector": projector}
    group_rank = 1 if name == "apollo-mini" else rank
    if getattr(model, "_rankwise_pretrain", None) is not None:  # project the factor matrices
        groups = _factor_groups(model, rank=group_rank, update_proj_gap=update_gap,
                                scale=1.0 if name == "frugal" else scale, **extra)
    else:
        groups = ro.param_groups(model, rank=group_rank, targets=targets, update_proj_gap=update_gap,
                                 scale=1.0 if name == "frugal" else scale, **extra)
    cls = {"galore": "GaLoreAdamW", "galore8bit": "GaLoreAdamW8bit", "qgalore": "QGaLoreAdamW", "fira": "Fira",
           "apollo": "APOLLO", "apollo-mini": "APOLLOMini", "frugal": "FRUGAL",
           "gradnorm-lorp": "GradNormLoRP"}[name]
    opt_cls = getattr(ro, cls, None)
    if opt_cls is None:
        raise ConfigError(f"pretrain: rankwise.optim has no {cls} in this install; choose another optimizer.")
    return opt_cls(groups, lr=lr, weight_decay=weight_decay)


# ---------------------------------------------------------------------------------------------- command
def restart_warmup(reset_every: int) -> int:
    """Steps of ReLoRA's re-warmup after a merge: 2 % of a cycle as the paper's 100 of 5,000, but at
    least 10 (at most a quarter of the cycle) — a 1-step re-warmup after the 99 % state pruning of a
    short cycle made every merge a loss spike in ``benchmarks/pretrain.py``; ≥ 1, < ``reset_every``."""
    return max(1, min(reset_every - 1, reset_every // 4, max(10, reset_every // 50))) if reset_every > 1 else 0


def _schedule(model, kind: str, cfg):
    """ReLoRA's jagged cosine (a re-warmup of :func:`restart_warmup` steps after each merge, min
    ratio 0.1) for ``relora``; ``None`` (train's warmup-cosine) otherwise."""
    if kind != "relora":
        return None
    from ..pretrain.relora import jagged_cosine

    config = model._rankwise_pretrain[1]
    warmup = min(cfg.warmup_steps, config.reset_every)
    return jagged_cosine(cfg.steps, warmup, config.reset_every, restart_warmup=restart_warmup(config.reset_every),
                         min_ratio=0.1, warm_start=config.warm_start_steps)


#: What ``--out`` may hold before a run replaces it (all of it written by ``rankwise pretrain``).
OUT_NAMES = ("model.safetensors", "config.json", "loss_curve.png", "report.md", "run.json", "checkpoint", "hf")
RUN_FORMAT = "rankwise.pretrain.run/1"
#: Keys of ``run.json`` a resumed run must match (everything that changes the trained model; not
#: ``steps``: :func:`rankwise.train.train` refuses a checkpoint past ``steps`` itself).
_IDENTITY = ("model", "parametrization", "parametrization options", "optimizer", "optimizer options", "seed",
             "batch_size", "seq_len", "warmup", "spikes")
_IDENTITY_FLAGS = {"model": "--model-config", "parametrization": "--parametrization", "optimizer": "--optimizer",
                   "seed": "--seed", "batch_size": "--batch-size", "seq_len": "--seq-len", "warmup": "--warmup"}


class SpikeGuard:
    """Loss-spike detection, as a wrapper of the loss function of :func:`rankwise.train.train`.

    A step is a **spike** when its loss exceeds ``factor`` × the median of the last ``window``
    finite step losses (defaults 3× over 50 steps; checked once ``min_history`` = 10 losses are
    known, so the fast fall of the first steps is never flagged). Each spike is warned about
    (``warnings.warn``, the step, loss, median and ratio) and listed in :attr:`spikes`. With
    ``skip=True`` the wrapper returns a NaN loss instead (a leaf tensor: no backward through the
    model), which ``train(..., TrainConfig(on_nonfinite="skip"))`` drops: no optimizer step, no
    parametrization event (merge, restart) at that step; the schedule moves on and the step's
    recorded loss is NaN. The median window holds the finite recorded losses, so it is rebuilt
    exactly from a checkpoint's history (``history``) on resume. One call = one optimizer step
    (no gradient accumulation, as ``rankwise pretrain``).
    """

    def __init__(self, loss_fn, factor: float = 3.0, window: int = 50, skip: bool = False, min_history: int = 10,
                 history=(), start_step: int = 0):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
            raise ConfigError(f"pretrain: --spike-factor {factor!r} must be a number > 0 (default 3: a step whose loss "
                              "is above 3x the running median is a spike).")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"pretrain: --spike-window {window!r} must be an int >= 1 (default 50 steps).")
        from collections import deque

        self.loss_fn, self.factor, self.window, self.skip = loss_fn, float(factor), window, skip
        self.min_history = min(min_history, window)
        self.recent = deque((float(v) for v in history if math.isfinite(float(v))), maxlen=window)
        self.step = start_step
        self.spikes: list[tuple[int, float, float]] = []  # (step, loss, median)

    def __call__(self, model, batch):
        import statistics
        import warnings

        loss = self.loss_fn(model, batch)
        self.step += 1
        value = float(loss.detach())
        if math.isfinite(value) and len(self.recent) >= self.min_history:
            median = statistics.median(self.recent)
            if value > self.factor * median:
                self.spikes.append((self.step, value, median))
                what = ("skipped (--skip-spikes)" if self.skip else "kept; pass --skip-spikes to drop such steps")
                warnings.warn(f"rankwise pretrain: loss spike at step {self.step}: loss {value:.4f} is "
                              f"{value / median:.1f}x the median {median:.4f} of the last {len(self.recent)} steps "
                              f"(threshold {self.factor:g}x); {what}.", RuntimeWarning, stacklevel=2)
                if self.skip:
                    return torch.full_like(loss.detach(), math.nan).requires_grad_()
        if math.isfinite(value):
            self.recent.append(value)
        return loss


def _check_out(out) -> Path:
    """Check ``--out`` (and its ``checkpoint/`` and ``hf/``) before any work: new, empty, or an earlier
    output of ``rankwise pretrain``; raises :class:`~rankwise.errors.OutputPathError` otherwise."""
    from ..io.atomic import check_output_dir
    from ..pretrain.io import HF_NAMES, is_hf_dir
    from ..train import CHECKPOINT_NAMES, has_checkpoint
    from .common import has_rankwise_report

    def ours(folder: Path) -> bool:
        return has_rankwise_report(folder) or has_checkpoint(folder / "checkpoint") or _read_record(folder) is not None

    check_output_dir(Path(out) / "checkpoint", CHECKPOINT_NAMES, "rankwise pretrain --out: checkpoint folder",
                     lambda d: (d / "trainer_state.json").is_file())
    check_output_dir(Path(out) / "hf", HF_NAMES, "rankwise pretrain --out: hf folder", is_hf_dir)
    check_output_dir(out, OUT_NAMES, "rankwise pretrain --out", ours)
    return Path(out)


def _read_record(folder: Path) -> dict | None:
    """``run.json`` of an output folder (``None`` if absent or not one of ours)."""
    try:
        record = json.loads((Path(folder) / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RUN_FORMAT else None


def _run_record(args, model, kind: str, lr: float) -> dict:
    """What identifies a run (``run.json``): everything a resume must match, JSON-normalized."""
    config = getattr(model, "_rankwise_pretrain", (None, None))[1]
    record = {
        "format": RUN_FORMAT,
        "model": model_config(args.model_config),
        "model_spec": args.model_config,
        "parametrization": kind,
        "parametrization options": {} if config is None else dataclasses.asdict(config),
        "targets": TARGETS,
        "optimizer": args.optimizer,
        "optimizer options": {"lr": lr, "rank": args.rank, "update_gap": args.update_gap, "scale": args.scale,
                              "projector": args.projector, "weight_decay": args.weight_decay},
        "seed": args.seed, "batch_size": args.batch_size, "seq_len": args.seq_len, "warmup": args.warmup,
        "steps": args.steps,
        "spikes": {"factor": args.spike_factor, "window": args.spike_window, "skip": args.skip_spikes},
    }
    return json.loads(json.dumps(record))


def _check_resume(out: Path, saved: dict, record: dict) -> None:
    """A resumed run must be the run that wrote the checkpoint: name the first difference."""
    for key in _IDENTITY:
        old, new = saved.get(key), record.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            diff = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
            what, old, new = f"{key} {diff}", old.get(diff), new.get(diff)
        else:
            what = key
        flag = _IDENTITY_FLAGS.get(key)
        fix = f" (pass {flag} {old})" if flag and not isinstance(old, dict) else ""
        raise ConfigError(f"rankwise pretrain --resume: the checkpoint in {out / 'checkpoint'} was written with "
                          f"{what} = {old!r}, this run has {what} = {new!r}; a resume must use the same settings"
                          f"{fix}, or write to another --out. Nothing was written.")


def _clear_stale(out: Path) -> None:
    """A fresh run into an earlier run's --out: remove that run's checkpoint/ and hf/ (folders
    :func:`_check_out` found to hold only what rankwise writes there), so a later ``--resume`` never
    pairs this run's ``run.json`` with another run's checkpoint."""
    import shutil

    for sub in ("checkpoint", "hf"):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)


def _sync_frozen(model, checkpoint: Path) -> None:
    """Load the wrapped layers' frozen state from the checkpoint through ``load_state_dict`` before
    :func:`rankwise.train.train` resumes (which copies the tensors in place): modules that keep a
    host-side copy of a buffer (LoQT's ``_armed`` flag of its ``capture`` buffer) refresh it in
    ``_load_from_state_dict``; an in-place copy leaves it stale, and a LoQT resume from a step
    before a non-merge step would then capture a gradient into the next merge's ``P``."""
    from ..io.atomic import read_tensors
    from ..pretrain import frozen_state

    names = frozen_state(model)
    if names:
        saved = read_tensors(checkpoint / "model.safetensors", "rerun without --resume to start from step 0.")
        model.load_state_dict({k: saved[k] for k in names if k in saved}, strict=False)


def run_pretrain(args) -> dict:
    from ..core import distributed as rd
    from ..io.atomic import save_tensors, write_json, write_text
    from ..optim import state_bytes
    from ..train import TrainConfig, has_checkpoint, train
    from ..utils.memory import PeakRSS, release_free_memory
    from ..utils.table import format_table

    nproc = getattr(args, "nproc", 1) or 1
    if nproc > 1 and getattr(args, "skip_spikes", False):
        raise ConfigError("pretrain: --skip-spikes with --nproc > 1 would drop a step on one process only (each sees "
                          "its own part of the batch); drop --skip-spikes, or use --nproc 1.")
    device = rd.device_for(getattr(args, "device", "auto"))  # checked before any process starts
    if nproc > 1 and not rd.launched():  # re-run this command on N processes through torchrun
        _check_out(args.out)
        return rd.relaunch(nproc, args._argv)
    rd.init_from_env(rd.backend_for(device))  # under torchrun / accelerate launch: join the group (train() wraps in DDP)
    main = rd.is_main()  # only rank 0 writes
    if args.threads:
        torch.set_num_threads(args.threads)
    out = _check_out(args.out)
    SpikeGuard(lm_loss, args.spike_factor, args.spike_window)  # checks the flags before any work
    resume = getattr(args, "resume", False)
    saved = None
    if resume:
        if not has_checkpoint(out / "checkpoint"):
            raise ConfigError(f"rankwise pretrain --resume: {out / 'checkpoint'} holds no checkpoint (no "
                              "trainer_state.json); check --out, or run without --resume to start from step 0.")
        saved = _read_record(out)
        if saved is None:
            raise ConfigError(f"rankwise pretrain --resume: {out / 'run.json'} is missing or damaged, so the run that "
                              "wrote the checkpoint is unknown; run without --resume to start from step 0.")
    model = build_model(args.model_config, seed=args.seed).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    kind = getattr(args, "parametrization", "full")
    parametrize_model(model, kind, rank=getattr(args, "param_rank", None), density=getattr(args, "density", None),
                      reset_every=getattr(args, "reset_every", None),
                      refactorize_every=getattr(args, "refactorize_every", None), quant=getattr(args, "quant", None),
                      seed=args.seed)
    from ..pretrain import stored_parameters, trainable_parameters_count

    stored, trainable = stored_parameters(model), trainable_parameters_count(model)
    title = args.optimizer if kind == "full" else f"{kind} + {args.optimizer}"
    train_tokens = args.steps * args.batch_size * args.seq_len
    opt = make_optimizer(args.optimizer, model, lr=args.lr, rank=args.rank, update_gap=args.update_gap,
                         scale=args.scale, projector=args.projector, weight_decay=args.weight_decay)
    lr = opt.param_groups[-1]["lr"]
    record = _run_record(args, model, kind, lr)
    if saved is not None:
        _check_resume(out, saved, record)
    train_stream, valid_stream = stdlib_bytes(train_tokens, args.valid_tokens)
    train_data, valid_data = Windows(train_stream, args.seq_len), Windows(valid_stream, args.seq_len)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, warmup=args.warmup,
                      eval_every=args.eval_every, seed=args.seed, max_grad_norm=1.0,
                      checkpoint_every=args.checkpoint_every, on_nonfinite="skip" if args.skip_spikes else "stop",
                      precision=getattr(args, "precision", "fp32"))
    evaluate = evaluator(valid_data)
    history, start = [], 0
    if saved is not None:
        from ..io.atomic import read_json

        state = read_json(out / "checkpoint" / "trainer_state.json", "rerun without --resume.")
        history, start = (state.get("history") or {}).get("losses", []), int(state.get("step", 0))
        _sync_frozen(model, out / "checkpoint")
        before = saved.get("valid before", evaluate(model))
    else:
        before = evaluate(model)
        record["valid before"] = before
        if main:
            _clear_stale(out)
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "run.json", record)  # before any checkpoint: a resume checks it
        rd.barrier()
    guard = SpikeGuard(lm_loss, args.spike_factor, args.spike_window, args.skip_spikes, history=history,
                       start_step=start)
    checkpoint = out / "checkpoint" if (args.checkpoint_every or resume) else None
    release_free_memory()
    with PeakRSS() as peak:
        result = train(model, train_data, collate, guard, cfg, eval_fn=evaluate, optimizer=opt,
                       progress=main and not args.no_progress, desc=title, lr_lambda=_schedule(model, kind, cfg),
                       checkpoint_dir=checkpoint, resume=resume)
    final = result.evals[-1][1]
    state = state_bytes(opt, model)["total"]
    finite = [v for v in result.losses if math.isfinite(v)][-10:]
    row = {
        "optimizer": args.optimizer,
        "parametrization": kind,
        "model": args.model_config,
        "params": n_params,
        "stored params": stored,
        "trainable params": trainable,
        "rank": args.rank if args.optimizer not in ("adamw", "adafactor", "smmf") else "-",
        "steps": args.steps,
        "tokens": train_tokens,
        "lr": lr,
        "train loss (last 10)": round(sum(finite) / max(len(finite), 1), 4),
        "valid loss": round(final["loss"], 4),
        "valid ppl": round(final["perplexity"], 3),
        "opt state MB": round(state / 2**20, 3),
        "opt state bytes": state,
        "peak RSS +MB": round(peak.peak_bytes / 2**20, 1),
        "s/step": round(result.wall_time / args.steps, 3),
        "tokens/s": round(train_tokens / max(result.wall_time, 1e-9), 1),
        "spikes": len(guard.spikes),
    }
    if not main:  # the other ranks hold the same weights; rank 0 writes them
        return row
    note = _param_note(kind, model)
    if kind not in ("full", "cola"):  # a plain LLaMA state dict (CoLA has no dense weight: kept factorized)
        from ..pretrain import to_dense

        to_dense(model)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "model.safetensors", dict(model.state_dict()), metadata={"format": "pt"})
    write_json(out / "config.json", model.config.to_dict())
    _plot(out / "loss_curve.png", result.losses, result.evals, f"{title} on {args.model_config}")
    headers = list(row)
    table = format_table([[row[h] for h in headers]], headers, markdown=True)
    evals = "\n".join(f"| {s} | {m['loss']:.4f} | {m['perplexity']:.3f} |" for s, m in result.evals)
    spikes = ("" if not guard.spikes else
              f"\nLoss spikes (> {args.spike_factor:g}x the median of the last {args.spike_window} steps"
              f"{'; skipped' if args.skip_spikes else ''}): "
              + ", ".join(f"step {s} ({v:.3f} vs {m:.3f})" for s, v, m in guard.spikes) + ".\n")
    resumed = f" Resumed from the step-{start} checkpoint." if resume and start else ""
    md = (f"# rankwise pretrain: {title} on {args.model_config}\n\n{table}\n\n"
          f"![loss curve](loss_curve.png)\n\n"
          f"Byte-level LM on the Python standard library's source ({len(train_data)} train windows of "
          f"{args.seq_len} tokens, {len(valid_data)} validation windows); batch {args.batch_size}; "
          f"warmup then cosine; clip 1.0; seed {args.seed}. Validation loss before training: "
          f"{before['loss']:.4f} (uniform over bytes: {math.log(VOCAB):.4f}).{resumed}\n\n"
          f"| step | valid loss | valid ppl |\n|---:|---:|---:|\n{evals}\n\n"
          f"Optimizer: {OPTIMIZERS[args.optimizer][1]}. Optimizer state counted by "
          f"`rankwise.optim.state_bytes` ({state:,} bytes).\n" + note + spikes
          + "\nLoad for evaluation or generation: `rankwise.pretrain.load_pretrained(\"<this folder>\")`.\n")
    write_text(out / "report.md", md)
    write_json(out / "run.json", dict(saved or record, final=final, spikes=record["spikes"],
                                      **{"spike steps": [s for s, _, _ in guard.spikes]}))
    if getattr(args, "hf", False):
        from ..pretrain.io import export_dense

        export_dense(out, out / "hf")
    from .common import print_table

    print_table([row])
    print(f"saved to {out}")
    return row


def _param_note(kind: str, model) -> str:
    if kind == "full":
        return ""
    config = getattr(model, "_rankwise_pretrain", (None, None))[1]
    saved = ("model.safetensors holds the factorized CoLA layers (no dense weight exists); rebuild with "
             "rankwise.pretrain.parametrize before loading." if kind == "cola"
             else "model.safetensors holds the dense weights (rankwise.pretrain.to_dense).")
    return (f"\nParametrization: {kind} ({config if config is not None else 'see rankwise.pretrain'}) on the "
            f"attention and MLP projections; {saved}\n")


def _plot(path: Path, losses: list[float], evals, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.atomic import write_png
    from .common import EMA_DECAY, ema

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, alpha=0.3, label="train (per step)")
    ax.plot(range(1, len(losses) + 1), ema(losses), label=f"train (EMA {EMA_DECAY})")
    if evals:
        ax.plot([s for s, _ in evals], [m["loss"] for _, m in evals], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_png(path, fig)


def add_parser(sub) -> None:
    """Register ``rankwise pretrain`` on the CLI's subparsers."""
    from .main import add_run_options, nonneg_int, positive_int

    p = sub.add_parser("pretrain", help="pretrain a small LLaMA on the stdlib's source with a memory-efficient "
                                        "optimizer; writes report.md, loss_curve.png, model.safetensors")
    p.add_argument("--model-config", default="llama-tiny",
                   help=f"{', '.join(MODEL_CONFIGS)}, or a .json file of LlamaConfig fields (default llama-tiny)")
    p.add_argument("--optimizer", default="galore", help=f"one of {', '.join(OPTIMIZERS)} (default galore)")
    p.add_argument("--rank", type=_rank, default=128, help="projection rank (int, or a fraction < 1)")
    p.add_argument("--update-gap", type=int, default=200, help="steps between subspace refreshes (T)")
    p.add_argument("--scale", type=float, default=None, help="projection scale α (default per optimizer)")
    p.add_argument("--projector", default=None, help="projector kind for GaLore-style optimizers: auto (default: "
                                                     "svd on CPU, randomized_svd on GPU), svd, randomized_svd, random, "
                                                     "dct, hadamard, online_pca")
    p.add_argument("--parametrization", default="full",
                   help=f"one of {', '.join(PARAMETRIZATIONS)} (default full: dense weights); applied to the "
                        "attention and MLP projections before the optimizer is built")
    p.add_argument("--param-rank", type=positive_int, default=None,
                   help="rank of the parametrization's factors (default hidden_size / 4)")
    p.add_argument("--density", type=float, default=None, help="sltrain: share of entries in the sparse part")
    p.add_argument("--reset-every", type=positive_int, default=None,
                   help="relora / periodic_lora: merge-and-restart every N steps; loqt: first merge gap (later gaps "
                        "grow); sst: resample every N steps")
    p.add_argument("--refactorize-every", type=positive_int, default=None,
                   help="sltrain (and cola with identity): SVD refactorization + momentum reset every N steps")
    p.add_argument("--quant", default=None, help="loqt: quantizer of the frozen base (nf4, int4, int8; default nf4)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per optimizer)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--steps", type=positive_int, default=200)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--warmup", type=float, default=0.1, help="warmup fraction (< 1) or steps")
    p.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: only at the end)")
    p.add_argument("--valid-tokens", type=positive_int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--checkpoint-every", type=nonneg_int, default=0,
                   help="write out/checkpoint every N steps and at the end (0: none; atomic, exact resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue from out/checkpoint (same settings as the run that wrote it)")
    p.add_argument("--spike-factor", type=float, default=3.0,
                   help="warn when a step's loss exceeds this many times the running median (default 3)")
    p.add_argument("--spike-window", type=positive_int, default=50,
                   help="steps in the running median of --spike-factor (default 50)")
    p.add_argument("--skip-spikes", action="store_true", help="drop the update of a loss-spike step")
    p.add_argument("--hf", action="store_true",
                   help="also write out/hf: a plain dense Hugging Face model folder (rankwise.pretrain.export_dense)")
    add_run_options(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true")




def _rank(s: str):
    v = float(s)
    return int(v) if v >= 1 and v == int(v) else v
