"""Line and bar charts written as SVG text, with no plotting library.

A run's plot is a handful of lines, markers and labels. Drawing it as SVG takes a few
milliseconds, where importing matplotlib alone took a third of a second, a tenth of a short
simulation. Any browser, editor or notebook shows the files; they stay sharp at any zoom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Sequence

from common.files import write_text_atomic

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'


@dataclass
class Line:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]  # a NaN or infinite value is left out


@dataclass
class Bars:
    title: str
    labels: Sequence[str]
    values: Sequence[float]
    errors: Sequence[float]
    colour: str = PALETTE[0]


@dataclass
class _Frame:
    """A plot area in pixels and the data ranges it maps."""

    left: float
    top: float
    width: float
    height: float
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    parts: list[str] = field(default_factory=list)

    def x(self, value: float) -> float:
        low, high = self.x_range
        return self.left + (value - low) / ((high - low) or 1.0) * self.width

    def y(self, value: float) -> float:
        low, high = self.y_range
        return self.top + self.height - (value - low) / ((high - low) or 1.0) * self.height

    def text(self, x: float, y: float, content: str, size: int = 12, anchor: str = "middle", extra: str = "") -> None:
        self.parts.append(_text(x, y, content, size, anchor, extra))

    def y_axis(self, label: str) -> None:
        for tick in nice_ticks(*self.y_range):
            y = self.y(tick)
            self.parts.append(f'<line x1="{self.left:.1f}" y1="{y:.1f}" x2="{self.left + self.width:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
            self.text(self.left - 6, y + 4, _tick_label(tick), 11, "end")
        cx, cy = self.left - 44, self.top + self.height / 2
        self.text(cx, cy, label, 12, extra=f'transform="rotate(-90 {cx:.1f} {cy:.1f})"')
        self.parts.append(
            f'<rect x="{self.left:.1f}" y="{self.top:.1f}" width="{self.width:.1f}" height="{self.height:.1f}" fill="none" stroke="#333"/>'
        )


def _tick_step(low: float, high: float, target: int, whole: bool = False) -> float:
    """1, 2 or 5 times a power of ten, giving about ``target`` ticks over [low, high]
    (at least 1 when the values are ``whole`` numbers, such as rounds)."""
    raw = (high - low) / target
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    return max(step, 1.0) if whole else step


def _text(x: float, y: float, content: str, size: int = 12, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" {FONT} {extra}>{escape(content)}</text>'


def nice_ticks(low: float, high: float, target: int = 6, whole: bool = False) -> list[float]:
    """Round tick values inside [low, high]."""
    if not high > low:
        return [low]
    step = _tick_step(low, high, target, whole)
    first, last = math.ceil(low / step - 1e-6), math.floor(high / step + 1e-6)
    return [round(k * step, 10) for k in range(first, last + 1)]


def nice_range(low: float, high: float, target: int = 6) -> tuple[float, float]:
    """[low, high] widened outwards to round tick values."""
    if not high > low:
        return low, low + 1.0
    step = _tick_step(low, high, target)
    return round(math.floor(low / step + 1e-6) * step, 10), round(math.ceil(high / step - 1e-6) * step, 10)


def _tick_label(value: float) -> str:
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:g}"


def _svg(width: int, height: int, parts: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">\n'
        f'<rect width="{width}" height="{height}" fill="white"/>\n' + "\n".join(parts) + "\n</svg>\n"
    )


def write_line_chart(
    path: Path,
    lines: Sequence[Line],
    *,
    title: str,
    x_label: str,
    y_label: str,
    y_range: tuple[float, float],
    dotted_xs: Sequence[float] = (),
    markers: Sequence[float] = (),
    marker_label: str = "",
) -> None:
    """Lines with dots at each point, a legend in the lower left, grey dotted verticals at
    ``dotted_xs`` and red triangles near the top at ``markers`` (x values)."""
    width, height = 880, 495
    all_x = [x for line in lines for x in line.xs if math.isfinite(x)] + list(dotted_xs) + list(markers)
    frame = _Frame(70, 40, width - 90, height - 95, (min(all_x, default=0), max(all_x, default=1)), y_range)
    frame.text(width / 2, 24, title, 14)
    frame.y_axis(y_label)
    whole = all(float(x).is_integer() for x in all_x)
    for tick in nice_ticks(*frame.x_range, target=10, whole=whole):
        frame.text(frame.x(tick), frame.top + frame.height + 18, _tick_label(tick), 11)
    frame.text(frame.left + frame.width / 2, height - 18, x_label, 12)
    for x in dotted_xs:
        frame.parts.append(
            f'<line x1="{frame.x(x):.1f}" y1="{frame.top:.1f}" x2="{frame.x(x):.1f}" y2="{frame.top + frame.height:.1f}" '
            'stroke="grey" stroke-dasharray="2,3"/>'
        )
    legend: list[tuple[str, str, str]] = []
    for index, line in enumerate(lines):
        colour = PALETTE[index % len(PALETTE)]
        legend.append((line.label, colour, "line"))
        points = [(frame.x(x), frame.y(y)) for x, y in zip(line.xs, line.ys) if math.isfinite(x) and math.isfinite(y)]
        if points:
            path_text = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            frame.parts.append(f'<polyline points="{path_text}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
            frame.parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.2" fill="{colour}"/>' for x, y in points)
    y_marker = frame.y(y_range[0] + 0.97 * (y_range[1] - y_range[0]))
    for x in markers:
        px = frame.x(x)
        frame.parts.append(_triangle(px, y_marker))
    if markers and marker_label:
        legend.append((marker_label, "crimson", "triangle"))
    _legend(frame, legend)
    write_text_atomic(path, _svg(width, height, frame.parts))


def _triangle(x: float, y: float) -> str:
    """A crimson triangle pointing down, centred on (x, y)."""
    return f'<path d="M{x - 5:.1f},{y - 4.5:.1f} h10 l-5,9 z" fill="crimson"/>'


def _legend(frame: _Frame, entries: list[tuple[str, str, str]]) -> None:
    """(label, colour, "line" or "triangle") entries in up to two columns, boxed, in the
    plot's lower-left corner."""
    if not entries:
        return
    columns = 2 if len(entries) > 3 else 1
    rows = math.ceil(len(entries) / columns)
    cell = max(len(label) for label, _, _ in entries) * 6.5 + 30
    x0, y0 = frame.left + 10, frame.top + frame.height - 10 - rows * 18 - 6
    frame.parts.append(
        f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{columns * cell + 6:.1f}" height="{rows * 18 + 6:.1f}" '
        'fill="white" fill-opacity="0.85" stroke="#ccc"/>'
    )
    for index, (label, colour, shape) in enumerate(entries):
        x = x0 + 8 + (index // rows) * cell
        y = y0 + 15 + (index % rows) * 18
        if shape == "triangle":
            frame.parts.append(_triangle(x + 8, y - 4))
        else:
            frame.parts.append(f'<line x1="{x:.1f}" y1="{y - 4:.1f}" x2="{x + 16:.1f}" y2="{y - 4:.1f}" stroke="{colour}" stroke-width="2.5"/>')
        frame.text(x + 22, y, label, 11, "start")


def write_bar_charts(path: Path, panels: Sequence[Bars], title: str) -> None:
    """Side-by-side bar panels sharing the category labels, each bar with an error whisker
    (a value that is not finite is drawn as 0)."""
    panel_width, height = 470, 410
    width = panel_width * len(panels) + 20
    parts: list[str] = [_text(width / 2, 22, title, 14)]
    for index, panel in enumerate(panels):
        finite = [(v if math.isfinite(v) else 0.0, e if math.isfinite(e) else 0.0) for v, e in zip(panel.values, panel.errors)]
        panel = Bars(panel.title, panel.labels, [v for v, _ in finite], [e for _, e in finite], panel.colour)
        low = min([0.0] + [v - e for v, e in zip(panel.values, panel.errors)])
        high = max([0.0] + [v + e for v, e in zip(panel.values, panel.errors)])
        frame = _Frame(index * panel_width + 70, 60, panel_width - 90, height - 170, (0, 1), nice_range(low, high), parts)
        frame.text(frame.left + frame.width / 2, 48, panel.title, 13)
        frame.y_axis("")
        slot = frame.width / max(len(panel.values), 1)
        for i, (label, value, error) in enumerate(zip(panel.labels, panel.values, panel.errors)):
            centre = frame.left + (i + 0.5) * slot
            bar = slot * 0.7
            parts.append(
                f'<rect x="{centre - bar / 2:.1f}" y="{frame.y(max(value, 0)):.1f}" width="{bar:.1f}" '
                f'height="{abs(frame.y(value) - frame.y(0)):.1f}" fill="{panel.colour}" fill-opacity="0.8"/>'
            )
            if error > 0:
                y_low, y_high = frame.y(value - error), frame.y(value + error)
                parts.append(
                    f'<path d="M{centre:.1f},{y_low:.1f} V{y_high:.1f} M{centre - 4:.1f},{y_low:.1f} h8 '
                    f'M{centre - 4:.1f},{y_high:.1f} h8" stroke="#222" fill="none"/>'
                )
            base = frame.top + frame.height + 14
            frame.text(centre, base, label, 11, "end", f'transform="rotate(-30 {centre:.1f} {base:.1f})"')
    write_text_atomic(path, _svg(width, height, parts))
