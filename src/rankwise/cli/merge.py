"""``rankwise merge config.yaml --out dir``: combine adapters, or whole fine-tuned models, from a YAML file.

In the spirit of mergekit's YAML. Combining **adapters** (rankwise folders written by ``rw.save`` or PEFT
adapter folders) on one base model::

    base_model: models/minilm            # a Hugging Face model folder (or hub id)
    model_class: AutoModelForSequenceClassification   # optional; default: the class whose modules
                                         # the adapters name (as `rankwise analyze` picks it)
    method: ties_svd                     # any of rankwise.combine.methods()
    adapters:
      - path: runs/math/adapter          # a rankwise folder; `adapter: <name>` picks one of several
        weight: 0.6
      - path: runs/code_peft             # a PEFT folder
        weight: 0.4
    density: 0.5                         # options of the method (rank, density, majority_sign_method,
    rank: 16                             # common_space_fraction, merge, iters …)
    seed: 0                              # random draws (DARE, k-means)
    name: merged                         # name of the combined adapter

(``weights: [0.6, 0.4]`` may replace the per-adapter ``weight``.) Writes ``<out>/adapter`` (rankwise format),
``<out>/peft`` (PEFT format; the result is a LoRA) and ``<out>/report.md``, and prints a summary table.

Merging **whole fine-tuned models** of one architecture by task vectors ``τ_t = θ_t − θ_base``
(Ilharco et al. 2023), with the element-wise merges of :mod:`rankwise.combine.ties` — ``linear``
(task arithmetic), ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``, per tensor::

    base_model: models/base
    models: [runs/ft_a, runs/ft_b]       # folders with model.safetensors (or a sharded index)
    method: ties
    weights: [1.0, 1.0]
    density: 0.2

Writes ``<out>/model.safetensors`` (``θ_base + merge(τ_1, …)``; integer tensors are the base's),
``config.json`` and the tokenizer files of the base folder, and ``report.md``. ``--out`` is checked
before any work (a new or empty folder, or an earlier output of this command).
"""

from __future__ import annotations

import fnmatch
import math
import shutil
import time
from pathlib import Path

import torch

from ..errors import ConfigError, CorruptFileError, ShapeMismatchError

ADAPTER_OUT = ("adapter", "peft", "report.md")
MODEL_OUT = ("model.safetensors", "config.json", "report.md", "tokenizer*", "vocab*", "merges.txt",
             "special_tokens_map.json", "added_tokens.json", "generation_config.json", "*.model")
TOP_KEYS = {"base_model", "model_class", "method", "adapters", "models", "weights", "name", "seed"}


def read_config(path: str | Path) -> dict:
    """The YAML file as a dict, with the keys checked (``yaml.safe_load``: no code runs)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"merge config {p} does not exist; give a YAML file (see `rankwise merge --help`).")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"merge config {p} is not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"merge config {p} must be a mapping (base_model:, method:, adapters: or models: …).")
    if not cfg.get("base_model"):
        raise ConfigError(f"merge config {p} needs base_model: the folder of the model the adapters were trained on.")
    if ("adapters" in cfg) == ("models" in cfg):
        raise ConfigError(f"merge config {p} needs exactly one of adapters: (adapter folders) or models: "
                          "(fine-tuned model folders).")
    key = "adapters" if "adapters" in cfg else "models"
    if not isinstance(cfg[key], list) or not cfg[key]:
        raise ConfigError(f"merge config {p}: {key}: must be a non-empty list.")
    if not isinstance(cfg.get("method", "linear"), str):
        raise ConfigError(f"merge config {p}: method: must be a name, e.g. ties_svd.")
    return cfg


def _entries(cfg: dict, key: str) -> tuple[list[dict], list[float] | None]:
    """The ``adapters`` / ``models`` entries as dicts with ``path``, and the weights."""
    entries = []
    for i, e in enumerate(cfg[key]):
        if isinstance(e, str):
            e = {"path": e}
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise ConfigError(f"{key}[{i}] = {e!r}: give a folder path, or a mapping with path: (and weight:).")
        bad = set(e) - {"path", "weight", "name", "adapter"}
        if bad:
            raise ConfigError(f"{key}[{i}] has unknown keys {sorted(bad)}; use path, weight, name, adapter.")
        entries.append(e)
    per = [e.get("weight") for e in entries]
    weights = cfg.get("weights")
    if weights is not None and any(w is not None for w in per):
        raise ConfigError("give the weights either as weights: [...] or per entry (weight:), not both.")
    if weights is None and any(w is not None for w in per):
        if any(w is None for w in per):
            raise ConfigError(f"{key}: every entry needs a weight: when one has it.")
        weights = per
    return entries, weights


def _options(cfg: dict) -> dict:
    opts = {k: v for k, v in cfg.items() if k not in TOP_KEYS}
    extra = opts.pop("options", None) or {}
    if not isinstance(extra, dict):
        raise ConfigError("options: must be a mapping of method options.")
    if "score" in opts or "score" in extra:
        raise ConfigError("greedy_soup needs a Python score(model) function; run it with rw.combine(...) "
                          "instead of a YAML file.")
    return {**opts, **extra}


# ---- adapters -----------------------------------------------------------------------------------
def _rename(model, old: str, new: str) -> None:
    """Give the loaded adapter ``old`` the name ``new`` (two input files may both call theirs 'default')."""
    from ..core.api import adapted_layers, adapter_state, trained_copies

    for _, layer in adapted_layers(model):
        if old in layer.adapters:
            layer.adapters[new] = layer.adapters.pop(old)
            layer.active = [new if n == old else n for n in layer.active]
            layer.merged = [new if n == old else n for n in layer.merged]
    for _, tc in trained_copies(model):
        if old in tc.copies:
            tc.copies[new] = tc.copies.pop(old)
            tc.active = new if tc.active == old else tc.active
    state = adapter_state(model)
    state[new] = state.pop(old)


def _load_inputs(cfg: dict, entries: list[dict], seed: int):
    """The base model with every input adapter loaded as ``input_<i>``; rows describing them."""
    import rankwise as rw

    from .analyze import _CLASSIFIERS, _is_peft, _quiet, adapter_requirements, choose_class

    _quiet()
    base = str(cfg["base_model"])
    paths = [Path(e["path"]) for e in entries]
    for p in paths:
        if not p.is_dir():
            raise ConfigError(f"adapter folder {p} does not exist.")
    keys, heads = [], {}
    for p in paths:
        k, h = adapter_requirements(p)
        keys += k
        heads.update(h)
    if cfg.get("model_class"):
        import transformers

        cname = str(cfg["model_class"])
        cls = getattr(transformers, cname, None)
        if cls is None:
            raise ConfigError(f"model_class: transformers has no class {cname!r} (e.g. AutoModelForCausalLM).")
    else:
        cname, cls = choose_class(base, keys)
    kwargs = {}
    if cname in _CLASSIFIERS and heads:
        kwargs = {"num_labels": next(iter(heads.values()))[0], "ignore_mismatched_sizes": True}
    torch.manual_seed(seed)
    model = cls.from_pretrained(base, **kwargs)
    names, rows = [], []
    for i, (e, p) in enumerate(zip(entries, paths)):
        internal = f"input_{i}"
        if _is_peft(p):
            rw.import_peft(model, p, name=internal)
            fmt = "PEFT"
        else:
            from ..io.files import read

            saved = read(p)[0]["adapters"]
            pick = e.get("adapter")
            if pick is None:
                if len(saved) != 1:
                    raise ConfigError(f"{p} holds adapters {sorted(saved)}; say which with adapter: <name>.")
                pick = next(iter(saved))
            if pick not in saved:
                raise ConfigError(f"{p} holds adapters {sorted(saved)}, not {pick!r}.")
            rw.load(model, p, names=[pick])
            _rename(model, pick, internal)
            fmt = "rankwise"
        names.append(internal)
        cfg_i = rw.core.api.adapter_state(model)[internal]["config"]
        rows.append({"adapter": e.get("name") or p.name, "path": str(p), "format": fmt, "method": cfg_i.method,
                     "rank": getattr(cfg_i, "rank", "-"), "params": 0})
    return model, names, rows, cname


def merge_adapters(cfg: dict, out: Path, progress: bool = True) -> list[dict]:
    import rankwise as rw

    from ..core.api import adapted_layers, adapter_state

    entries, weights = _entries(cfg, "adapters")
    method = cfg.get("method", "linear")
    name = cfg.get("name", "merged")
    seed = int(cfg.get("seed", 0))
    opts = _options(cfg)
    model, names, rows, cname = _load_inputs(cfg, entries, seed)
    for r, n in zip(rows, names):
        r["params"] = sum(p.numel() for _, layer in adapted_layers(model) if n in layer.adapters
                          for p in layer.adapters[n].parameters())
    for r, w in zip(rows, weights or [None] * len(rows)):
        r["weight"] = "-" if w is None else w
    t0 = time.perf_counter()
    rw.combine(model, names, weights, name, method=method, seed=seed, progress=progress, **opts)
    seconds = time.perf_counter() - t0
    state = adapter_state(model)[name]
    layers = dict(adapted_layers(model))
    params = sum(p.numel() for m in state["modules"] for p in layers[m].adapters[name].parameters())
    rows.append({"adapter": f"= {name}", "path": str(out / "adapter"), "format": "rankwise + PEFT",
                 "method": f"lora ({method})", "rank": state["config"].rank, "params": params, "weight": "-"})
    out.mkdir(parents=True, exist_ok=True)
    rw.save(model, out / "adapter", names=name)
    note = ""
    if state.get("overrides"):
        rows[-1]["format"] = "rankwise"
        note = ("\nSome modules are too small for the common rank and hold a lower one; PEFT's format has one "
                "rank per adapter, so no PEFT copy was written.\n")
    else:
        rw.export_peft(model, out / "peft", name=name, base_model_name_or_path=str(cfg["base_model"]))
    _report(out, f"rankwise merge: {method} of {len(names)} adapters", rows,
            f"Base model: `{cfg['base_model']}` ({cname}). Options: {opts or 'none'}; seed {seed}; "
            f"combined in {seconds:.2f} s. The combined adapter is a LoRA (scale 1) whose ΔW is the "
            f"combination; load it with rw.load(model, '{out / 'adapter'}')." + note)
    return rows


# ---- whole models -------------------------------------------------------------------------------
def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder: ``model.safetensors`` or the shards its index names."""
    from ..io.atomic import read_json, read_tensors

    if not folder.is_dir():
        raise ConfigError(f"model folder {folder} does not exist.")
    single = folder / "model.safetensors"
    if single.is_file():
        return read_tensors(single, "Save the model again (safetensors).")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index, "the index is damaged.").get("weight_map", {}).values()))
        out = {}
        for s in shards:
            out.update(read_tensors(folder / s, "Save the model again (safetensors)."))
        return out
    raise CorruptFileError(f"{folder} has no model.safetensors (or model.safetensors.index.json); rankwise merges "
                           "safetensors checkpoints only (save with save_pretrained(safe_serialization=True)).")


def merge_models(cfg: dict, out: Path, progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    from ..combine.ties import KERNELS, merge_tensors
    from ..io.atomic import atomic_path, read_json, save_tensors, write_json

    method = cfg.get("method", "linear")
    if method not in KERNELS:
        raise ConfigError(f"merging whole models takes method one of {KERNELS} (task vectors, entry by entry); "
                          f"got {method!r}.")
    entries, weights = _entries(cfg, "models")
    if weights is None:
        weights = [1.0] * len(entries)
    if len(weights) != len(entries):
        raise ConfigError(f"got {len(weights)} weights for {len(entries)} models; give one weight per model.")
    opts = _options(cfg)
    unknown = set(opts) - {"density", "majority_sign_method"}
    if unknown:
        raise ConfigError(f"merging whole models takes the options density and majority_sign_method, not "
                          f"{sorted(unknown)}.")
    density = float(opts.get("density", 1.0))
    if not 0 < density <= 1:
        raise ConfigError(f"density={density}: give the fraction of entries to keep, in (0, 1].")
    if method in ("ties", "dare_ties", "magnitude_prune", "dare_linear") and "density" not in opts:
        raise ConfigError(f"method {method!r} needs density: (the fraction of each task vector kept).")
    sign = opts.get("majority_sign_method", "total")
    base_dir = Path(str(cfg["base_model"]))
    base = read_weights(base_dir)
    tuned = [read_weights(Path(e["path"])) for e in entries]
    for e, sd in zip(entries, tuned):  # check every tensor before any work
        if set(sd) != set(base):
            diff = sorted(set(sd) ^ set(base))
            raise ShapeMismatchError(f"model {e['path']} has other tensors than the base {base_dir} (e.g. "
                                     f"{diff[:3]}); task vectors need one architecture.")
        for k, t in base.items():
            if sd[k].shape != t.shape:
                raise ShapeMismatchError(f"tensor '{k}' is {tuple(sd[k].shape)} in {e['path']} but "
                                         f"{tuple(t.shape)} in the base {base_dir}; merge models of one architecture.")
    g = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    merged, changed = {}, 0
    t0 = time.perf_counter()
    for k, t in tqdm(base.items(), disable=not progress, desc=f"merge {method}"):
        if not t.is_floating_point():
            merged[k] = t
            continue
        taus = [sd[k].float() - t.float() for sd in tuned]
        merged[k] = (t.float() + merge_tensors(taus, weights, method, density, sign, g)).to(t.dtype)
        changed += int(any(bool(tau.any()) for tau in taus))
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "model.safetensors", merged)
    if (base_dir / "config.json").is_file():
        write_json(out / "config.json", read_json(base_dir / "config.json", "the base model's config is damaged."))
    for f in sorted(base_dir.iterdir()):
        if f.is_file() and f.name not in ("config.json", "model.safetensors", "report.md") and any(
                fnmatch.fnmatch(f.name, p) for p in MODEL_OUT):
            with atomic_path(out / f.name) as tmp:
                shutil.copyfile(f, tmp)
    rows = [{"model": e.get("name") or Path(e["path"]).name, "path": e["path"], "weight": w,
             "‖τ‖": round(math.sqrt(sum(float(((sd[k].float() - base[k].float()) ** 2).sum())
                                       for k in base if base[k].is_floating_point())), 4)}
            for e, w, sd in zip(entries, weights, tuned)]
    rows.append({"model": "= merged", "path": str(out / "model.safetensors"), "weight": "-",
                 "‖τ‖": round(math.sqrt(sum(float(((merged[k].float() - base[k].float()) ** 2).sum())
                                           for k in base if base[k].is_floating_point())), 4)})
    _report(out, f"rankwise merge: {method} of {len(entries)} models", rows,
            f"Base model: `{base_dir}`. Task vectors τ = θ − θ_base, merged per tensor by {method} "
            f"(density {density}, sign {sign}); {changed} of {len(base)} tensors changed; {seconds:.2f} s.")
    return rows


# ---- command ------------------------------------------------------------------------------------
def _report(out: Path, title: str, rows: list[dict], notes: str) -> None:
    from ..io.atomic import write_text
    from ..utils.table import format_table
    from .common import print_table

    headers = list(rows[0])
    table = format_table([[r[h] for h in headers] for r in rows], headers, markdown=True)
    write_text(out / "report.md", f"# {title}\n\n{table}\n\n{notes}\n")
    print_table(rows)
    print(f"saved to {out}")


def run_merge(args) -> list[dict]:
    from .common import check_out

    cfg = read_config(args.config)
    if "adapters" in cfg:
        out = check_out(args.out, "merge", ADAPTER_OUT, adapters=("adapter", "peft"))
        return merge_adapters(cfg, out, progress=not args.no_progress)
    out = check_out(args.out, "merge", MODEL_OUT)
    return merge_models(cfg, out, progress=not args.no_progress)


def add_parser(sub) -> None:
    """Register ``rankwise merge`` on the CLI's subparsers."""
    p = sub.add_parser("merge", help="combine adapters (or whole fine-tuned models) described in a YAML file; "
                                     "writes the combined adapter (rankwise + PEFT) or model, and report.md")
    p.add_argument("config", help="YAML file: base_model, adapters or models, method, weights, density, rank …")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true")


run = run_merge  # the cli/main.py COMMANDS contract: add_parser(sub) and run(args)
