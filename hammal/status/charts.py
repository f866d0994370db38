"""
Small charts as inline SVG, drawn by hammal: no script, no external asset.

Each chart is a self-contained ``<svg>`` with a ``viewBox`` (it scales to
its container), a ``<title>`` for screen readers, and ``data-*``
attributes naming what it shows, so that tests and scripts can read it.
"""

from __future__ import annotations

from html import escape
from typing import Callable, Sequence

import attrs

Formatter = Callable[[float], str]

_WIDTH = 600
_LEFT = 100
_RIGHT = 8
_TOP = 10
_BOTTOM = 20


@attrs.frozen
class Line:
    """One series of a line chart."""

    key: str
    label: str
    values: Sequence[float]
    color: str


def format_bytes(value: float) -> str:
    """C{1536} → C{"1.5 KiB"}."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_count(value: float) -> str:
    """C{12345} → C{"12.3k"}."""
    if abs(value) >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if abs(value) >= 10_000:
        return f"{value / 1000:.1f}k"
    return f"{value:g}" if value == int(value) else f"{value:.1f}"


def _attribute(value: str) -> str:
    return escape(value, quote=True)


def _corners(values: Sequence[float]) -> list[tuple[int, float]]:
    """
    The points of a line that are not inside a flat run: the same line with
    far fewer points when traffic is idle (a day has 1440 minutes).
    """
    last = len(values) - 1
    return [
        (i, v)
        for i, v in enumerate(values)
        if i in (0, last) or not (values[i - 1] == v == values[i + 1])
    ]


def _frame(
    chart_id: str,
    title: str,
    points: int,
    height: int,
    peak: float,
    formatter: Formatter,
    start_label: str,
) -> list[str]:
    """The opening of a time chart: its title, grid, value and time labels."""
    plot_h = height - _TOP - _BOTTOM
    bottom = _TOP + plot_h
    parts = [
        f'<svg class="chart" id="{_attribute(chart_id)}" data-chart="{_attribute(chart_id)}"'
        f' data-points="{points}" viewBox="0 0 {_WIDTH} {height}" role="img"'
        f' aria-labelledby="{_attribute(chart_id)}-title" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{_attribute(chart_id)}-title">{escape(title)}</title>',
    ]
    for fraction in (0.0, 0.5, 1.0):
        gy = bottom - plot_h * fraction
        parts.append(
            f'<line x1="{_LEFT}" y1="{gy:.1f}" x2="{_WIDTH - _RIGHT}" y2="{gy:.1f}" class="grid"/>'
        )
        parts.append(
            f'<text x="{_LEFT - 6}" y="{gy + 4:.1f}" text-anchor="end" class="axis">'
            f"{escape(formatter(peak * fraction))}</text>"
        )
    parts.append(
        f'<text x="{_LEFT}" y="{height - 5}" class="axis">{escape(start_label)}</text>'
        f'<text x="{_WIDTH - _RIGHT}" y="{height - 5}" text-anchor="end" class="axis">now</text>'
    )
    return parts


def format_percent(value: float) -> str:
    """C{0.5} → C{"50 %"}."""
    return f"{value * 100:.0f} %"


def ratio_chart(
    chart_id: str,
    title: str,
    part: Sequence[float],
    whole: Sequence[float],
    color: str,
    start_label: str,
    height: int = 170,
) -> str:
    """
    C{part / whole} per point, from 0 to 100 %; points where C{whole} is 0
    have no ratio and leave a gap (a lone point is drawn as a dot).
    """
    points = len(whole)
    plot_w = _WIDTH - _LEFT - _RIGHT
    plot_h = height - _TOP - _BOTTOM
    bottom = _TOP + plot_h

    def x(i: int) -> float:
        return _LEFT + (plot_w * i / (points - 1) if points > 1 else plot_w)

    parts = _frame(chart_id, title, points, height, 1.0, format_percent, start_label)
    runs: list[list[tuple[int, float]]] = []
    for i, (p, w) in enumerate(zip(part, whole)):
        if not w:
            continue
        if runs and runs[-1][-1][0] == i - 1:
            runs[-1].append((i, p / w))
        else:
            runs.append([(i, p / w)])
    defined = sum(len(run) for run in runs)
    total = sum(part) / sum(whole) if sum(whole) else 0.0
    parts.append(
        f'<g data-series="ratio" data-defined="{defined}" data-ratio="{total:.4f}"'
        f' fill="{_attribute(color)}" stroke="{_attribute(color)}">'
        f"<title>{escape(format_percent(total))} over the whole chart</title>"
    )
    for run in runs:
        if len(run) == 1:
            i, r = run[0]
            parts.append(f'<circle cx="{x(i):.1f}" cy="{bottom - plot_h * r:.1f}" r="2.5"/>')
            continue
        kept = [run[k] for k, _ in _corners([r for _, r in run])]
        coordinates = " ".join(f"{x(i):.1f},{bottom - plot_h * r:.1f}" for i, r in kept)
        parts.append(
            f'<polyline points="{coordinates}" fill="none" stroke-width="1.6"'
            ' vector-effect="non-scaling-stroke"/>'
        )
    parts.append("</g></svg>")
    return "".join(parts)


def line_chart(
    chart_id: str,
    title: str,
    lines: Sequence[Line],
    start_label: str,
    formatter: Formatter = format_count,
    height: int = 170,
) -> str:
    """
    A line chart of C{lines} (all the same length, oldest value first), the
    first one drawn as a filled area.
    """
    points = max((len(line.values) for line in lines), default=0)
    peak = max((max(line.values, default=0.0) for line in lines), default=0.0)
    scale = peak if peak > 0 else 1.0
    plot_w = _WIDTH - _LEFT - _RIGHT
    plot_h = height - _TOP - _BOTTOM
    bottom = _TOP + plot_h

    def x(i: int) -> float:
        return _LEFT + (plot_w * i / (points - 1) if points > 1 else plot_w)

    def y(value: float) -> float:
        return bottom - plot_h * value / scale

    parts = _frame(chart_id, title, points, height, peak, formatter, start_label)
    for index, line in enumerate(lines):
        coordinates = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in _corners(line.values))
        total = sum(line.values)
        if index == 0 and points:
            area = f"{x(0):.1f},{bottom:.1f} {coordinates} {x(points - 1):.1f},{bottom:.1f}"
            parts.append(
                f'<polygon points="{area}" fill="{_attribute(line.color)}" fill-opacity="0.18"/>'
            )
        parts.append(
            f'<polyline data-series="{_attribute(line.key)}" data-sum="{total:g}"'
            f' points="{coordinates}" fill="none" stroke="{_attribute(line.color)}"'
            f' stroke-width="1.6" vector-effect="non-scaling-stroke">'
            f"<title>{escape(line.label)}: {escape(formatter(total))} in all</title></polyline>"
        )
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(
    chart_id: str,
    title: str,
    rows: Sequence[tuple[str, float]],
    color: str,
    formatter: Formatter = format_count,
) -> str:
    """Horizontal bars, one per C{(label, value)} row, labels inside the chart."""
    row_h = 24
    height = max(row_h * len(rows), row_h) + 4
    label_w = 250
    value_w = 110
    bar_w = _WIDTH - label_w - value_w - _RIGHT
    peak = max((value for _, value in rows), default=0.0) or 1.0
    parts = [
        f'<svg class="chart bars" id="{_attribute(chart_id)}" data-chart="{_attribute(chart_id)}"'
        f' data-rows="{len(rows)}" viewBox="0 0 {_WIDTH} {height}" role="img"'
        f' aria-labelledby="{_attribute(chart_id)}-title" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{_attribute(chart_id)}-title">{escape(title)}</title>',
    ]
    if not rows:
        parts.append(f'<text x="4" y="{row_h - 8}" class="axis">nothing yet</text>')
    for i, (label, value) in enumerate(rows):
        top = 2 + i * row_h
        shown = label if len(label) <= 38 else "…" + label[-37:]
        width = max(bar_w * value / peak, 1.0)
        parts.append(
            f'<g data-label="{_attribute(label)}" data-value="{value:g}">'
            f"<title>{escape(label)}: {escape(formatter(value))}</title>"
            f'<text x="{label_w - 6}" y="{top + 16}" text-anchor="end" class="label">'
            f"{escape(shown)}</text>"
            f'<rect x="{label_w}" y="{top + 3}" width="{width:.1f}" height="{row_h - 6}"'
            f' fill="{_attribute(color)}" rx="2"/>'
            f'<text x="{label_w + width + 4:.1f}" y="{top + 16}" class="axis">'
            f"{escape(formatter(value))}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)
