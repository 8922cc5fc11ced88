"""Methods x tasks as grouped bars with error bars, written as a small standalone SVG.

People compare methods by looking: every report is written with this figure beside it. One group
of bars per task (its primary metric under the name), one colour per method, each bar the mean
over runs and its whisker the sd (ddof 1; none for a single run). No plotting library is needed.
"""

from __future__ import annotations

import math
import os
from html import escape
from pathlib import Path

from helm.downstream.protocol import ProbeResult
from helm.fileio import write_text

# Colour-blind-safe qualitative palette (Okabe & Ito 2008), cycled beyond eight methods.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


def _ticks(lo: float, hi: float) -> list[float]:
    """About five round tick values covering [lo, hi]."""
    raw = (hi - lo) / 5 or 1.0
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.floor(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1.5))]


def write_figure(
    results: dict[str, dict[str, ProbeResult]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Write ``results[task][method]`` as grouped bars (mean, sd whiskers) to an SVG file."""
    tasks = list(results)
    methods = list(dict.fromkeys(m for t in tasks for m in results[t]))
    stats = {
        (t, m): (r.mean, r.std if len(r.values) > 1 else math.nan)
        for t in tasks
        for m, r in results[t].items()
    }
    ends = [v for mean, sd in stats.values() if math.isfinite(mean)
            for v in (mean - (sd if math.isfinite(sd) else 0), mean + (sd if math.isfinite(sd) else 0))]  # fmt: skip
    ticks = _ticks(min([0.0, *ends]), max([0.0, *ends]) or 1.0)
    lo, hi = ticks[0], ticks[-1]
    bar, gap, left, top, plot_h = 18, 24, 60, 30 + 18 * len(methods), 220
    group = bar * len(methods) + gap
    width = left + group * len(tasks) + 20
    height = top + plot_h + 60
    y = lambda v: top + plot_h * (hi - v) / (hi - lo)  # noqa: E731

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    if title:
        out.append(f'<text x="{left}" y="14" font-size="13">{escape(title)}</text>')
    for i, m in enumerate(methods):  # legend
        ly = 22 + 16 * i
        out.append(f'<rect x="{left}" y="{ly}" width="10" height="10" fill="{PALETTE[i % 8]}"/>')
        out.append(f'<text x="{left + 14}" y="{ly + 9}">{escape(m)}</text>')
    for t in ticks:  # axis and grid
        out.append(f'<line x1="{left}" x2="{width - 20}" y1="{y(t):.1f}" y2="{y(t):.1f}" '
                   f'stroke="{"#444" if t == 0 else "#ddd"}"/>')  # fmt: skip
        out.append(f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for j, t in enumerate(tasks):
        x0 = left + gap / 2 + j * group
        for i, m in enumerate(methods):
            if (t, m) not in stats or not math.isfinite(stats[t, m][0]):
                continue
            mean, sd = stats[t, m]
            x = x0 + i * bar
            y0, y1 = sorted((y(0), y(mean)))
            out.append(f'<rect x="{x:.1f}" y="{y0:.1f}" width="{bar - 2}" height="{y1 - y0:.1f}" '
                       f'fill="{PALETTE[i % 8]}"><title>{escape(m)}: {mean:.4f}'
                       f'{f" ± {sd:.4f}" if math.isfinite(sd) else ""}</title></rect>')  # fmt: skip
            if math.isfinite(sd):
                cx = x + (bar - 2) / 2
                out.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(mean - sd):.1f}" '
                           f'y2="{y(mean + sd):.1f}" stroke="black"/>')  # fmt: skip
        metric = next(iter(results[t].values())).metric if results[t] else ""
        cx = x0 + bar * len(methods) / 2
        out.append(f'<text x="{cx:.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                   f'{escape(t)}</text>')  # fmt: skip
        out.append(f'<text x="{cx:.1f}" y="{top + plot_h + 30}" text-anchor="middle" '
                   f'fill="#666">{escape(metric)}</text>')  # fmt: skip
    out.append("</svg>")
    return write_text(path, "\n".join(out) + "\n", what="figure")
