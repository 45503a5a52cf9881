"""``rankwise analyze``: what fine-tuning changed, per layer, as an HTML + Markdown report.

    rankwise analyze --base <model> --adapter <dir> [--adapter <dir2>] [--data [file]] --out report/
    rankwise analyze --base <model> --finetuned <model> [--data [file]] --out report/

``--adapter`` takes a rankwise adapter directory (``rw.save``), a PEFT one (``rw.import_peft``; a
classification head saved with it, ``modules_to_save``, sets the number of labels), or the --out
folder of ``rankwise finetune`` (its ``adapter/``; the label names come from its ``labels.json``);
the base model class (bare, sequence classifier, causal LM …) is the one whose module names the
adapter uses, found on an empty (meta-device) skeleton before anything is loaded. ``--finetuned`` is
a full model folder (``save_pretrained``), or the --out folder of ``rankwise finetune --method full``
(its ``model/``); the base is loaded with the same class, and layers the base checkpoint lacks (a new
classification head) are left out. Every path is checked, and every adapter matched to a model class,
before the first analysis starts. Each model is named by its folder (with the folder above it when
needed to tell two apart, or when the name is a generic ``adapter`` / ``model`` / ``best``) and its
method, which the report shows in its own column. ``--data`` adds the representation measures, on a CSV/JSONL
file like ``rankwise finetune`` takes or, without a file, on Python standard library docstrings.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import ConfigError, CorruptFileError

CANDIDATES = ("AutoModel", "AutoModelForSequenceClassification", "AutoModelForCausalLM",
              "AutoModelForMaskedLM", "AutoModelForTokenClassification")
_CLASSIFIERS = ("AutoModelForSequenceClassification", "AutoModelForTokenClassification")


def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _is_peft(path: Path) -> bool:
    cfg = path / "adapter_config.json"
    if not cfg.is_file():
        raise CorruptFileError(f"{path} has no adapter_config.json; --adapter takes a directory written by "
                               "rw.save / rankwise finetune, or a PEFT adapter directory.")
    import json

    try:
        return "peft_type" in json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{cfg} is not valid JSON ({e}); the adapter folder is damaged: save it again "
                               "(rw.save / export_peft) or pass another --adapter.") from None


def adapter_requirements(path: Path) -> tuple[list[str], dict[str, tuple]]:
    """Module names an adapter directory needs (tensor keys without their last one or two parts for
    PEFT files) and the weight shapes of the modules it saves fully (a classification head)."""
    if _is_peft(path):
        from ..io.atomic import read_json, read_tensors
        from ..io.peft import PREFIX

        saved = read_json(path / "adapter_config.json", "is this a PEFT adapter directory?").get("modules_to_save")
        saved = [saved] if isinstance(saved, str) else list(saved or [])
        tensors = read_tensors(path / "adapter_model.safetensors", "is this a PEFT adapter directory?")
        keys, heads = [], {}
        for key, t in tensors.items():
            k = key[len(PREFIX):] if key.startswith(PREFIX) else key
            k = re.sub(r"\.(?:modules_to_save\.[^.]+|original_module)\.", ".", k)
            keys.append(k)
            module = k.rpartition(".")[0]
            # PEFT files store a saved module as <module>.<param> (older ones with .modules_to_save.<name>.)
            is_saved = ".modules_to_save." in key or any(module == m or module.endswith("." + m) for m in saved)
            if is_saved and k.endswith(".weight"):
                heads[module] = tuple(t.shape)
        return keys, heads
    from ..io.files import read

    cfg, tensors = read(path)
    keys, heads = [], {}
    for name, info in cfg["adapters"].items():
        keys += [m + ".w" for m in info["modules"]]
        for m in info["modules_to_save"]:
            keys.append(m + ".w")
            w = tensors.get(f"{name}/modules_to_save/{m}/weight")
            if w is not None:
                heads[m] = tuple(w.shape)
    return keys, heads


def _fits(names: set[str], keys: list[str]) -> bool:
    def ok(k):
        parts = k.split(".")
        return any(".".join(parts[:-i]) in names for i in (1, 2) if len(parts) > i)
    return all(ok(k) for k in keys)


def choose_class(base: str, keys: list[str]):
    """The first transformers Auto class whose (meta-device) skeleton has every module ``keys`` needs."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    tried = []
    for cname in CANDIDATES:
        cls = getattr(transformers, cname)
        try:
            with torch.device("meta"):
                skel = cls.from_config(config)
        except (ValueError, KeyError):
            continue
        tried.append(cname)
        if _fits({n for n, _ in skel.named_modules()}, keys):
            return cname, cls
    raise ConfigError(f"none of {', '.join(tried)} built from {base} has the modules the adapter names "
                      f"(e.g. '{keys[0].rpartition('.')[0]}'); pass the base model the adapter was trained on.")


def load_adapted(base: str, adapter: Path, seed: int = 0, plan=None):
    """(model with the adapter loaded and active, class name). ``plan``: :func:`plan_adapter`'s result,
    when the caller has it already. Label names come from a ``labels.json`` beside the adapter."""
    import rankwise as rw

    from .finetune import read_labels

    adapter = Path(adapter)
    keys, heads = adapter_requirements(adapter) if plan is None else plan[:2]
    cname, cls = choose_class(base, keys) if plan is None else plan[2:]
    kwargs = {}
    id2label = read_labels(adapter)
    if cname in _CLASSIFIERS and (heads or id2label):
        n = next(iter(heads.values()))[0] if heads else len(id2label)
        kwargs = {"num_labels": n, "ignore_mismatched_sizes": True}
    torch.manual_seed(seed)
    model = cls.from_pretrained(base, **kwargs)
    if id2label and len(id2label) == getattr(model.config, "num_labels", None):
        model.config.id2label, model.config.label2id = id2label, {v: k for k, v in id2label.items()}
    if _is_peft(adapter):
        rw.import_peft(model, adapter)
    else:
        rw.load(model, adapter)
    return model.eval(), cname


def plan_adapter(base: str, adapter: Path) -> tuple:
    """``(keys, heads, class name, class)`` of an adapter folder: read and matched, nothing loaded."""
    keys, heads = adapter_requirements(adapter)
    return (keys, heads, *choose_class(base, keys))


def adapter_method(path: Path) -> str:
    """The method an adapter folder holds: ``"lora"``, ``"lora+dora"`` (several adapters), or for a PEFT
    folder its ``peft_type`` in lower case and ``(PEFT)``."""
    from ..io.atomic import read_json

    cfg = read_json(path / "adapter_config.json", "is this an adapter directory?")
    if "peft_type" in cfg:
        return f"{str(cfg['peft_type']).lower()} (PEFT)"
    names = [str(info.get("method", "?")) for info in (cfg.get("adapters") or {}).values() if isinstance(info, dict)]
    return "+".join(dict.fromkeys(names)) or "?"


def resolve_adapter(path: str) -> Path:
    """An ``--adapter`` value as an adapter folder: itself, or the ``adapter/`` of a finetune --out folder."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return p
    if (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    if not p.exists():
        raise FileNotFoundError(f"--adapter {path}: no such folder; check the path.")
    if (p / "config.json").is_file() or (p / "model" / "config.json").is_file():
        raise ConfigError(f"--adapter {path} is a full model folder, not an adapter; pass it with --finetuned.")
    if (p / "trainer_state.json").is_file():
        raise ConfigError(f"--adapter {path} is a training checkpoint (for --resume); pass the adapter/ folder "
                          f"beside it ({p.parent / 'adapter'}) or the --out folder of rankwise finetune.")
    raise CorruptFileError(f"--adapter {path} has no adapter_config.json; pass a folder written by rw.save / "
                           "rankwise finetune (or its --out folder), or a PEFT adapter folder.")


def resolve_finetuned(path: str) -> str:
    """A ``--finetuned`` value as a model folder: itself, or the ``model/`` of a finetune --out folder."""
    from ..integrations.hf import check_model_path

    p = Path(path)
    if (p / "config.json").is_file():
        return str(p)
    if (p / "model" / "config.json").is_file():
        return str(p / "model")
    if (p / "trainer_state.json").is_file():
        raise ConfigError(f"--finetuned {path} is a training checkpoint (trainable weights and optimizer state, no "
                          "config.json), not a model folder; pass the --out folder of rankwise finetune --method full "
                          f"(or its model/ folder: {p.parent / 'model'}).")
    if (p / "adapter_config.json").is_file() or (p / "adapter" / "adapter_config.json").is_file():
        raise ConfigError(f"--finetuned {path} holds an adapter, not a full model; pass it with --adapter.")
    if p.is_dir():
        raise CorruptFileError(f"--finetuned {path} has no config.json; pass a save_pretrained model folder or the "
                               "--out folder of rankwise finetune --method full.")
    return check_model_path(path, "--finetuned")


def load_finetuned_pair(base: str, finetuned: str):
    """(base model, fine-tuned model, modules the base checkpoint does not hold)."""
    import transformers
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(finetuned)
    arch = (getattr(cfg, "architectures", None) or ["AutoModel"])[0]
    cls = getattr(transformers, arch, None) or transformers.AutoModel
    ft = cls.from_pretrained(finetuned)
    kwargs = {"num_labels": cfg.num_labels, "ignore_mismatched_sizes": True} if hasattr(cfg, "num_labels") else {}
    torch.manual_seed(0)
    b, info = cls.from_pretrained(base, output_loading_info=True, **kwargs)
    fresh = {k.rpartition(".")[0] for k in info.get("missing_keys", [])}
    fresh |= {(k[0] if isinstance(k, tuple) else k).rpartition(".")[0] for k in info.get("mismatched_keys", [])}
    return b.eval(), ft.eval(), sorted(fresh)


def make_batches(base: str, data: str | None, text_col: str, label_col: str, max_examples: int,
                 max_length: int, batch_size: int, seed: int) -> tuple[list, str]:
    from transformers import AutoTokenizer

    from ..data import read_table, stdlib_docstrings
    from ..integrations.hf import ClassificationTask

    if data in (None, "stdlib"):
        ds = stdlib_docstrings(max_per_family=max(1, max_examples))
        where = "Python standard library docstrings"
    else:
        ds = read_table(data, text_col, label_col)
        where = Path(data).name
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:max_examples].sort().values.tolist()
    ds = ds.subset(idx)
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    task = ClassificationTask(tok, max_length=max_length)
    enc = task.encode(ds)
    batches = [task.collate(enc[i: i + batch_size]) for i in range(0, len(enc), batch_size)]
    return batches, f"{len(ds)} examples from {where}, max {max_length} tokens"


_GENERIC = {"adapter", "model", "best", "checkpoint", "final"}


def display_names(paths) -> list[str]:
    """Short, distinct names of folders: the last path component, with as many components above it as
    it takes to tell them apart (and at least one above a generic name such as ``adapter``)."""
    parts = [Path(p).resolve().parts for p in paths]
    depth = [2 if len(ps) > 1 and ps[-1] in _GENERIC else 1 for ps in parts]
    while True:
        names = ["/".join(ps[-d:]) for ps, d in zip(parts, depth)]
        grow = [i for i, n in enumerate(names) if depth[i] < len(parts[i])
                and any(m == n and parts[j] != parts[i] for j, m in enumerate(names))]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    out = []
    for n in names:  # identical paths given twice
        while n in out:
            n += "'"
        out.append(n)
    return out


def run_analyze(args) -> dict:
    from ..analysis import analyze, write_report
    from ..utils.table import format_table

    _quiet()
    if not args.adapter and not args.finetuned:
        raise ConfigError("rankwise analyze: pass --adapter <dir> (one or more) or --finetuned <model folder>.")
    from ..integrations.hf import check_model_path

    check_model_path(args.base, "--base")
    adapters = [resolve_adapter(p) for p in args.adapter or []]  # every input checked before minutes of work
    finetuned = [resolve_finetuned(p) for p in args.finetuned or []]
    from .common import check_out

    out = check_out(args.out, "analyze", ("report.md", "report.html", "*.png"))
    plans = [plan_adapter(args.base, p) for p in adapters]
    for folder in finetuned:
        _check_finetuned_config(folder)
    methods = [adapter_method(p) for p in adapters] + ["full"] * len(finetuned)
    names = display_names(adapters + [Path(f) for f in finetuned])
    batches, data_note = (None, "")
    if args.data is not None:
        batches, data_note = make_batches(args.base, args.data, args.text_col, args.label_col, args.max_examples,
                                          args.max_length, args.batch_size, args.seed)
    opts = {"k": args.top_k, "eps": args.eps, "r": args.rank, "layers": args.layers, "seed": args.seed,
            "method": "randomized" if args.randomized else "auto", "progress": not args.no_progress}
    analyses, cache = {}, {}
    for name, path, plan in zip(names, adapters, plans):
        model, cname = load_adapted(args.base, path, seed=args.seed, plan=plan)
        analyses[name] = analyze(model, None, batches, name=name, cache=cache, **opts)
        del model
    for name, path in zip(names[len(adapters):], finetuned):
        base, ft, fresh = load_finetuned_pair(args.base, path)
        analyses[name] = analyze(base, ft, batches, name=name, cache=cache, exclude=fresh, **opts)
        del base, ft
    by_name = dict(zip(names, methods))
    folders = dict(zip(names, [str(p) for p in adapters] + finetuned))
    notes = (f"Base: {args.base}. Models: " + "; ".join(f"{n} = {by_name[n]} from {folders[n]}" for n in analyses)
             + "." + (f" Data: {data_note}." if data_note else " No data (weight measures only)."))
    report = write_report(analyses, out, title=f"rankwise analyze: {', '.join(analyses)}", notes=notes,
                          methods=by_name)
    keys = ["layers", "relative weight change", "median rank ΔW", "mean eff. rank ΔW", "intruders (total)",
            "mean amplification"] + (["mean CKA", "RankMe base", "RankMe adapted"] if batches else [])
    rows = [[nm, by_name[nm]] + [a.summary.get(k, float("nan")) for k in keys] for nm, a in analyses.items()]
    print(format_table(rows, ["model", "method"] + keys))
    print(f"\nreport: {report}  (and {out / 'report.md'})")
    return {nm: a.summary for nm, a in analyses.items()}


def _check_finetuned_config(folder: str) -> None:
    """The folder's config.json loads (a model type transformers knows), before any analysis."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"--finetuned {folder}: its config.json does not load ({' '.join(str(e).split())[:200]}); "
                          "pass a folder written by save_pretrained or rankwise finetune --method full.") from None
