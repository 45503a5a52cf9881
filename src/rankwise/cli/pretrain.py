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

Output folder: ``report.md`` (summary table: losses, validation perplexity, stored and trainable
parameters, optimizer-state bytes, peak RSS, time per step, tokens/s), ``loss_curve.png``,
``model.safetensors`` (final weights, written atomically: a plain LLaMA state dict — a
parametrized model is turned dense first — except CoLA, saved in its factorized form) and
``config.json`` (the model config).
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
    "galore": (1e-2, "GaLoreAdamW (SVD projector unless --projector)"),
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
    """Mean next-token cross-entropy (nats per token)."""
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
                "refactorize_every": "--refactorize-every"}


def parametrize_model(model, name: str, *, rank: int | None = None, density: float | None = None,
                      reset_every: int | None = None, refactorize_every: int | None = None, seed: int = 0):
    """Apply ``--parametrization name`` to ``model`` (in place; ``full`` leaves it as it is). Options
    go to the parametrization's ``Config`` fields of the same name; one it has no field for is an
    error, and ``rank`` defaults to ``hidden_size // 4`` (the papers' ratio: rank 128 at width 512)."""
    values = {"rank": rank, "density": density, "reset_every": reset_every, "refactorize_every": refactorize_every}
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
    for key, value in values.items():
        if value is not None and key not in fields:
            raise ConfigError(f"pretrain: {_PARAM_FLAGS[key]} does not apply to --parametrization {name} (its options: "
                              f"{', '.join(sorted(fields))}).")
    options = {k: v for k, v in values.items() if v is not None}
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
def _schedule(model, kind: str, cfg):
    """ReLoRA's jagged cosine (a short re-warmup after each merge, 2 % of a cycle as the paper's
    100 of 5,000 steps, min ratio 0.1) for ``relora``; ``None`` (train's warmup-cosine) otherwise."""
    if kind != "relora":
        return None
    from ..pretrain.relora import jagged_cosine

    config = model._rankwise_pretrain[1]
    warmup = min(cfg.warmup_steps, config.reset_every)
    return jagged_cosine(cfg.steps, warmup, config.reset_every, restart_warmup=min(max(1, config.reset_every // 50),
                         config.reset_every - 1), min_ratio=0.1, warm_start=config.warm_start_steps)


def run_pretrain(args) -> dict:
    from ..io.atomic import save_tensors, write_json, write_text
    from ..optim import state_bytes
    from ..train import TrainConfig, train
    from ..utils.memory import PeakRSS, release_free_memory
    from ..utils.table import format_table
    from .common import check_out

    if args.threads:
        torch.set_num_threads(args.threads)
    out = check_out(args.out, "pretrain", ("model.safetensors", "config.json", "loss_curve.png", "report.md",
                                           "checkpoint"))
    model = build_model(args.model_config, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    kind = getattr(args, "parametrization", "full")
    parametrize_model(model, kind, rank=getattr(args, "param_rank", None), density=getattr(args, "density", None),
                      reset_every=getattr(args, "reset_every", None),
                      refactorize_every=getattr(args, "refactorize_every", None), seed=args.seed)
    from ..pretrain import stored_parameters, trainable_parameters_count

    stored, trainable = stored_parameters(model), trainable_parameters_count(model)
    title = args.optimizer if kind == "full" else f"{kind} + {args.optimizer}"
    train_tokens = args.steps * args.batch_size * args.seq_len
    train_stream, valid_stream = stdlib_bytes(train_tokens, args.valid_tokens)
    train_data, valid_data = Windows(train_stream, args.seq_len), Windows(valid_stream, args.seq_len)
    opt = make_optimizer(args.optimizer, model, lr=args.lr, rank=args.rank, update_gap=args.update_gap,
                         scale=args.scale, projector=args.projector, weight_decay=args.weight_decay)
    lr = opt.param_groups[-1]["lr"]
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, warmup=args.warmup,
                      eval_every=args.eval_every, seed=args.seed, max_grad_norm=1.0)
    evaluate = evaluator(valid_data)
    before = evaluate(model)
    release_free_memory()
    with PeakRSS() as peak:
        result = train(model, train_data, collate, lm_loss, cfg, eval_fn=evaluate, optimizer=opt,
                       progress=not args.no_progress, desc=title, lr_lambda=_schedule(model, kind, cfg))
    final = result.evals[-1][1]
    state = state_bytes(opt, model)["total"]
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
        "train loss (last 10)": round(sum(result.losses[-10:]) / len(result.losses[-10:]), 4),
        "valid loss": round(final["loss"], 4),
        "valid ppl": round(final["perplexity"], 3),
        "opt state MB": round(state / 2**20, 3),
        "opt state bytes": state,
        "peak RSS +MB": round(peak.peak_bytes / 2**20, 1),
        "s/step": round(result.wall_time / args.steps, 3),
        "tokens/s": round(train_tokens / max(result.wall_time, 1e-9), 1),
    }
    note = _param_note(kind, model)
    if kind not in ("full", "cola"):  # a plain LLaMA state dict (CoLA has no dense weight: kept factorized)
        from ..pretrain import to_dense

        to_dense(model)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "model.safetensors", {k: v for k, v in model.state_dict().items()})
    write_json(out / "config.json", model.config.to_dict())
    _plot(out / "loss_curve.png", result.losses, result.evals, f"{title} on {args.model_config}")
    headers = list(row)
    table = format_table([[row[h] for h in headers]], headers, markdown=True)
    evals = "\n".join(f"| {s} | {m['loss']:.4f} | {m['perplexity']:.3f} |" for s, m in result.evals)
    md = (f"# rankwise pretrain: {title} on {args.model_config}\n\n{table}\n\n"
          f"![loss curve](loss_curve.png)\n\n"
          f"Byte-level LM on the Python standard library's source ({len(train_data)} train windows of "
          f"{args.seq_len} tokens, {len(valid_data)} validation windows); batch {args.batch_size}; "
          f"warmup then cosine; clip 1.0; seed {args.seed}. Validation loss before training: "
          f"{before['loss']:.4f} (uniform over bytes: {math.log(VOCAB):.4f}).\n\n"
          f"| step | valid loss | valid ppl |\n|---:|---:|---:|\n{evals}\n\n"
          f"Optimizer: {OPTIMIZERS[args.optimizer][1]}. Optimizer state counted by "
          f"`rankwise.optim.state_bytes` ({state:,} bytes).\n" + note)
    write_text(out / "report.md", md)
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

    from ..io.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4))
    ema, sm = [], None
    for v in losses:
        sm = v if sm is None else 0.9 * sm + 0.1 * v
        ema.append(sm)
    ax.plot(range(1, len(losses) + 1), losses, alpha=0.3, label="train (per step)")
    ax.plot(range(1, len(ema) + 1), ema, label="train (EMA 0.9)")
    if evals:
        ax.plot([s for s, _ in evals], [m["loss"] for _, m in evals], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def add_parser(sub) -> None:
    """Register ``rankwise pretrain`` on the CLI's subparsers."""
    from .main import positive_int

    p = sub.add_parser("pretrain", help="pretrain a small LLaMA on the stdlib's source with a memory-efficient "
                                        "optimizer; writes report.md, loss_curve.png, model.safetensors")
    p.add_argument("--model-config", default="llama-tiny",
                   help=f"{', '.join(MODEL_CONFIGS)}, or a .json file of LlamaConfig fields (default llama-tiny)")
    p.add_argument("--optimizer", default="galore", help=f"one of {', '.join(OPTIMIZERS)} (default galore)")
    p.add_argument("--rank", type=_rank, default=128, help="projection rank (int, or a fraction < 1)")
    p.add_argument("--update-gap", type=int, default=200, help="steps between subspace refreshes (T)")
    p.add_argument("--scale", type=float, default=None, help="projection scale α (default per optimizer)")
    p.add_argument("--projector", default=None, help="projector kind for GaLore-style optimizers (svd, "
                                                     "randomized_svd, random, dct, hadamard, online_pca)")
    p.add_argument("--parametrization", default="full",
                   help=f"one of {', '.join(PARAMETRIZATIONS)} (default full: dense weights); applied to the "
                        "attention and MLP projections before the optimizer is built")
    p.add_argument("--param-rank", type=positive_int, default=None,
                   help="rank of the parametrization's factors (default hidden_size / 4)")
    p.add_argument("--density", type=float, default=None, help="sltrain: share of entries in the sparse part")
    p.add_argument("--reset-every", type=positive_int, default=None,
                   help="relora / periodic_lora: merge-and-restart every N steps")
    p.add_argument("--refactorize-every", type=positive_int, default=None,
                   help="sltrain (and cola with identity): SVD refactorization + momentum reset every N steps")
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
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true")


def _rank(s: str):
    v = float(s)
    return int(v) if v >= 1 and v == int(v) else v
