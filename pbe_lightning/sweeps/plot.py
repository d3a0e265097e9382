"""``summary.png``: one panel per metric (two per row), a line per variant over steps, a legend.
Drawn with PIL, which the project already needs, rather than adding matplotlib."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pbe_lightning.sweeps.job import Job

COLOURS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]
PANEL = (560, 360)
MARGIN = (70, 40, 35, 45)  # left, top, right, bottom
AXIS, GRID = (90, 90, 90), (230, 230, 230)

Line = tuple[tuple[int, int, int], list[tuple[int, float]]]  # colour, (step, value) points


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1, 2, 2.5 or 5 times a power of ten apart)."""
    if high <= low:
        return [low]
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def step_range(steps: list[int]) -> tuple[float, float]:
    low, high = min(steps), max(steps)
    return (low - 1, high + 1) if low == high else (low, high)


def value_range(values: list[float]) -> tuple[float, float]:
    """The values' span with a margin, so that no dot sits on the frame."""
    low, high = min(values), max(values)
    pad = (high - low) * 0.08 or abs(high) * 0.05 or 0.5
    return low - pad, high + pad


@dataclass
class Axes:
    """A panel's frame in pixels and the steps and values it spans."""

    box: tuple[float, float, float, float]  # left, top, right, bottom
    steps: tuple[float, float]
    values: tuple[float, float]

    def at(self, step: float, value: float) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        (xlow, xhigh), (ylow, yhigh) = self.steps, self.values
        return (
            x0 + (step - xlow) / (xhigh - xlow) * (x1 - x0),
            y1 - (value - ylow) / (yhigh - ylow) * (y1 - y0),
        )


def draw_value_ticks(draw: ImageDraw.ImageDraw, axes: Axes) -> None:
    """A grid line and a label left of the frame per round value."""
    x0, _, x1, _ = axes.box
    small = font(12)
    for tick in nice_ticks(*axes.values):
        _, y = axes.at(axes.steps[0], tick)
        draw.line((x0, y, x1, y), fill=GRID)
        label = f"{tick:.4g}"
        draw.text(
            (x0 - 6 - draw.textlength(label, font=small), y - 7), label, fill="black", font=small
        )


def draw_step_ticks(draw: ImageDraw.ImageDraw, axes: Axes) -> None:
    """A tick and a label below the frame per whole round step, and the axis name."""
    _, _, x1, y1 = axes.box
    small = font(12)
    for tick in nice_ticks(*axes.steps):
        if tick != int(tick):
            continue
        x, _ = axes.at(tick, axes.values[0])
        draw.line((x, y1, x, y1 + 4), fill=AXIS)
        label = str(int(tick))
        draw.text(
            (x - draw.textlength(label, font=small) / 2, y1 + 6), label, fill="black", font=small
        )
    draw.text((x1 - draw.textlength("step", font=small), y1 + 22), "step", fill="black", font=small)


def draw_lines(draw: ImageDraw.ImageDraw, axes: Axes, lines: list[Line]) -> None:
    """A polyline with a dot per finite point, per variant."""
    for colour, points in lines:
        xy = [axes.at(s, v) for s, v in points if math.isfinite(v)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2, joint="curve")
        for x, y in xy:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)


def draw_panel(
    draw: ImageDraw.ImageDraw, origin: tuple[int, int], metric: str, mode: str, lines: list[Line]
) -> None:
    """One metric: title, frame, ticks, and the variants' lines."""
    box = (
        origin[0] + MARGIN[0],
        origin[1] + MARGIN[1],
        origin[0] + PANEL[0] - MARGIN[2],
        origin[1] + PANEL[1] - MARGIN[3],
    )
    better = "lower" if mode == "min" else "higher"
    title = f"{metric} ({mode}: {better} is better)"
    draw.text((box[0], origin[1] + 10), title, fill="black", font=font(15))
    draw.rectangle(box, outline=AXIS)
    points = [p for _, pts in lines for p in pts if math.isfinite(p[1])]
    if not points:
        draw.text((box[0] + 10, box[1] + 10), "no finite values", fill="black", font=font(12))
        return
    axes = Axes(box, step_range([s for s, _ in points]), value_range([v for _, v in points]))
    draw_value_ticks(draw, axes)
    draw_step_ticks(draw, axes)
    draw_lines(draw, axes, lines)


def draw_legend(draw: ImageDraw.ImageDraw, top: int, jobs: list[Job], colours: dict) -> None:
    """A line of each job's colour, then its variant and status."""
    legend_font = font(13)
    for index, job in enumerate(jobs):
        y = top + 5 + 20 * index
        draw.line((MARGIN[0], y + 8, MARGIN[0] + 30, y + 8), fill=colours[job.name], width=3)
        label = f"{job.variant} ({job.status})"
        draw.text((MARGIN[0] + 40, y), label, fill="black", font=legend_font)


def save_plot(jobs: list[Job], metrics: list[str], modes: dict[str, str], path: Path) -> None:
    """Draws the panels of ``metrics`` for the jobs that logged any, and saves them to ``path``."""
    columns = min(2, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    shown = [job for job in jobs if job.series]
    legend_height = 10 + 20 * len(shown)
    image = Image.new("RGB", (PANEL[0] * columns, PANEL[1] * rows + legend_height), "white")
    draw = ImageDraw.Draw(image)
    colours = {job.name: COLOURS[i % len(COLOURS)] for i, job in enumerate(shown)}
    for index, metric in enumerate(metrics):
        origin = (PANEL[0] * (index % columns), PANEL[1] * (index // columns))
        lines = [(colours[j.name], j.series[metric]) for j in shown if metric in j.series]
        draw_panel(draw, origin, metric, modes[metric], lines)
    draw_legend(draw, PANEL[1] * rows, shown, colours)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
