"""Plain-text and Markdown tables."""

from __future__ import annotations


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def format_table(rows, headers, markdown: bool = False) -> str:
    cells = [[_fmt(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    num = [all(isinstance(r[i], (int, float)) for r in rows) and bool(rows) for i in range(len(headers))]

    def line(vals):
        parts = [v.rjust(w) if n else v.ljust(w) for v, w, n in zip(vals, widths, num)]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    sep = ("|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, num)) + "|"
           if markdown else "  ".join("-" * w for w in widths))
    return "\n".join([line(headers), sep] + [line(r) for r in cells])
