"""Small self-contained SVG charts for the HTML reports (no plotting dependency to install)."""

from __future__ import annotations

import html

PALETTE = ("#4a7bd0", "#d0704a", "#4aa36b", "#9a5bc4", "#c4a43a", "#3ab0c4", "#c44a7b", "#7b7b7b")


def bar_chart(title: str, labels: list[str], values: list[float], unit: str = "", width: int = 420) -> str:
    """Horizontal bars, one per label, with the value written at the end of each bar."""
    row, left = 22, 130
    peak = max((v for v in values if v is not None), default=1.0) or 1.0
    bars = []
    for index, (label, value) in enumerate(zip(labels, values)):
        y = 28 + index * row
        length = 0 if value is None else (width - left - 90) * value / peak
        text = "n/a" if value is None else f"{value:,.4g}{unit}"
        bars.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{html.escape(label)}</text>'
                    f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{row - 6}" '
                    f'fill="{PALETTE[index % len(PALETTE)]}"/>'
                    f'<text x="{left + length + 4:.1f}" y="{y + 14}">{text}</text>')
    height = 36 + row * len(labels)
    return (f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="12" '
            f'font-family="sans-serif"><text x="4" y="16" font-weight="bold">{html.escape(title)}</text>'
            + "".join(bars) + "</svg>")


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], x_label: str = "step",
               width: int = 640, height: int = 320) -> str:
    """Several (x, y) curves on shared axes, with a legend."""
    points = [p for curve in series.values() for p in curve]
    if not points:
        return f"<p>{html.escape(title)}: no data</p>"
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 50, 150, 24, 30

    def place(x: float, y: float) -> str:
        px = left + (width - left - right) * (x - x0) / (x1 - x0)
        py = top + (height - top - bottom) * (1 - (y - y0) / (y1 - y0))
        return f"{px:.1f},{py:.1f}"

    lines, legend = [], []
    for index, (name, curve) in enumerate(series.items()):
        colour = PALETTE[index % len(PALETTE)]
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" '
                     f'points="{" ".join(place(x, y) for x, y in curve)}"/>')
        legend.append(f'<rect x="{width - right + 10}" y="{top + index * 18}" width="12" height="12" '
                      f'fill="{colour}"/><text x="{width - right + 26}" y="{top + index * 18 + 11}">'
                      f"{html.escape(name)}</text>")
    axes = (f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#888"/>'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#888"/>'
            f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{y1:.3g}</text>'
            f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">{y0:.3g}</text>'
            f'<text x="{left}" y="{height - 12}">{x0:g}</text>'
            f'<text x="{width - right}" y="{height - 12}" text-anchor="end">{x1:g} {html.escape(x_label)}</text>')
    return (f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="12" '
            f'font-family="sans-serif"><text x="{left}" y="14" font-weight="bold">{html.escape(title)}</text>'
            + axes + "".join(lines) + "".join(legend) + "</svg>")
