"""The loss chart of a job as inline SVG, drawn on the server: epoch_end losses, one polyline per decoder block,
laid out left to right (block 0's epochs, then block 1's, ...) with a dashed separator between blocks."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

from ..models import JobEvent

WIDTH, HEIGHT = 760, 320
LEFT, RIGHT, TOP, BOTTOM = 60, 16, 14, 46
COLORS = ("#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2")
MAX_BLOCK_LABELS = 16
LOG_SCALE_RATIO = 20.0  # losses spanning more than this factor are drawn on a log axis


@dataclass(frozen=True)
class LossPoint:
    block: int
    epoch: int
    loss: float


def loss_points(events: Iterable[JobEvent]) -> list[LossPoint]:
    """epoch_end losses by block then epoch; when a later attempt recalibrates a block, its epochs replace the earlier ones."""
    blocks: dict[int, list[LossPoint]] = {}
    for event in events:
        if event.kind != "epoch_end" or event.block is None or event.loss is None or not math.isfinite(event.loss):
            continue
        points = blocks.setdefault(event.block, [])
        epoch = event.epoch or len(points) + 1
        if points and epoch <= points[-1].epoch:
            points.clear()  # the block restarted (a retry or a requeue after a lost lease)
        points.append(LossPoint(event.block, epoch, event.loss))
    return [p for block in sorted(blocks) for p in blocks[block]]


def _nice_step(span: float, ticks: int = 4) -> float:
    raw = span / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def _y_axis(losses: list[float]) -> tuple[bool, float, float, list[float]]:
    """(log scale?, low, high, tick values) covering all losses."""
    lo, hi = min(losses), max(losses)
    if lo > 0 and hi / lo > LOG_SCALE_RATIO:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        return True, float(a), float(b), [10.0 ** e for e in range(a, b + 1)]
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo)
    low, high = math.floor(lo / step) * step, math.ceil(hi / step) * step
    if lo >= 0 and low < 0:
        low = 0.0
    count = round((high - low) / step)
    return False, low, high, [low + i * step for i in range(count + 1)]


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def loss_chart_svg(points: list[LossPoint], *, title: str = "calibration loss per epoch") -> Markup | None:
    """An <svg> element, or None when there is no loss yet."""
    if not points:
        return None
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    log, low, high, ticks = _y_axis([p.loss for p in points])

    def x(i: float) -> float:
        return LEFT + plot_w * (i + 0.5) / len(points)

    def y(loss: float) -> float:
        value = math.log10(loss) if log else loss
        return TOP + plot_h * (1 - (value - low) / ((high - low) or 1.0))

    out = [(f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" xmlns="http://www.w3.org/2000/svg" '
            f'aria-label="{escape(title)}"><title>{escape(title)}</title>'),
           f'<rect class="plot" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#cbd5e1"/>']
    for tick in ticks:
        ty = y(tick)
        out.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#e2e8f0"/>'
                   f'<text x="{LEFT - 6}" y="{ty + 4:.1f}" text-anchor="end" font-size="11" fill="#475569">'
                   f'{_fmt(tick)}</text>')
    if len({p.block for p in points}) > 1:  # the whole run, faintly, under the per-block lines
        trend = " ".join(f"{x(i):.1f},{y(p.loss):.1f}" for i, p in enumerate(points))
        out.append(f'<polyline class="trend" points="{trend}" fill="none" stroke="#cbd5e1" stroke-width="1.5"/>')
    blocks = sorted({p.block for p in points})
    every = math.ceil(len(blocks) / MAX_BLOCK_LABELS)
    for n, block in enumerate(blocks):
        idx = [i for i, p in enumerate(points) if p.block == block]
        if idx[0] > 0:
            sx = LEFT + plot_w * idx[0] / len(points)
            out.append(f'<line class="separator" x1="{sx:.1f}" x2="{sx:.1f}" y1="{TOP}" y2="{TOP + plot_h}" '
                       'stroke="#94a3b8" stroke-dasharray="3 3"/>')
        if n % every == 0:
            out.append(f'<text x="{x((idx[0] + idx[-1]) / 2):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle" '
                       f'font-size="11" fill="#475569">{block}</text>')
        color = COLORS[n % len(COLORS)]
        coords = " ".join(f"{x(i):.1f},{y(points[i].loss):.1f}" for i in idx)
        out.append(f'<polyline class="loss" data-block="{block}" points="{coords}" fill="none" stroke="{color}" '
                   'stroke-width="2" stroke-linejoin="round"/>')
        for i in idx:
            p = points[i]
            out.append(f'<circle cx="{x(i):.1f}" cy="{y(p.loss):.1f}" r="3" fill="{color}"><title>block {block}, '
                       f'epoch {p.epoch}: loss {p.loss:.5g}</title></circle>')
    out.append(f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 8}" text-anchor="middle" font-size="12" '
               f'fill="#334155">decoder block (its epochs left to right)</text>')
    out.append(f'<text transform="translate(14 {TOP + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle" '
               f'font-size="12" fill="#334155">loss{" (log scale)" if log else ""}</text></svg>')
    return Markup("".join(out))
