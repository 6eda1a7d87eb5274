"""A line chart drawn with PIL alone (log x axis), for benchmarks without matplotlib."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def draw_lines(series: dict[str, list[tuple[float, float]]], path: str | Path, x_label: str,
               y_label: str, size: tuple[int, int] = (560, 340)) -> None:
    """Write a PNG: one polyline per series of (x > 0, y) points, x on a log10 axis."""
    width, height = size
    left, right, top, bottom = 60, 120, 20, 45
    points = [p for values in series.values() for p in values]
    xs = [math.log10(x) for x, _ in points]
    x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1)
    y_lo, y_hi = min(0.0, min(y for _, y in points)), max(y for _, y in points)
    y_hi = y_hi if y_hi > y_lo else y_lo + 1
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def at(x: float, y: float) -> tuple[float, float]:
        u = (math.log10(x) - x_lo) / (x_hi - x_lo)
        v = (y - y_lo) / (y_hi - y_lo)
        return left + u * (width - left - right), height - bottom - v * (height - top - bottom)

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for decade in range(math.floor(x_lo), math.ceil(x_hi) + 1):
        x, _ = at(10.0**decade, y_lo)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 12, height - bottom + 6), f"{10**decade:,}", fill="black")
    for k in range(5):
        y_value = y_lo + k * (y_hi - y_lo) / 4
        _, y = at(10.0**x_lo, y_value)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{y_value:.3g}", fill="black")
    if y_lo < 0 < y_hi:
        _, zero = at(10.0**x_lo, 0.0)
        draw.line([left, zero, width - right, zero], fill="#bbbbbb")
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        line = [at(x, y) for x, y in sorted(values)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((width - right + 8, top + 16 * index), name, fill=colour)
    draw.text((left, height - 16), x_label, fill="black")
    draw.text((left, 4), y_label, fill="black")
    image.save(path, optimize=True)
