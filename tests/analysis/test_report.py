"""The analysis report opens in headless Chromium without errors and every image loads.

A copy of ``report.html`` gets two small scripts: one at the top of ``<head>`` records every
``error`` event (script errors and failed resource loads, captured on ``window``), one at the end
of ``<body>`` writes, on ``load``, how many images there are and how many are complete with a
natural width > 0. ``chromium --headless --dump-dom`` prints the DOM after the page loaded; the
test reads that record. A control page with a broken image and a throwing script shows that the
check catches both. CI installs Chromium (``make chromium``); without it this test fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch

import rankwise as rw
from rankwise.analysis import analyze, write_report

# the page's width at a 1280 px window: the document's scroll width and each table's right edge
WIDTH = ("<script>window.addEventListener('load',function(){var t=Array.prototype.slice.call("
         "document.querySelectorAll('table'));var r={window:window.innerWidth,scroll:document.documentElement.scrollWidth,"
         "tables:t.map(function(x){return Math.ceil(x.getBoundingClientRect().right);}),errors:window.__rwErrors};"
         "var p=document.createElement('pre');p.id='rw-check';p.textContent=JSON.stringify(r);"
         "document.body.appendChild(p);});</script>")
RECORD = re.compile(r'<pre id="rw-check">(.*?)</pre>', re.S)
HEAD = ("<script>window.__rwErrors=[];window.addEventListener('error',function(e){window.__rwErrors.push("
        "String(e.message||('failed to load '+((e.target&&(e.target.src||e.target.href))||'?').slice(0,60))));"
        "},true);</script>")
TAIL = ("<script>window.addEventListener('load',function(){var im=Array.prototype.slice.call(document.images);"
        "var r={images:im.length,loaded:im.filter(function(i){return i.complete&&i.naturalWidth>0;}).length,"
        "errors:window.__rwErrors};var p=document.createElement('pre');p.id='rw-check';"
        "p.textContent=JSON.stringify(r);document.body.appendChild(p);});</script>")


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("headless Chromium is needed to check the analysis report: apt-get install chromium "
                    "(or `make chromium`)")
    return exe


def render(html_text: str, tmp_path, name: str, tail: str = TAIL) -> dict:
    page = tmp_path / name
    page.write_text(html_text.replace("<head>", "<head>" + HEAD, 1).replace("</body>", tail + "</body>", 1))
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000", "--window-size=1280,900",
           "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    found = RECORD.search(proc.stdout)
    assert found, f"Chromium printed no check record (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from conftest import adapter_params, make_bert, perturb_

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_bert(seed=0)
        rw.adapt(model, "lora", rank=2, targets="all-linear")
        perturb_(adapter_params(model), seed=1, std=0.3)
        ft = make_bert(seed=0)
        perturb_([p for name, p in ft.named_parameters() if ".layer.0." in name and p.dim() == 2], seed=2, std=0.05)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, 100, (6, 7), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(6) % 3}
        analyses = {"lora": analyze(model, batches=[batch], name="lora", k=5),
                    "full": analyze(make_bert(seed=0), ft, batches=[batch], name="full", k=5,
                                    layers=r"encoder|pooler")}
        out = tmp_path_factory.mktemp("report")
        path = write_report(analyses, out, title="test <report> & co", methods={"lora": "lora", "full": "full"})
    finally:
        torch.set_num_threads(n)
    return path


def test_report_files(report):
    out = report.parent
    md = (out / "report.md").read_text()
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(pngs) == 6  # spectra, effective rank, intruders, similarity, subspace similarity, CKA
    for p in pngs:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = report.read_text()
    assert html.count("<img src='data:image/png;base64,") == 6
    assert "test &lt;report&gt; &amp; co" in html  # text is escaped
    assert "src='http" not in html and 'href="http' not in html  # self-contained
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temporaries


def test_report_renders_in_headless_chromium(report, tmp_path):
    rec = render(report.read_text(), tmp_path, "report.html")
    assert rec["errors"] == []
    assert rec["images"] == 6
    assert rec["loaded"] == rec["images"]


def test_chromium_check_catches_broken_images_and_script_errors(report, tmp_path):
    html = report.read_text().replace(
        "</body>", "<img src='data:image/png;base64,AAAA' alt='broken'><script>undefinedFunction()</script></body>", 1)
    rec = render(html, tmp_path, "broken.html")
    assert rec["images"] == 7 and rec["loaded"] == 6
    assert any("undefinedFunction" in e for e in rec["errors"])


def test_every_table_fits_a_1280px_window(report, tmp_path):
    """Trial item 9: at 1280 px the summary table ran off the page (a horizontal scrollbar). The
    summary now has a column per model, headers wrap and long layer names break."""
    rec = render(report.read_text(), tmp_path, "width.html", WIDTH)
    assert rec["window"] == 1280 and rec["errors"] == []
    assert len(rec["tables"]) == 3  # the summary and one layer table per model
    assert rec["scroll"] <= 1280 and max(rec["tables"]) <= 1280, rec


def test_width_check_catches_a_wide_table(report, tmp_path):
    wide = "<table><tr>" + "<td style='white-space:nowrap'>a_very_long_unbreakable_cell_value</td>" * 60 + "</tr></table>"
    rec = render(report.read_text().replace("</body>", wide + "</body>", 1), tmp_path, "wide.html", WIDTH)
    assert rec["scroll"] > 1280 and max(rec["tables"]) > 1280


def test_glossary_covers_every_column(report):
    """Trial item 9: the glossary covered the per-layer columns but not RankMe, NTK alignment …"""
    import html as html_lib

    page = report.read_text()
    glossary = dict(re.findall(r"<li><code>(.*?)</code>: (.*?)</li>", page))
    tables = re.findall(r"<table class='(\w*)'><thead><tr>(.*?)</tr></thead><tbody>(.*?)</tbody>", page, re.S)
    summary = [t for t in tables if t[0] == "summary"]
    layers = [t for t in tables if t[0] == "layers"]
    assert len(summary) == 1 and len(layers) == 2
    measures = [html_lib.unescape(m) for m in re.findall(r"<tr><td class='\w*'>(.*?)</td>", summary[0][2])]
    assert re.findall(r"<th>(.*?)</th>", summary[0][1]) == ["measure", "lora", "full"]
    assert measures[0] == "method" and "RankMe base" in measures and "mean CKA" in measures
    columns = {html_lib.unescape(h) for t in layers for h in re.findall(r"<th>(.*?)</th>", t[1])}
    assert {"layer", "dW_rank", "intruders", "cka"} <= columns
    unescaped = {html_lib.unescape(k): v for k, v in glossary.items()}
    for name in measures + sorted(columns):
        assert unescaped.get(name, "").strip(), f"no glossary entry for {name!r}"
    md = (report.parent / "report.md").read_text()
    for name in measures + sorted(columns):
        assert f"- `{name}`: " in md, name
