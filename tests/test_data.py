"""rankwise.data: the stdlib docstring task, stratified splits, CSV/JSONL tables."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from rankwise.data import DEFAULT_FAMILIES, TextDataset, read_table, stdlib_docstrings
from rankwise.errors import ConfigError, CorruptFileError


@pytest.fixture(scope="module")
def stdlib():
    return stdlib_docstrings()


def test_default_task_has_enough_families_and_examples(stdlib):
    counts = stdlib.counts()
    assert stdlib.label_names == sorted(stdlib.label_names)
    assert len(counts) >= 8
    assert all(n >= 100 for n in counts.values()), counts
    assert set(counts) <= set(DEFAULT_FAMILIES)
    assert all(isinstance(t, str) and 40 <= len(t) <= 2000 for t in stdlib.texts)
    assert len(set(stdlib.texts)) == len(stdlib)  # no repeats, so no leakage across a split
    text, label = stdlib[0]
    assert text == stdlib.texts[0] and label == stdlib.labels[0]


def test_stdlib_is_deterministic(stdlib):
    again = stdlib_docstrings()
    assert again.texts == stdlib.texts and again.labels == stdlib.labels and again.label_names == stdlib.label_names


def test_max_per_family_is_a_deterministic_balanced_subset(stdlib):
    small = stdlib_docstrings(max_per_family=50)
    assert small.label_names == stdlib.label_names
    assert set(small.counts().values()) == {50}
    assert small.texts == stdlib_docstrings(max_per_family=50).texts
    assert set(small.texts) <= set(stdlib.texts)
    # a subset of a larger cap's subset: the choice is by a stable hash, not by position
    assert set(small.texts) <= set(stdlib_docstrings(max_per_family=100).texts)


def test_explicit_families():
    ds = stdlib_docstrings(families=["json", "logging"])
    assert ds.label_names == ["json", "logging"]
    ds = stdlib_docstrings(families={"web": ["http", "urllib"]}, max_per_family=20)
    assert ds.label_names == ["web"] and len(ds) == 20
    with pytest.raises(ConfigError, match="no_such_module"):
        stdlib_docstrings(families=["json", "no_such_module"])
    with pytest.raises(ConfigError, match="max_per_family"):
        stdlib_docstrings(max_per_family=0)


def test_split_is_disjoint_covering_deterministic_stratified(stdlib):
    train, valid = stdlib.split(valid_frac=0.25, seed=0)
    pairs = list(zip(stdlib.texts, stdlib.labels))
    tr, va = list(zip(train.texts, train.labels)), list(zip(valid.texts, valid.labels))
    assert len(tr) + len(va) == len(pairs)
    assert not set(tr) & set(va)
    assert sorted(tr + va) == sorted(pairs)
    assert train.label_names == valid.label_names == stdlib.label_names
    again = stdlib.split(valid_frac=0.25, seed=0)
    assert again[0].texts == train.texts and again[1].texts == valid.texts
    assert stdlib.split(valid_frac=0.25, seed=1)[1].texts != valid.texts
    total, held = Counter(stdlib.labels), Counter(valid.labels)
    for lab, n in total.items():
        assert abs(held[lab] - 0.25 * n) <= 1, (lab, held[lab], n)


def test_split_small_and_bad_fraction():
    ds = TextDataset(["a", "b", "c", "d", "e"], [0, 0, 1, 1, 1], ["x", "y"])
    train, valid = ds.split(valid_frac=0.1)
    assert sorted(valid.labels) == [0, 1]  # at least one per label in valid ...
    assert sorted(train.labels) == [0, 1, 1]  # ... and at least one left for train
    for bad in (0, 1, 1.5, -0.2):
        with pytest.raises(ConfigError, match="valid_frac"):
            ds.split(valid_frac=bad)


def test_read_csv_with_string_labels(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('sentence,tag\n"hello, world",pos\nbad day,neg\nfine,pos\n')
    ds = read_table(path, text_col="sentence", label_col="tag")
    assert ds.texts == ["hello, world", "bad day", "fine"]
    assert ds.label_names == ["neg", "pos"]
    assert ds.labels == [1, 0, 1]


def test_read_csv_with_int_labels(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,2\nb,0\n")
    ds = read_table(path)
    assert ds.labels == [2, 0] and ds.label_names == ["0", "1", "2"]


def test_read_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "one", "label": "b"}, {"text": "two", "label": "a"}, {"text": "three", "label": "b"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = read_table(path)
    assert ds.texts == ["one", "two", "three"]
    assert ds.label_names == ["a", "b"] and ds.labels == [1, 0, 1]
    path.write_text("\n".join(json.dumps({"text": r["text"], "label": i}) for i, r in enumerate(rows)))
    assert read_table(path).labels == [0, 1, 2]


def test_read_table_errors(tmp_path):
    """Reliability case D1."""
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("sentence,tag\nhi,pos\n")
    with pytest.raises(ConfigError) as e:
        read_table(csv_path)
    assert "'text'" in str(e.value) and "'sentence'" in str(e.value) and "'tag'" in str(e.value)

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"text": "hi", "y": 1}) + "\n")
    with pytest.raises(ConfigError, match="'label'.*'text', 'y'"):
        read_table(jsonl)
    jsonl.write_text("{not json\n")
    with pytest.raises(CorruptFileError, match="line 1"):
        read_table(jsonl)

    for name, content in (("empty.csv", ""), ("header.csv", "text,label\n"), ("empty.jsonl", "\n")):
        (tmp_path / name).write_text(content)
        with pytest.raises(ConfigError, match="empty|no data rows|no JSON lines"):
            read_table(tmp_path / name)

    other = tmp_path / "d.parquet"
    other.write_text("")
    with pytest.raises(ConfigError, match=r"'\.parquet'.*\.csv.*\.jsonl"):
        read_table(other)


def test_jsonl_null_text_is_refused(tmp_path):
    """Reliability case D10: a null text became the string 'null'."""
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine", "label": "a"}\n{"text": null, "label": "b"}\n')
    with pytest.raises(ConfigError, match=r"line 2 of .*null 'text'"):
        read_table(p)


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_non_utf8_file_names_the_line(tmp_path, encoding):
    """Reliability case D2: a raw UnicodeDecodeError with no file or line."""
    p = tmp_path / "d.csv"
    p.write_bytes("text,label\nok,a\ncaf\u00e9,b\n".encode(encoding))
    with pytest.raises(ConfigError, match=r"d\.csv is not UTF-8 text at line \d+ \(byte 0x[0-9a-f]{2}\).*UTF-8"):
        read_table(p)


def test_csv_field_over_the_csv_limit_is_named(tmp_path):
    """Reliability case D3: a raw ``_csv.Error: field larger than field limit (131072)``."""
    import csv

    p = tmp_path / "big.csv"
    p.write_text("text,label\nshort,a\n" + "x" * (csv.field_size_limit() + 10) + ",b\n")
    with pytest.raises(ConfigError, match=r"big\.csv cannot be parsed after line 2 .*csv limit of \d+ characters.*jsonl"):
        read_table(p)


@pytest.mark.parametrize("labels", [[0, 5, 1000000], [99999999999, 1], [30000000, 30000000, 2]])
def test_integer_labels_far_above_the_classes_are_refused(tmp_path, labels):
    """Reliability case D8: ids used as class indices made a head of a million classes (or a MemoryError)."""
    p = tmp_path / "ids.csv"
    p.write_text("text,label\n" + "".join(f"text {i},{y}\n" for i, y in enumerate(labels)))
    with pytest.raises(ConfigError, match=r"go up to \d+ but only \d distinct values.*map them to 0\.\.k-1"):
        read_table(p)


def test_integer_labels_with_gaps_below_the_limit_are_kept(tmp_path):
    p = tmp_path / "gaps.csv"
    p.write_text("text,label\na,0\nb,5\nc,2\n")
    ds = read_table(p)
    assert ds.labels == [0, 5, 2] and len(ds.label_names) == 6


@pytest.mark.parametrize("tail, where", [("", "the end of the file"), ('more" text,\nlast,b\n', "line 5")])
def test_csv_unclosed_quote_points_at_it(tmp_path, tail, where):
    """Reliability case D4: the quote swallowed the rest of the file and the message said row 2 had no label."""
    p = tmp_path / "q.csv"
    p.write_text('text,label\nfine,a\n"opens here,b\nthird,a\n' + tail)
    with pytest.raises(ConfigError, match=rf'q\.csv line 3 \(row 3\) opens a quote .* not closed before {where}.*""'):
        read_table(p)


def test_csv_quoted_field_over_lines_is_kept(tmp_path):
    p = tmp_path / "ok.csv"
    p.write_text('text,label\n"two\nlines, and ""quotes""",a\nplain,b\n')
    ds = read_table(p)
    assert ds.texts == ['two\nlines, and "quotes"', "plain"] and ds.label_names == ["a", "b"]
