"""Small self-contained HTML charts (no plotting library): a similarity heatmap and a bar chart.

Plain inline-styled HTML renders the same in gradio 3.41 and 4.40 `gr.HTML`.
"""
from __future__ import annotations

import html
import math
from typing import Sequence


def _cell_colour(value: float, low: float, high: float) -> str:
    """White (least similar of the set) to deep blue (most similar)."""
    x = 0.0 if high <= low else (value - low) / (high - low)
    r, g, b = (int(255 - x * (255 - c)) for c in (33, 102, 172))
    return f"rgb({r},{g},{b})"


def heatmap(names: Sequence[str], matrix: Sequence[Sequence[float]]) -> str:
    """Pairwise cosine similarity as a coloured table; each cell also shows the angle in degrees.

    Colours are scaled to the off-diagonal range, since fine-tunes of one base all sit near 1.
    """
    n = len(names)
    off = [matrix[i][j] for i in range(n) for j in range(n) if i != j] or [1.0]
    low, high = min(off), max(off)
    esc = [html.escape(s) for s in names]
    head = "".join(f"<th style='padding:4px 8px'>{s}</th>" for s in esc)
    rows = []
    for i in range(n):
        cells = []
        for j in range(n):
            v = float(matrix[i][j])
            angle = math.degrees(math.acos(max(-1.0, min(1.0, v))))
            colour = "#eee" if i == j else _cell_colour(v, low, high)
            ink = "#fff" if i != j and high > low and (v - low) / (high - low) > 0.6 else "#111"
            cells.append(f"<td title='{esc[i]} vs {esc[j]}' style='background:{colour};color:{ink};"
                         f"padding:4px 8px;text-align:right;font-family:monospace'>{v:.6f}<br>"
                         f"<small style='color:inherit'>{angle:.3f}°</small></td>")
        rows.append(f"<tr><th style='padding:4px 8px;text-align:left'>{esc[i]}</th>{''.join(cells)}</tr>")
    return ("<div class='manifold-heatmap'><table style='border-collapse:collapse'>"
            f"<tr><th></th>{head}</tr>{''.join(rows)}</table>"
            "<p><small>cosine similarity of the whole models (angle between them). "
            "The larger the angles, the more SLERP and the Karcher mean differ from a plain average.</small></p>"
            "</div>")


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str) -> str:
    """Horizontal bars, one per label, scaled to the largest value."""
    top = max([float(v) for v in values] + [1e-12])
    bars = []
    for label, value in zip(labels, values):
        width = 100.0 * float(value) / top
        bars.append("<div style='display:flex;align-items:center;gap:8px;margin:2px 0'>"
                    f"<span style='width:14em;overflow:hidden;text-overflow:ellipsis'>{html.escape(label)}</span>"
                    f"<span style='flex:1'><span style='display:block;height:14px;width:{width:.1f}%;"
                    "background:#2166ac'></span></span>"
                    f"<span style='width:6em;font-family:monospace;text-align:right'>{float(value):.4f}</span></div>")
    return f"<div class='manifold-bars'><b>{html.escape(title)}</b>{''.join(bars)}</div>"


def block_table(names: Sequence[str], blocks: dict) -> str:
    """Per-block similarity: one row per block, one column per pair of models (cosine, coloured, with the
    angle); the least similar block of each pair is the deepest colour."""
    n = len(names)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if not blocks or not pairs:
        return ""
    esc = [html.escape(s) for s in names]
    head = "".join(f"<th style='padding:4px 8px'>{esc[i]} · {esc[j]}</th>" for i, j in pairs)
    columns = {p: [float(m[p[0]][p[1]]) for m in blocks.values()] for p in pairs}
    rows = []
    for row, (block, matrix) in enumerate(blocks.items()):
        cells = []
        for pair in pairs:
            v = float(matrix[pair[0]][pair[1]])
            low, high = min(columns[pair]), max(columns[pair])
            colour = _cell_colour(high + low - v, low, high)  # less similar = deeper
            angle = math.degrees(math.acos(max(-1.0, min(1.0, v))))
            cells.append(f"<td title='{html.escape(block)}' style='background:{colour};padding:2px 8px;"
                         f"text-align:right;font-family:monospace'>{v:.6f} <small>{angle:.2f}°</small></td>")
        rows.append(f"<tr><th style='padding:2px 8px;text-align:left'>{html.escape(block)}</th>{''.join(cells)}</tr>")
    return ("<div class='manifold-merge-block-similarity' style='overflow-x:auto;margin-top:12px'>"
            "<div style='font-weight:600'>Per block (where the models differ)</div>"
            f"<table style='border-collapse:collapse'><tr><th></th>{head}</tr>{''.join(rows)}</table></div>")
