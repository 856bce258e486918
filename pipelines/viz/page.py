"""Building blocks of a self-contained HTML page: escaping, tables, inline SVG charts, PNG data URIs, CSS.

Everything returned is an HTML fragment; arguments named ``cells`` are already HTML, every other text
argument is escaped here.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

GALLERY_THUMB_PX = 144
BAR_COLOUR = "#3b7dd8"
HISTOGRAM_COLOUR = "#2f9e77"
CHART_WIDTH_PX = 760
MAX_TICK_LABELS = 11  # x-axis labels of a histogram, at most (more would overlap)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;
  color:#1d2430;background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#b9c2d0;word-break:break-all}
nav{margin-top:10px}nav a{color:#9cc4ff;margin-right:14px;text-decoration:none}
main{max-width:1180px;margin:0 auto;padding:8px 32px 40px}
section{background:#fff;border:1px solid #e1e5eb;border-radius:8px;padding:14px 20px;margin:18px 0}
h2{font-size:18px;margin:4px 0 12px}h3{font-size:15px;margin:14px 0 6px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #e1e5eb;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px}.card span{color:#5b6574;font-size:12px}
table{border-collapse:collapse;margin:6px 0}
td,th{border-bottom:1px solid #e9ecf1;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f1f3f6;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.uri{word-break:break-all}.muted{color:#6b7482}
.na{color:#8a6d00;background:#fff8db;padding:8px 12px;border-radius:6px}
.warn{color:#7a1f1f;background:#fde8e8;padding:8px 12px;border-radius:6px}
details{margin:8px 0}summary{cursor:pointer;color:#3b5b8a}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.gallery figure{margin:0;width:THUMBpx;overflow:hidden}
.gallery img{display:block;border:1px solid #d5dae1;border-radius:4px;max-width:THUMBpx;max-height:THUMBpx}
.gallery figcaption{font-size:11px;color:#4d5663;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
svg text{font-family:inherit}
""".replace("THUMB", str(GALLERY_THUMB_PX))


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt_int(value: int) -> str:
    return f"{value:,}"


def fmt_float(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def table(headers: Sequence[str], cells: Sequence[Sequence[str]], numeric: Sequence[bool] | None = None) -> str:
    """A table of HTML ``cells`` (rows); ``numeric[j]`` right-aligns column j. No header row if all are ''."""
    numeric = numeric or [False] * len(headers)

    def cell(tag: str, content: str, is_number: bool) -> str:
        return f'<{tag} class="num">{content}</{tag}>' if is_number else f"<{tag}>{content}</{tag}>"

    head = "".join(cell("th", esc(h), n) for h, n in zip(headers, numeric, strict=True))
    body = "".join(
        "<tr>" + "".join(cell("td", c, n) for c, n in zip(row, numeric, strict=True)) + "</tr>" for row in cells
    )
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _svg(width: float, height: float, parts: Sequence[str]) -> str:
    svg = f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
    return svg + "".join(parts) + "</svg>"


def hbar_chart(items: Sequence[tuple[str, int]], width: int = CHART_WIDTH_PX, bar_px: int = 18) -> str:
    """Horizontal bars, one per ``(name, count)``: name on the left, count after the bar. Hover: exact value."""
    name_w, count_w, gap = 220, 80, 4
    plot_w = width - name_w - count_w
    top = max((count for _, count in items), default=0) or 1
    parts = []
    for i, (name, count) in enumerate(items):
        y = i * (bar_px + gap)
        baseline = y + bar_px - 5
        length = max(1.0, plot_w * count / top) if count else 0.0
        shown = name if len(name) <= 32 else name[:31] + "…"
        parts.append(
            f'<text x="{name_w - 8}" y="{baseline}" text-anchor="end" font-size="12">{esc(shown)}</text>'
            f'<rect x="{name_w}" y="{y}" width="{length:.1f}" height="{bar_px}" fill="{BAR_COLOUR}" rx="2">'
            f"<title>{esc(name)}: {count}</title></rect>"
            f'<text x="{name_w + length + 6:.1f}" y="{baseline}" font-size="12" fill="#444">{fmt_int(count)}</text>'
        )
    return _svg(width, max(1, len(items)) * (bar_px + gap), parts)


def histogram_svg(counts: np.ndarray, edge_labels: Sequence[str], x_title: str, width: int = CHART_WIDTH_PX,
                  height: int = 220) -> str:
    """Vertical bars of ``counts`` (one per bin), ``edge_labels`` naming the len(counts) + 1 bin edges."""
    left, right, top, bottom = 56, 12, 10, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    axis_y = top + plot_h
    peak = int(counts.max()) if len(counts) and counts.max() > 0 else 1
    step = plot_w / max(1, len(counts))
    small = 'font-size="11" fill="#555"'
    parts = [
        f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" stroke="#888"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{axis_y}" stroke="#888"/>',
        f'<text x="{left - 6}" y="{top + 10}" text-anchor="end" {small}>{fmt_int(peak)}</text>',
        f'<text x="{left - 6}" y="{axis_y}" text-anchor="end" {small}>0</text>',
        f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle" font-size="12" fill="#333">'
        f"{esc(x_title)}</text>",
    ]
    for i, count in enumerate(counts):
        bar_h = plot_h * int(count) / peak
        parts.append(
            f'<rect x="{left + i * step + 1:.1f}" y="{axis_y - bar_h:.1f}" width="{max(step - 2, 1):.1f}" '
            f'height="{bar_h:.1f}" fill="{HISTOGRAM_COLOUR}">'
            f"<title>{esc(edge_labels[i])}–{esc(edge_labels[i + 1])}: {int(count)}</title></rect>"
        )
    every = max(1, math.ceil(len(edge_labels) / MAX_TICK_LABELS))
    for i in range(0, len(edge_labels), every):
        parts.append(f'<text x="{left + i * step:.1f}" y="{axis_y + 16}" text-anchor="middle" {small}>'
                     f"{esc(edge_labels[i])}</text>")
    return _svg(width, height, parts)
