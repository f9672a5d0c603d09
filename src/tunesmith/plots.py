"""Small self-contained SVG charts for the HTML reports (no plotting dependency to install)."""

from __future__ import annotations

import html
import math

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


def scatter_chart(title: str, series: dict[str, list[tuple[float, float, str]]], x_label: str, y_label: str,
                  log_x: bool = False, x_labels: list[str] | None = None, width: int = 480, height: int = 300) -> str:
    """Points (x, y, tooltip) of several series on shared axes, with a legend: the first series as filled dots,
    the others as hollow rings of their own colours. ``log_x``: a log-scale x axis (every x above 0), with a
    tick at each power of ten. ``x_labels``: a categorical x axis, where x is an index into ``x_labels``.

    >>> svg = scatter_chart("loss vs lr", {"complete": [(1e-3, 2.0, "trial 0"), (1e-2, 1.5, "trial 2")],
    ...                                    "pruned": [(1e-5, 3.0, "trial 1")]}, "lr", "loss", log_x=True)
    >>> svg.count("<circle"), svg.count('fill="none"'), [t for t in (">1e-05<", ">0.0001<", ">0.001<") if t in svg]
    (5, 2, ['>1e-05<', '>0.0001<', '>0.001<'])
    """
    points = [p for curve in series.values() for p in curve]
    if not points:
        return f"<p>{html.escape(title)}: no data</p>"
    left, right, top, bottom = 56, 170, 40, 34
    place_x = _axis([p[0] for p in points], left, width - right, log_x, x_labels)
    place_y = _axis([p[1] for p in points], height - bottom, top)
    marks, legend = [], []
    for index, (name, curve) in enumerate(series.items()):
        colour = PALETTE[index % len(PALETTE)]
        paint = f'fill="{colour}"' if index == 0 else f'fill="none" stroke="{colour}" stroke-width="1.5"'
        marks += [f'<circle cx="{place_x(x):.1f}" cy="{place_y(y):.1f}" r="4" {paint}><title>{html.escape(note)}'
                  f"</title></circle>" for x, y, note in curve]
        legend.append(f'<circle cx="{width - right + 16}" cy="{top + index * 18 + 6}" r="4" {paint}/>'
                      f'<text x="{width - right + 26}" y="{top + index * 18 + 10}">{html.escape(name)}</text>')
    ticks = _x_ticks([p[0] for p in points], log_x, x_labels)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    axes = (f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#888"/>'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#888"/>'
            f'<text x="{left - 4}" y="{place_y(y1) + 4:.1f}" text-anchor="end">{y1:.4g}</text>'
            f'<text x="{left - 4}" y="{place_y(y0) + 4:.1f}" text-anchor="end">{y0:.4g}</text>'
            + "".join(f'<text x="{place_x(x):.1f}" y="{height - bottom + 14}" text-anchor="middle">'
                      f"{html.escape(text)}</text>" for x, text in ticks)
            + f'<text x="{(left + width - right) / 2:.0f}" y="{height - 4}" text-anchor="middle">'
              f"{html.escape(x_label)}{' (log scale)' if log_x else ''}</text>")
    return (f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="12" '
            f'font-family="sans-serif"><text x="{left}" y="14" font-weight="bold">{html.escape(title)}</text>'
            f'<text x="4" y="{top - 8}">{html.escape(y_label)}</text>' + axes + "".join(marks) + "".join(legend)
            + "</svg>")


def _axis(values: list[float], start: float, end: float, log: bool = False, labels: list[str] | None = None):
    """The pixel position of a value on an axis from ``start`` to ``end`` (either way round), with a margin of
    5% of the range on each side (a categorical axis: half a slot)."""
    if labels is not None:
        low, high = -0.5, len(labels) - 0.5
    else:
        scaled = [math.log10(v) if log else v for v in values]
        low, high = min(scaled), max(scaled)
        margin = (high - low) * 0.05 or 0.5
        low, high = low - margin, high + margin

    def place(value: float) -> float:
        scaled = math.log10(value) if log and labels is None else value
        return start + (end - start) * (scaled - low) / (high - low)
    return place


def _x_ticks(values: list[float], log: bool, labels: list[str] | None) -> list[tuple[float, str]]:
    """Where the x axis is labelled: each category; each power of ten in a log range (else its two ends); the
    two ends of a linear range."""
    if labels is not None:
        return [(float(index), label) for index, label in enumerate(labels)]
    low, high = min(values), max(values)
    if log:
        decades = [10.0 ** e for e in range(math.ceil(math.log10(low)), math.floor(math.log10(high)) + 1)]
        if decades:
            return [(d, f"{d:g}") for d in decades]
    return [(low, f"{low:.3g}")] + ([(high, f"{high:.3g}")] if high > low else [])
