"""``rankwise analyze``: what fine-tuning changed, per layer, as an HTML + Markdown report.

    rankwise analyze --base <model> --adapter <dir> [--adapter <dir2>] [--data [file]] --out report/
    rankwise analyze --base <model> --finetuned <model> [--data [file]] --out report/

``--adapter`` takes a rankwise adapter directory (``rw.save``) or a PEFT one (``rw.import_peft``);
the base model class (bare, sequence classifier, causal LM …) is the one whose module names the
adapter uses, found on an empty (meta-device) skeleton before anything is loaded. ``--finetuned`` is
a full model folder; the base is loaded with the same class, and layers the base checkpoint lacks
(a new classification head) are left out. ``--data`` adds the representation measures, on a CSV/JSONL
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
        raise CorruptFileError(f"{cfg} is not valid JSON ({e}).") from None


def adapter_requirements(path: Path) -> tuple[list[str], dict[str, tuple]]:
    """Module names an adapter directory needs (tensor keys without their last one or two parts for
    PEFT files) and the weight shapes of the modules it saves fully (a classification head)."""
    if _is_peft(path):
        from ..io.atomic import read_tensors
        from ..io.peft import PREFIX

        tensors = read_tensors(path / "adapter_model.safetensors", "is this a PEFT adapter directory?")
        keys, heads = [], {}
        for key, t in tensors.items():
            k = key[len(PREFIX):] if key.startswith(PREFIX) else key
            k = re.sub(r"\.(?:modules_to_save\.[^.]+|original_module)\.", ".", k)
            keys.append(k)
            if ".modules_to_save." in key and key.endswith(".weight"):
                heads[k.rpartition(".")[0]] = tuple(t.shape)
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


def load_adapted(base: str, adapter: Path, seed: int = 0):
    """(model with the adapter loaded and active, class name)."""
    import rankwise as rw

    keys, heads = adapter_requirements(adapter)
    cname, cls = choose_class(base, keys)
    kwargs = {}
    if cname in _CLASSIFIERS and heads:
        kwargs = {"num_labels": next(iter(heads.values()))[0], "ignore_mismatched_sizes": True}
    torch.manual_seed(seed)
    model = cls.from_pretrained(base, **kwargs)
    if _is_peft(adapter):
        rw.import_peft(model, adapter)
    else:
        rw.load(model, adapter)
    return model.eval(), cname


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


def _names(paths) -> list[str]:
    out = []
    for p in paths:
        n = Path(p).name or str(p)
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
    for folder in args.finetuned or []:
        check_model_path(folder, "--finetuned")
    from .common import check_out

    out = check_out(args.out, "analyze", ("report.md", "report.html", "*.png"))  # before minutes of analysis
    batches, data_note = (None, "")
    if args.data is not None:
        batches, data_note = make_batches(args.base, args.data, args.text_col, args.label_col, args.max_examples,
                                          args.max_length, args.batch_size, args.seed)
    opts = {"k": args.top_k, "eps": args.eps, "r": args.rank, "layers": args.layers, "seed": args.seed,
            "method": "randomized" if args.randomized else "auto", "progress": not args.no_progress}
    analyses, cache = {}, {}
    for name, path in zip(_names(args.adapter or []), args.adapter or []):
        model, cname = load_adapted(args.base, Path(path), seed=args.seed)
        analyses[name] = analyze(model, None, batches, name=name, cache=cache, **opts)
        del model
    for name, path in zip(_names(args.finetuned or []), args.finetuned or []):
        base, ft, fresh = load_finetuned_pair(args.base, path)
        analyses[name] = analyze(base, ft, batches, name=name, cache=cache, exclude=fresh, **opts)
        del base, ft
    notes = f"Base: {args.base}." + (f" Data: {data_note}." if data_note else " No data (weight measures only).")
    report = write_report(analyses, out, title=f"rankwise analyze: {', '.join(analyses)}", notes=notes)
    keys = ["layers", "relative weight change", "median rank ΔW", "mean eff. rank ΔW", "intruders (total)",
            "mean amplification"] + (["mean CKA", "RankMe base", "RankMe adapted"] if batches else [])
    rows = [[nm] + [a.summary.get(k, float("nan")) for k in keys] for nm, a in analyses.items()]
    print(format_table(rows, ["model"] + keys))
    print(f"\nreport: {report}  (and {out / 'report.md'})")
    return {nm: a.summary for nm, a in analyses.items()}
