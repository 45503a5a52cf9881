"""The analysis report: ``report.html`` (self-contained: PNGs embedded as base64) and ``report.md``
(next to the PNG files it shows), with a summary table, per-layer tables and plots — spectra,
per-layer effective rank of ``ΔW``, intruder-dimension counts, similarity heatmaps and, with data,
per-layer CKA. Every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import torch

from ..io.atomic import atomic_path, write_text
from ..utils.table import format_table
from .analyzer import COLUMNS, Analysis, cross_similarity

TABLE_COLUMNS = ["layer", "shape", "rel_change", "dW_rank", "dW_erank", "dW_rank90", "W0_erank", "W_erank",
                 "intruders", "min_best_cos", "amplification", "alignment", "cka"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short_names(names: list[str]) -> list[str]:
    if len(names) < 2:
        return list(names)
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind(".") + 1] if "." in prefix else ""
    out = []
    for n in names:
        s = n[len(prefix):]
        for a, b in ((".attention.self.", "."), (".attention.output.dense", ".attn_out"),
                     (".intermediate.dense", ".ffn_in"), (".output.dense", ".ffn_out"),
                     ("encoder.layer.", "L"), ("layers.", "L"), ("self_attn.", ""), ("mlp.", "")):
            s = s.replace(a, b)
        out.append(s or n)
    return out


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


class _Figures:
    """PNG bytes by file name, written to disk and embedded in the HTML."""

    def __init__(self):
        self.png: dict[str, bytes] = {}
        self.alt: dict[str, str] = {}

    def add(self, name: str, fig, alt: str) -> None:
        plt = _plt()
        buf = io.BytesIO()
        if not fig.get_constrained_layout():
            fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        self.png[name] = buf.getvalue()
        self.alt[name] = alt


def _layer_axis(ax, names):
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(_short_names(names), rotation=90, fontsize=6)
    ax.set_xlim(-0.6, len(names) - 0.4)


def _focus_layer(a: Analysis) -> str:
    """The layer with the most intruders (ties: the lowest min_best_cos)."""
    return max(a.layers, key=lambda r: (r["intruders"], -r["min_best_cos"]))["layer"]


_STYLES = ("-", "--", ":", "-.")  # one per model, so a model drawn over another stays visible


def _figures(analyses: dict[str, Analysis]) -> _Figures:
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    figs = _Figures()
    names = list(analyses)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    first = analyses[names[0]]
    layers = [r["layer"] for r in first.layers]

    # spectra: ΔW normalized, and W vs W0 on one layer
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (nm, a) in enumerate(analyses.items()):
        c = colors[i % len(colors)]
        for j, (_, sp) in enumerate(a.spectra.items()):
            s = sp["dW"].double()
            if s.numel() and s[0] > 0:
                ax1.semilogy(range(1, len(s) + 1), (s / s[0]).clamp_min(1e-8).numpy(), color=c, alpha=0.5,
                             lw=0.8, ls=_STYLES[i % len(_STYLES)], label=nm if j == 0 else None)
    ax1.set_xlabel("index i")
    ax1.set_ylabel("σ_i(ΔW) / σ_1(ΔW)")
    ax1.set_title("spectra of the updates (one line per layer)", fontsize=9)
    ax1.legend(fontsize=7)
    focus = _focus_layer(first)
    ax2.semilogy(first.spectra[focus]["W0"].numpy(), color="black", lw=1.5, label="W0")
    for i, (nm, a) in enumerate(analyses.items()):
        if focus in a.spectra:
            ax2.semilogy(a.spectra[focus]["W"].numpy(), color=colors[i % len(colors)], lw=0.9, ls="--",
                         label=f"W ({nm})")
    ax2.set_xlabel("index i")
    ax2.set_ylabel("σ_i")
    ax2.set_title(f"W0 and W: {_short_names([focus] + layers)[0]}", fontsize=9)
    ax2.legend(fontsize=7)
    figs.add("spectra.png", fig, "singular value spectra")

    # effective rank of ΔW per layer
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for i, (nm, a) in enumerate(analyses.items()):
        ys = [a.row(n)["dW_erank"] if any(r["layer"] == n for r in a.layers) else float("nan") for n in layers]
        ax.plot(range(len(layers)), ys, marker="os^D"[i % 4], ms=3, lw=1, ls=_STYLES[i % len(_STYLES)],
                color=colors[i % len(colors)], label=nm)
    ax.set_yscale("log")
    ax.set_ylabel("effective rank of ΔW")
    _layer_axis(ax, layers)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figs.add("effective_rank.png", fig, "per-layer effective rank of the update")

    # intruder dimensions per layer
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / len(names)
    for i, (nm, a) in enumerate(analyses.items()):
        by = {r["layer"]: r["intruders"] for r in a.layers}
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(layers))]
        ax.bar(xs, [by.get(n, 0) for n in layers], width=width, color=colors[i % len(colors)],
               label=f"{nm} (total {sum(by.values())})")
    st = first.settings
    ax.set_ylabel(f"intruders in top {st['k']} (ε={st['eps']})")
    _layer_axis(ax, layers)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    figs.add("intruders.png", fig, "intruder dimensions per layer")

    # similarity heatmaps |U_W^T U_W0| on each analysis's focus layer
    shown = names[:6]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.3 * len(shown) + 0.8, 3.4), squeeze=False,
                             constrained_layout=True)
    for ax, nm in zip(axes[0], shown):
        a = analyses[nm]
        f = _focus_layer(a)
        im = ax.imshow(a.similarity[f].numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{nm}: {_short_names([f] + layers)[0]}", fontsize=8)
        ax.set_xlabel("singular vector of W0", fontsize=7)
        ax.set_ylabel("singular vector of W", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="|cos|")
    figs.add("similarity.png", fig, f"|cos| between the top {first.similarity[focus].shape[0]} left singular "
             "vectors of W and of W0, on the layer with the most intruders")

    if len(names) > 1:
        cross = cross_similarity(analyses)
        pairs = [p for p in cross if cross[p]]
        if pairs:
            mat = torch.full((len(pairs), len(layers)), float("nan"))
            for i, p in enumerate(pairs):
                for j, n in enumerate(layers):
                    if n in cross[p]:
                        mat[i, j] = cross[p][n]
            fig, ax = plt.subplots(figsize=(10, 0.9 + 0.35 * len(pairs) + 1.2), constrained_layout=True)
            im = ax.imshow(mat.numpy(), vmin=0, vmax=1, cmap="magma", aspect="auto")
            ax.set_yticks(range(len(pairs)))
            ax.set_yticklabels([f"{a} vs {b}" for a, b in pairs], fontsize=7)
            _layer_axis(ax, layers)
            ax.set_title("subspace similarity φ of the updates' top right singular vectors (LoRA paper §7.2)",
                         fontsize=9)
            fig.colorbar(im, ax=ax, shrink=0.8)
            figs.add("subspace_similarity.png", fig, "subspace similarity between updates")

    if any(a.representations for a in analyses.values()):
        fig, ax = plt.subplots(figsize=(10, 3.4))
        for i, (nm, a) in enumerate(analyses.items()):
            if a.representations:
                cka = a.representations["cka"]
                ax.plot(range(len(layers)), [cka.get(n, float("nan")) for n in layers], marker="o", ms=3, lw=1,
                        color=colors[i % len(colors)], label=nm)
        ax.set_ylabel("linear CKA, base vs adapted")
        ax.set_ylim(top=1.02)
        _layer_axis(ax, layers)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figs.add("cka.png", fig, "per-layer CKA between base and adapted activations")
    return figs


#: What each summary measure is (the report's glossary; layer columns are in ``analyzer.COLUMNS``).
SUMMARY_COLUMNS = {
    "model": "the analysed model: its folder (with the folder above it where needed to tell two apart)",
    "method": "how it was fine-tuned: the adapter method ('(PEFT)': read from a PEFT adapter folder), or "
              "'full' for a fully fine-tuned model",
    "layers": "number of weight matrices analysed",
    "relative weight change": "(Σ‖ΔW‖_F²)^½ / (Σ‖W0‖_F²)^½ over the analysed layers",
    "mean ‖ΔW‖/‖W0‖": "mean over layers of rel_change",
    "median rank ΔW": "median over layers of dW_rank",
    "mean eff. rank ΔW": "mean over layers of dW_erank",
    "intruders (total)": "sum over layers of intruders",
    "layers with intruders": "number of layers with at least one intruder dimension",
    "mean amplification": "mean over layers of amplification",
    "mean alignment": "mean over layers of alignment",
    "mean CKA": "mean over layers of cka",
    "embedding CKA": "linear CKA of the pooled embeddings (masked mean of the last hidden state), base vs "
                     "fine-tuned; 1: the same up to rotation and scale",
    "RankMe base": "RankMe of the base model's pooled embeddings: exp of the entropy of their normalized "
                   "singular values, an effective dimension (Garrido et al. 2023)",
    "RankMe adapted": "RankMe of the fine-tuned model's pooled embeddings",
    "NTK alignment base/adapted": "centered kernel alignment between the base and the fine-tuned model's "
                                  "empirical tangent kernels on a batch; near 1: the kernel did not move (lazy)",
    "NTK-label alignment base": "centered alignment of the base model's tangent kernel with the label kernel YYᵀ",
    "NTK-label alignment adapted": "centered alignment of the fine-tuned model's tangent kernel with YYᵀ; "
                                   "above the base's: features learned for the task",
    "seconds": "time the analysis of this model took",
}


def _summary_rows(analyses: dict[str, Analysis], methods: dict[str, str] | None = None
                  ) -> tuple[list[str], list[list]]:
    """The summary with one column per model and one row per measure (so many measures and a few
    models fit the page): the first row is each model's method when ``methods`` is given."""
    keys: list[str] = []
    for a in analyses.values():
        keys += [k for k in a.summary if k not in keys]
    headers = ["measure"] + list(analyses)
    rows = [["method"] + [methods.get(nm, "-") for nm in analyses]] if methods else []
    rows += [[k] + [a.summary.get(k, float("nan")) for a in analyses.values()] for k in keys]
    rows.append(["seconds"] + [round(a.seconds.get("total", 0.0), 2) for a in analyses.values()])
    return headers, rows


def _layer_rows(a: Analysis) -> tuple[list[str], list[list]]:
    cols = [c for c in TABLE_COLUMNS if any(c in r for r in a.layers)]
    return cols, [[r.get(c, float("nan")) for c in cols] for r in a.layers]


def _html_table(headers, rows, cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        f"<td class='{'num' if isinstance(v, (int, float)) and not isinstance(v, bool) else ''}'>"
        f"{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# every table fits the body (1100 px, inside a 1280 px window): headers wrap, long layer names break at dots
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}
table{border-collapse:collapse;font-size:12px;margin:0.6em 0;max-width:100%}
th,td{border:1px solid #ccc;padding:2px 5px}th{background:#f3f3f3;font-weight:600;overflow-wrap:anywhere}
td.num{text-align:right;white-space:nowrap}td{overflow-wrap:anywhere}
table.summary td:first-child{white-space:nowrap}
img{max-width:100%;border:1px solid #eee;margin:0.4em 0}code{background:#f6f6f6;padding:0 3px}
details{margin:0.5em 0}summary{cursor:pointer;font-weight:600}.note{color:#555;font-size:13px}
"""


def _legend(analyses: dict[str, Analysis], methods) -> list[tuple[str, str]]:
    """A glossary entry for every row of the summary and every column of the layer tables."""
    _, rows = _summary_rows(analyses, methods)
    out = [(r[0], SUMMARY_COLUMNS.get(r[0], "")) for r in rows]
    cols: list[str] = []
    for a in analyses.values():
        cols += [c for c in _layer_rows(a)[0] if c not in cols]
    return out + [(c, COLUMNS.get(c, "")) for c in cols]


def _tangent_note(a: Analysis) -> str:
    n = (a.representations or {}).get("ntk_examples")
    return f"Tangent kernels on {n} examples." if n else ""


def write_report(analyses, out, title: str = "rankwise analysis", notes: str = "",
                 methods: dict[str, str] | None = None) -> Path:
    """Write ``report.html``, ``report.md`` and the PNG plots into ``out``; return the HTML path.

    ``analyses``: one :class:`Analysis` or a dict ``{name: Analysis}`` (several fine-tunes of one base
    are compared in every plot, plus the subspace similarity of their updates). ``methods``: the
    method of each name (``"lora"``, ``"full"`` …), shown as the summary's first row. The summary has
    a column per model and a row per measure; a glossary explains every row and layer column.
    """
    if isinstance(analyses, Analysis):
        analyses = {analyses.name: analyses}
    if not analyses:
        raise ValueError("write_report: no analyses to report.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs = _figures(analyses)
    for fname, data in figs.png.items():
        with atomic_path(out / fname) as tmp:
            tmp.write_bytes(data)

    first = next(iter(analyses.values()))
    st = first.settings
    setting = (f"Intruder dimensions: top k={st['k']} left singular vectors of W whose best |cos| to every left "
               f"singular vector of W0 is below ε={st['eps']}. Amplification/alignment at r={st['r']}. "
               f"SVD of ΔW: {st['method']}. Comparison: {st['mode']}.")
    sh, sr = _summary_rows(analyses, methods)
    legend = _legend(analyses, methods)

    md = [f"# {title}", "", setting, ""]
    if notes:
        md += [notes, ""]
    md += ["## Summary", "", format_table(sr, sh, markdown=True), ""]
    for fname, alt in figs.alt.items():
        md += [f"![{alt}]({fname})", ""]
    md += ["## Glossary", ""] + [f"- `{k}`: {v}" for k, v in legend] + [""]
    for nm, a in analyses.items():
        h, rows = _layer_rows(a)
        label = f"{nm} ({methods[nm]})" if methods and nm in methods else nm
        md += [f"## Layers: {label}", "", format_table(rows, h, markdown=True), ""]
        if _tangent_note(a):
            md += [_tangent_note(a), ""]
    write_text(out / "report.md", "\n".join(md))

    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             f"<p class='note'>{html.escape(setting)}</p>"]
    if notes:
        parts.append(f"<p class='note'>{html.escape(notes)}</p>")
    parts += ["<h2>Summary</h2>", _html_table(sh, sr, "summary")]
    for fname, data in figs.png.items():
        b64 = base64.b64encode(data).decode("ascii")
        parts.append(f"<figure><img src='data:image/png;base64,{b64}' alt='{html.escape(figs.alt[fname])}'>"
                     f"<figcaption class='note'>{html.escape(figs.alt[fname])}</figcaption></figure>")
    parts.append("<h2 id='glossary'>Glossary</h2><ul>" + "".join(
        f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in legend) + "</ul>")
    for nm, a in analyses.items():
        h, rows = _layer_rows(a)
        label = f"{nm} ({methods[nm]})" if methods and nm in methods else nm
        parts.append(f"<details open><summary>Layers: {html.escape(label)}</summary>{_html_table(h, rows, 'layers')}")
        if _tangent_note(a):
            parts.append(f"<p class='note'>{html.escape(_tangent_note(a))}</p>")
        parts.append("</details>")
    parts.append("</body></html>\n")
    write_text(out / "report.html", "\n".join(parts))
    return out / "report.html"
