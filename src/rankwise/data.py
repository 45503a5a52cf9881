"""Small text-classification datasets: a real task with no download, and the user's own tables.

``stdlib_docstrings()`` labels the docstrings of the Python standard library's own source
files by the package or module they come from; ``read_table()`` reads a ``.csv`` or
``.jsonl`` file with a text column and a label column. Both return a :class:`TextDataset`,
which ``split()`` divides into train and validation sets, stratified per label.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import random
import re
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, CorruptFileError

__all__ = ["DEFAULT_FAMILIES", "TextDataset", "read_table", "stdlib_docstrings"]


@dataclass
class TextDataset:
    """``(text, label)`` pairs; ``label`` indexes ``label_names``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.texts, self.labels, self.label_names = list(self.texts), list(self.labels), list(self.label_names)
        if len(self.texts) != len(self.labels):
            raise ConfigError(f"TextDataset: {len(self.texts)} texts but {len(self.labels)} labels; "
                              "give one label per text.")
        if not self.label_names and self.labels:
            self.label_names = [str(i) for i in range(max(self.labels) + 1)]
        bad = [lab for lab in self.labels if not 0 <= lab < len(self.label_names)]
        if bad:
            raise ConfigError(f"TextDataset: label {bad[0]} is outside 0..{len(self.label_names) - 1} "
                              f"({len(self.label_names)} label_names); give a name for every label.")

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(range(len(self))[i])
        return self.texts[i], self.labels[i]

    def subset(self, indices) -> TextDataset:
        """The examples at ``indices`` (in that order), with the same ``label_names``."""
        indices = list(indices)
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                           self.label_names)

    def counts(self) -> dict[str, int]:
        """Number of examples per label name."""
        out = dict.fromkeys(self.label_names, 0)
        for lab in self.labels:
            out[self.label_names[lab]] += 1
        return out

    def split(self, valid_frac: float = 0.2, seed: int = 0) -> tuple[TextDataset, TextDataset]:
        """Split into ``(train, valid)``: disjoint, covering every example, stratified per label.

        Each label puts ``round(n * valid_frac)`` of its ``n`` examples in ``valid`` (at least
        one, and at least one left for ``train``, when ``n >= 2``), chosen by a
        ``random.Random(seed)`` shuffle, so the same seed always gives the same split. Both
        parts keep the original order of the examples.
        """
        if isinstance(valid_frac, bool) or not isinstance(valid_frac, (int, float)) or not 0 < valid_frac < 1:
            raise ConfigError(f"split: valid_frac={valid_frac!r} must be a fraction strictly between 0 and 1 "
                              "(e.g. 0.2).")
        rng = random.Random(seed)
        valid: list[int] = []
        for lab in range(len(self.label_names)):
            idx = [i for i, y in enumerate(self.labels) if y == lab]
            rng.shuffle(idx)
            k = round(len(idx) * valid_frac)
            if len(idx) >= 2:
                k = min(max(k, 1), len(idx) - 1)
            valid += idx[:k]
        in_valid = set(valid)
        train_idx = [i for i in range(len(self)) if i not in in_valid]
        return self.subset(train_idx), self.subset(sorted(in_valid))


# ---------------------------------------------------------------------------------------------
# The standard library's docstrings, labelled by module family

#: Default families: label name -> top-level stdlib packages/modules that make it up. All are
#: pure-Python source present in CPython 3.10-3.13 (``decimal`` is read from ``_pydecimal.py``,
#: its pure-Python implementation; ``distutils``, gone in 3.12, is not used). On 3.11 each has
#: 146-621 distinct docstrings of 40..2000 characters (see ``stdlib_docstrings``).
DEFAULT_FAMILIES: dict[str, tuple[str, ...]] = {
    "asyncio": ("asyncio",),
    "decimal": ("_pydecimal",),
    "email": ("email",),
    "importlib": ("importlib",),
    "logging": ("logging",),
    "multiprocessing": ("multiprocessing",),
    "tkinter": ("tkinter",),
    "turtle": ("turtle",),
    "unittest": ("unittest",),
    "xml": ("xml",),
}

_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_docstrings(
    families: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    min_chars: int = 40,
    max_chars: int = 2000,
    max_per_family: int | None = None,
) -> TextDataset:
    """Docstrings of the Python standard library, labelled by the module family they come from.

    A real text-classification task that needs no download: the ``.py`` files under
    ``sysconfig.get_paths()["stdlib"]`` are parsed with :mod:`ast` (never imported), and the
    module, class and function docstrings (``ast.get_docstring``, i.e. dedented) of
    ``min_chars..max_chars`` characters are kept; shorter or longer ones are skipped. The label
    is the family: a top-level package or module name (``email``, ``asyncio`` ...). Directories
    named ``test``, ``tests``, ``idlelib``, ``lib2to3``, ``site-packages`` and ``__pycache__``
    are skipped. A text repeated within a family is kept once; a text found in two families is
    dropped (its label would be ambiguous). Files are walked in sorted order, so the result is
    the same on every call.

    ``families``: ``None`` for :data:`DEFAULT_FAMILIES` (families missing from this Python's
    stdlib are left out), a list of top-level names, or a mapping label -> top-level names
    (e.g. ``{"web": ["http", "urllib"]}``). Labels index ``label_names``, which is sorted.

    ``max_per_family``: keep at most this many docstrings per family, chosen by a stable hash
    of the text (BLAKE2b), so the subset is the same on every run and machine with the same
    stdlib; kept examples stay in file order.

    Default families and their counts on CPython 3.11.7 (Linux; default arguments; 2479 in all)::

        asyncio 283   decimal 182   email 262   importlib 255   logging 221
        multiprocessing 155   tkinter 621   turtle 153   unittest 146   xml 201

    ``split(valid_frac=0.25, seed=0)`` (what ``rankwise demo`` uses) gives 1859 train / 620
    valid; with ``max_per_family=150`` there are 1496 examples (150 per family, unittest 146),
    1118 train / 378 valid. Takes about a second (only the chosen families' files are parsed).
    """
    if min_chars < 0 or max_chars < min_chars:
        raise ConfigError(f"stdlib_docstrings: min_chars={min_chars}, max_chars={max_chars}; need "
                          "0 <= min_chars <= max_chars.")
    if max_per_family is not None and (isinstance(max_per_family, bool) or max_per_family < 1):
        raise ConfigError(f"stdlib_docstrings: max_per_family={max_per_family!r} must be a positive int "
                          "or None (no cap).")
    root = Path(sysconfig.get_paths()["stdlib"])
    explicit = families is not None
    if families is None:
        groups = dict(DEFAULT_FAMILIES)
    elif isinstance(families, Mapping):
        groups = {str(k): tuple([v] if isinstance(v, str) else v) for k, v in families.items()}
    elif isinstance(families, str):
        raise ConfigError(f"stdlib_docstrings: families={families!r} is a string; pass a list of names, "
                          f"e.g. [{families!r}].")
    else:
        groups = {str(name): (str(name),) for name in families}
    if not groups:
        raise ConfigError("stdlib_docstrings: families is empty; pass at least two family names or None.")

    per_family: dict[str, list[str]] = {}
    for label, tops in groups.items():
        texts: list[str] = []
        for top in tops:
            for path in _source_files(root, top):
                texts += _docstrings(path, min_chars, max_chars)
        per_family[label] = list(dict.fromkeys(texts))  # drop repeats, keep first occurrence

    missing = [label for label, texts in per_family.items() if not texts]
    if missing and explicit:
        raise ConfigError(
            f"stdlib_docstrings: no docstrings found for famil{'y' if len(missing) == 1 else 'ies'} "
            f"{', '.join(missing)} under {root}; pass top-level stdlib package or module names "
            f"such as {', '.join(sorted(DEFAULT_FAMILIES))}.")
    owners: dict[str, int] = {}
    for texts in per_family.values():
        for t in texts:
            owners[t] = owners.get(t, 0) + 1

    label_names = sorted(label for label, texts in per_family.items() if texts)
    out_texts: list[str] = []
    out_labels: list[int] = []
    for lab, label in enumerate(label_names):
        texts = [t for t in per_family[label] if owners[t] == 1]
        if max_per_family is not None and len(texts) > max_per_family:
            keep = set(sorted(range(len(texts)), key=lambda i: _stable_hash(texts[i]))[:max_per_family])
            texts = [t for i, t in enumerate(texts) if i in keep]
        out_texts += texts
        out_labels += [lab] * len(texts)
    return TextDataset(out_texts, out_labels, label_names)


def _source_files(root: Path, top: str) -> list[Path]:
    """``.py`` files of top-level package or module ``top`` in sorted walk order."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", top):
        raise ConfigError(f"stdlib_docstrings: {top!r} is not a module name; pass top-level stdlib names "
                          "such as 'email' or 'asyncio'.")
    if (root / f"{top}.py").is_file():
        return [root / f"{top}.py"]
    pkg = root / top
    if not pkg.is_dir() or top in _SKIP_DIRS:
        return []
    files = []
    for dirpath, dirnames, filenames in os.walk(pkg):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def _docstrings(path: Path, min_chars: int, max_chars: int) -> list[str]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []  # e.g. a file written for another Python version; not ours to fix
    out = []
    for node in ast.walk(tree):
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node)
            if doc and min_chars <= len(doc.strip()) <= max_chars:
                out.append(doc.strip())
    return out


def _stable_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


# ---------------------------------------------------------------------------------------------
# The user's own data

_INT_RE = re.compile(r"[+-]?\d+")


def read_table(path: str | os.PathLike, text_col: str = "text", label_col: str = "label") -> TextDataset:
    """Read a ``.csv`` (header row) or ``.jsonl`` (one JSON object per line) file.

    Labels that are all integers (JSON ints, or CSV cells like ``"2"``) are used as they are and
    must be ``>= 0``; ``label_names`` is then ``["0", "1", ..., str(max)]``. Any other labels are
    names: they are mapped to ``0..k-1`` in sorted order and kept in ``label_names``.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".csv", ".jsonl"):
        raise ConfigError(f"read_table: unknown file extension {path.suffix!r} of {path}; use a .csv file with "
                          "a header row or a .jsonl file with one JSON object per line.")
    if not path.is_file():
        raise FileNotFoundError(f"read_table: no such file: {path}")
    try:
        rows = _read_csv(path, text_col, label_col) if ext == ".csv" else _read_jsonl(path, text_col, label_col)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    if not rows:
        raise ConfigError(f"read_table: {path} has no data rows; it needs a header row and at least one "
                          "example." if ext == ".csv" else f"read_table: {path} has no JSON lines.")
    texts = [t for t, _ in rows]
    raw = [y for _, y in rows]
    if all(isinstance(y, int) and not isinstance(y, bool) for y in raw) or (
            ext == ".csv" and all(_INT_RE.fullmatch(y.strip()) for y in raw)):
        labels = [int(y) for y in raw]
        neg = [y for y in labels if y < 0]
        if neg:
            raise ConfigError(f"read_table: integer label {neg[0]} in {path} is negative; integer labels must "
                              "be 0..num_labels-1 (or use label names, which are mapped to ints).")
        distinct = len(set(labels))
        if max(labels) >= 1000 and max(labels) + 1 > 10 * distinct:
            raise ConfigError(f"read_table: integer labels in {path} go up to {max(labels)} but only {distinct} "
                              f"distinct values occur: they would make a head of {max(labels) + 1} classes. If they "
                              "are ids rather than class indices 0..k-1, map them to 0..k-1 or write them as names "
                              "(e.g. 'id_1000000'), which are mapped for you.")
        return TextDataset(texts, labels, [str(i) for i in range(max(labels) + 1)])
    names = [y if isinstance(y, str) else json.dumps(y) for y in raw]
    label_names = sorted(set(names))
    index = {name: i for i, name in enumerate(label_names)}
    return TextDataset(texts, [index[n] for n in names], label_names)


def _not_utf8(path: Path) -> ConfigError:
    """Name the line and byte of the first byte sequence that is not UTF-8."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
        where = ""
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        where = f" at line {line} (byte 0x{raw[e.start]:02x})"
    return ConfigError(f"read_table: {path} is not UTF-8 text{where}; save it as UTF-8 (e.g. iconv -f latin1 "
                       "-t utf-8, or 'Save as CSV UTF-8' in a spreadsheet).")


def _read_csv(path: Path, text_col: str, label_col: str) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames
        if not columns:
            raise ConfigError(f"read_table: {path} is empty; it needs a header row naming the columns "
                              f"(e.g. {text_col},{label_col}) and at least one example.")
        _check_columns(path, columns, text_col, label_col)
        rows = []
        try:
            start = reader.line_num + 1  # the physical line a row starts on (a quoted field may span lines)
            for line, row in enumerate(reader, start=2):
                if reader.line_num > start and _bad_row(row, text_col, label_col):
                    end = "the end of the file" if f.read(1) == "" else f"line {reader.line_num}"
                    raise ConfigError(
                        f"read_table: {path} line {start} (row {line}) opens a quote (\") that is not closed before "
                        f"{end}, so the lines after it were read as one field. Close the quote, or write a quote "
                        'inside a quoted field as two ("").')
                rows.append(_csv_row(path, line, row, text_col, label_col))
                start = reader.line_num + 1
        except csv.Error as e:
            limit = csv.field_size_limit()
            hint = (f"a field is longer than Python's csv limit of {limit} characters; split long texts or use a "
                    ".jsonl file" if "field larger" in str(e) else "check its quoting (an unclosed quote runs on "
                    "to the end of the file)")
            raise ConfigError(f"read_table: {path} cannot be parsed after line {reader.line_num} ({e}); {hint}.") from None
    return rows


def _bad_row(row: dict, text_col: str, label_col: str) -> bool:
    label = row.get(label_col)
    return row.get(text_col) is None or label is None or label.strip() == "" or "\n" in label


def _csv_row(path: Path, line: int, row: dict, text_col: str, label_col: str) -> tuple[str, str]:
    text, label = row.get(text_col), row.get(label_col)
    if text is None or label is None or label.strip() == "":
        raise ConfigError(f"read_table: row {line} of {path} has no value in column "
                          f"{text_col if text is None else label_col!r}; fill it or drop the row.")
    return text, label.strip()


def _read_jsonl(path: Path, text_col: str, label_col: str) -> list[tuple[str, object]]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorruptFileError(f"read_table: line {line_no} of {path} is not valid JSON ({e.msg}); "
                                       "each line must be one JSON object.") from None
            if not isinstance(obj, dict):
                raise CorruptFileError(f"read_table: line {line_no} of {path} is a JSON {type(obj).__name__}, "
                                       "not an object; each line must be like "
                                       f'{{"{text_col}": "...", "{label_col}": ...}}.')
            _check_columns(path, list(obj), text_col, label_col, where=f"line {line_no} of ")
            text, label = obj[text_col], obj[label_col]
            if text is None:
                raise ConfigError(f"read_table: line {line_no} of {path} has a null {text_col!r}; give every "
                                  "example a text, or drop the line.")
            if label is None:
                raise ConfigError(f"read_table: line {line_no} of {path} has a null {label_col!r}; give every "
                                  "example a label.")
            rows.append((text if isinstance(text, str) else json.dumps(text), label))
    return rows


def _check_columns(path: Path, columns, text_col: str, label_col: str, where: str = "") -> None:
    for col, arg in ((text_col, "text_col"), (label_col, "label_col")):
        if col not in columns:
            raise ConfigError(f"read_table: {where}{path} has no column {col!r}; columns present: "
                              f"{', '.join(map(repr, columns))}. Pass {arg}= with one of them.")
