"""Inline SVG histograms for `curate report`: bars from stored scores, thresholds drawn as labelled lines."""

from __future__ import annotations

import html
import math


def bins(values: list[float], n: int = 20) -> tuple[float, float, list[int]]:
    """Equal-width bins over [min, max] of ``values``: (lo, hi, counts); the last bin includes max."""
    lo, hi = min(values), max(values)
    if hi <= lo:
        hi = lo + 1.0
    counts = [0] * n
    for v in values:
        counts[min(n - 1, int((v - lo) / (hi - lo) * n))] += 1
    return lo, hi, counts


def histogram(name: str, values: list[float], thresholds: dict[str, float], n: int = 20) -> str:
    """An SVG bar chart of ``values`` with a red line per threshold; counts are in <title> and data-count."""
    if not values:
        return ""
    lo, hi, counts = bins(values + [t for t in thresholds.values() if math.isfinite(t)], n)
    # thresholds only widen the axis; the bars count the images alone
    counts = [0] * n
    for v in values:
        counts[min(n - 1, int((v - lo) / (hi - lo) * n))] += 1
    w, h, pad = 420, 150, 28
    bw = (w - 2 * pad) / n
    top = max(counts) or 1
    x = lambda v: pad + (v - lo) / (hi - lo) * (w - 2 * pad)  # noqa: E731
    parts = [
        f'<svg class="hist" data-metric="{html.escape(name)}" width="{w}" height="{h + 30}" role="img" '
        f'aria-label="histogram of {html.escape(name)}, {len(values)} images" xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, c in enumerate(counts):
        a, b = lo + i * (hi - lo) / n, lo + (i + 1) * (hi - lo) / n
        bh = (h - pad) * c / top
        parts.append(
            f'<rect class="bin" data-lo="{a:.6g}" data-hi="{b:.6g}" data-count="{c}" x="{pad + i * bw:.1f}" '
            f'y="{h - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}" fill="#4a7ab5">'
            f"<title>{a:.3g} to {b:.3g}: {c} images</title></rect>"
        )
    parts.append(f'<line x1="{pad}" y1="{h}" x2="{w - pad}" y2="{h}" stroke="#333"/>')
    parts.append(f'<text x="{pad}" y="{h + 14}" font-size="11">{lo:.3g}</text>')
    parts.append(f'<text x="{w - pad}" y="{h + 14}" font-size="11" text-anchor="end">{hi:.3g}</text>')
    parts.append(f'<text x="{pad}" y="12" font-size="11">max bin {top} images</text>')
    for label, t in thresholds.items():
        tx = x(t)
        parts.append(
            f'<line class="threshold" data-value="{t:.6g}" x1="{tx:.1f}" y1="16" x2="{tx:.1f}" y2="{h}" '
            f'stroke="#c33" stroke-width="2" stroke-dasharray="4 2"/>'
            f'<text x="{tx:.1f}" y="{h + 28}" font-size="11" fill="#c33" text-anchor="middle">'
            f"{html.escape(label)} {t:.3g}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
