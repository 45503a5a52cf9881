"""Re-run the reliability probe's cases as tests and print the table before / after.

    python benchmarks/reliability.py [--review ../shared/reviews/reliability.md]

The review (120 hostile or careless inputs and faults, each with a verdict) is read from its
markdown table. Every test whose docstring names a case id ("Reliability case W5", "W7 / W8: …")
is collected with :mod:`ast`, all of them run in one pytest process, and each case gets the
verdict of its tests: ``FIXED`` (it failed in the review, its tests pass), ``OK`` (it passed in
the review and its tests pass), ``FAILING`` (a test of it fails), or ``OK, not re-run`` (passed
in the review, no test names it). Writes ``benchmarks/results/reliability.md``.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| ([A-Z]{1,2}\d{1,2}) \| ([^|]+) \|(.*)\| \*{0,2}([A-Z-]+(?: [A-Z-]+)?)\*{0,2} \| [^|]*\|\s*$")


def review_cases(path: Path) -> dict[str, tuple[str, str, str]]:
    """``{id: (category, what was tried, verdict)}`` from the review's table."""
    cases = {}
    for line in path.read_text().splitlines():
        m = ROW.match(line)
        if m:
            cells = [c.strip() for c in m.group(3).split(" | ")]
            cases[m.group(1)] = (m.group(2).strip(), cells[0] if cells else "", m.group(4))
    return cases


def tagged_tests(ids: set[str]) -> dict[str, list[str]]:
    """``{case id: [pytest node id, ...]}`` from the docstrings of the test functions."""
    found: dict[str, list[str]] = {}
    pattern = re.compile(r"\b(" + "|".join(sorted(ids, key=len, reverse=True)) + r")\b")
    for f in sorted((ROOT / "tests").rglob("test_*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                doc = ast.get_docstring(node) or ""
                # "Reliability case W5 …" anywhere, or a docstring that opens with the ids ("C1 / C2: …")
                named = " ".join(re.findall(r"[Rr]eliability cases? ([A-Z0-9 /,and]+)", doc))
                first = doc.split(":", 1)[0] if re.match(r"[A-Z]{1,2}\d{1,2}\b", doc) else ""
                for case in set(pattern.findall(f"{named} {first}")):
                    found.setdefault(case, []).append(f"{f.relative_to(ROOT)}::{node.name}")
    return found


def run(nodes: list[str]) -> dict[str, bool]:
    """Run ``nodes`` in one pytest process; ``{node: passed}`` (a parametrized test passes when all
    its cases pass)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *nodes],
                       cwd=ROOT, capture_output=True, text=True)
        result: dict[str, bool] = {}
        for case in ET.parse(xml).iter("testcase"):
            path = case.get("classname", "").replace(".", "/") + ".py"
            node = f"{path}::{case.get('name', '').split('[')[0]}"
            ok = not any(child.tag in ("failure", "error") for child in case)
            result[node] = result.get(node, True) and ok
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--review", default=str(ROOT.parent / "shared" / "reviews" / "reliability.md"))
    args = ap.parse_args()
    cases = review_cases(Path(args.review))
    tests = tagged_tests(set(cases))
    t0 = time.perf_counter()
    outcome = run(sorted({n for ns in tests.values() for n in ns}))
    rows, before, after = [], Counter(), Counter()
    for cid, (category, tried, verdict) in cases.items():
        nodes = tests.get(cid, [])
        results = [outcome.get(n) for n in nodes]
        if not nodes:
            now = "OK, not re-run" if verdict == "OK" else "FAILING (no test)"
        elif all(r is True for r in results):
            now = "OK" if verdict == "OK" else "FIXED"
        else:
            now = "FAILING"
        before[verdict] += 1
        after["OK" if now in ("FIXED", "OK", "OK, not re-run") else "FAILING"] += 1
        shown = ", ".join(sorted({n.split("::")[1] for n in nodes})[:2]) + (" …" if len(nodes) > 2 else "")
        what = tried.replace("|", "/")
        what = what if len(what) <= 70 else what[:69] + "…"
        rows.append(f"| {cid} | {category} | {what} | {verdict} | {now} | {shown} |")
    wall = time.perf_counter() - t0
    table = "\n".join(["| case | category | what was tried | review | now | tests |", "|---|---|---|---|---|---|", *rows])
    summary = (f"Review: {', '.join(f'{v} {k}' for k, v in before.most_common())}. "
               f"Now: {', '.join(f'{v} {k}' for k, v in after.most_common())} "
               f"({sum(1 for r in rows if '| FIXED |' in r)} fixed, each with a test; "
               f"{len({n for ns in tests.values() for n in ns})} tests run in {wall:.0f} s).")
    print(table)
    print()
    print(summary)
    out = ROOT / "benchmarks" / "results" / "reliability.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Reliability probe, re-run\n\n{summary}\n\n{table}\n")
    if after["FAILING"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
