"""Which copy of a duplicate group to keep: the most original one, and the rule that decided.

Rules, in order (the first that tells two copies apart decides):
1. not rejected by another stage;
2. not upscaled: a copy with more pixels but far less fine detail per pixel is an upscale of the other;
3. no padding: less area in flat fill (letterbox, border, caption bar, rotation corners);
   uncropped: the copy that shows more of the scene (both measured on the verified pair's overlap);
4. colour over grey;
5. fewer compression artifacts: higher JPEG quality from the quantisation tables (JPEG vs JPEG only);
6. sharper at equal scale over the shared tiles, only beyond a tolerance (verified pairs only);
7. more pixels; then the larger file; then the path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..manifest import ImageRecord

UPSCALE_PIXELS = 1.3  # a copy this much larger ...
UPSCALE_DETAIL = 0.8  # ... with less than this share of the other's fine detail is an upscale
BORDER_MARGIN = 0.03
GREY_MAX, COLOUR_MIN = 3.0, 8.0
JPEG_MARGIN = 8.0
SHARP_TOLERANCE = 2.0
ROUND_ROBIN = 24  # groups up to this size compare every pair; larger ones run a challenge round


@dataclass
class Copy:
    """A group member with its keeper signals."""

    rec: ImageRecord
    signals: dict[str, Any]
    demoted: bool = False

    @property
    def sharpness(self) -> float:
        return float(self.rec.scores.get("sharpness", 0.0))


def flip(ev: dict[str, Any] | None) -> dict[str, Any] | None:
    """Pair evidence seen from the other side (a <-> b)."""
    if ev is None:
        return None
    out = dict(ev)
    for k, v in ev.items():
        if k.endswith("_a"):
            out[k[:-2] + "_b"] = v
        elif k.endswith("_b"):
            out[k[:-2] + "_a"] = v
        elif k in ("sharp", "hscale"):  # ratios of a to b
            out[k] = 1.0 / v if v else v
    return out


def content_scale(a: Copy, b: Copy, ev: dict[str, Any] | None) -> float:
    """How much larger a draws the shared content than b, in native pixels per pixel (area ratio).

    From the verified homography when there is one (a crop has more pixels but the same scale), else
    from the pixel counts (pHash-linked copies show the same framing)."""
    ta, tb = a.signals.get("thumb"), b.signals.get("thumb")
    if ev is not None and "hscale" in ev and ta and tb and a.rec.width and b.rec.width:
        k = (tb[1] / b.rec.width) * float(ev["hscale"]) * (a.rec.width / ta[1])
        return k * k
    return a.rec.pixels / max(1, b.rec.pixels)


def _upscaled(x: Copy, y: Copy, scale: float) -> str:
    """Why x (drawing the content ``scale`` times larger in area) looks like an upscale of y, or ''."""
    if scale <= UPSCALE_PIXELS:
        return ""
    dx, dy = x.signals.get("detail"), y.signals.get("detail")
    if dx is not None and dy is not None:
        if dx < UPSCALE_DETAIL * dy:
            return f"fine detail {dx:.2f} vs {dy:.2f}"
    return ""


def compare(a: Copy, b: Copy, ev: dict[str, Any] | None = None) -> tuple[int, str]:
    """(+1 if a is the better keeper, -1 if b, 0 if tied) and the rule that decided, in words.

    ``ev``: verification evidence of the pair (keys ending _a describe a), when the two were matched.
    """
    sa, sb = a.signals, b.signals
    if a.demoted != b.demoted:
        return (1 if b.demoted else -1), "not rejected by another check"
    scale = content_scale(a, b, ev)
    for x, y, sign, sc in ((a, b, -1, scale), (b, a, 1, 1 / max(scale, 1e-9))):
        why = _upscaled(x, y, sc)
        if why:
            return sign, f"not upscaled (the larger copy is an upscale: {why})"
    if ev is not None:
        pa, pb = ev.get("pad_a", 0.0), ev.get("pad_b", 0.0)
        if abs(pa - pb) > BORDER_MARGIN:
            return (
                1 if pa < pb else -1
            ), f"no padding or caption bar ({max(pa, pb):.0%} of the dropped copy is flat fill)"
        xa, xb = ev.get("extra_a", 0.0), ev.get("extra_b", 0.0)
        if max(xa, xb) > 0.05 and min(xa, xb) < 0.02:
            return (
                1 if xa > xb else -1
            ), f"uncropped (the dropped copy shows {1 - max(xa, xb):.0%} of the scene)"
    else:
        ba, bb = sa.get("border", 0.0), sb.get("border", 0.0)
        if abs(ba - bb) > BORDER_MARGIN:
            return (
                1 if ba < bb else -1
            ), f"no padding or border (border {min(ba, bb):.0%} vs {max(ba, bb):.0%})"
    ca, cb = sa.get("colour"), sb.get("colour")
    if ca is not None and cb is not None and min(ca, cb) < GREY_MAX and max(ca, cb) > COLOUR_MIN:
        return (1 if ca > cb else -1), "colour over grey"
    qa, qb = sa.get("jpeg_q"), sb.get("jpeg_q")
    if qa is not None and qb is not None and abs(qa - qb) >= JPEG_MARGIN:
        return (
            1 if qa > qb else -1
        ), f"fewer compression artifacts (JPEG quality {max(qa, qb):.0f} vs {min(qa, qb):.0f})"
    if ev is not None:
        oa, ob = ev.get("overlay_a", 0), ev.get("overlay_b", 0)
        if max(oa, ob) >= 2 and min(oa, ob) == 0:
            return (
                1 if oa < ob else -1
            ), f"no overlay (text or logo drawn on {max(oa, ob)} tiles of the dropped copy)"
    # Sharpness only at equal scale, over the tiles both copies share (an overlay or JPEG blocking in a
    # few tiles cannot win it); without a verified pair there is no fair comparison.
    if ev is not None and "sharp" in ev:
        r = float(ev["sharp"])
        if max(r, 1 / max(r, 1e-6)) > SHARP_TOLERANCE:
            return (
                1 if r > 1 else -1
            ), f"sharper beyond tolerance ({max(r, 1 / r):.2f}x edge energy at equal scale)"
    if a.rec.pixels != b.rec.pixels:
        return (1 if a.rec.pixels > b.rec.pixels else -1), "more pixels"
    if a.rec.size != b.rec.size:
        return (1 if a.rec.size > b.rec.size else -1), "larger file"
    return (1 if a.rec.path <= b.rec.path else -1), "tie; first by path"


def choose(
    copies: list[Copy],
    evidence: Callable[[Copy, Copy], dict[str, Any] | None] | None = None,
    keeper: Copy | None = None,
    explain: bool = True,
) -> tuple[Copy, dict[str, str]]:
    """The keeper and, per other path, the rule that decided (``explain=False``: the keeper only, an empty
    dict, and n fewer comparisons).

    The keeper is the champion of a challenge round (the rules need not be transitive);
    ``evidence(x, y)`` gives the verification evidence of a matched pair, oriented x -> a.
    """

    def cmp(x: Copy, y: Copy) -> tuple[int, str]:
        return compare(x, y, evidence(x, y) if evidence else None)

    if keeper is not None:  # already chosen: only explain
        return keeper, {c.rec.path: cmp(keeper, c)[1] for c in copies if c is not keeper}

    if len(copies) == 1:
        return copies[0], {}
    if len(copies) <= ROUND_ROBIN:
        # Every pair once: the copy that wins most comparisons (robust to a non-transitive rule pair).
        wins = {id(c): 0 for c in copies}
        for n, x in enumerate(copies):
            for y in copies[n + 1 :]:
                wins[id(x if cmp(x, y)[0] > 0 else y)] += 1
        keeper = max(copies, key=lambda c: wins[id(c)])
        if not explain:
            return keeper, {}
        return keeper, {c.rec.path: cmp(keeper, c)[1] for c in copies if c is not keeper}
    # Champion and challengers (2n comparisons, each may measure one pair): a second pass settles the
    # rare non-transitive case.
    keeper = copies[0]
    for _ in range(2):
        changed = False
        for c in copies:
            if c is not keeper and cmp(c, keeper)[0] > 0:
                keeper, changed = c, True
        if not changed:
            break
    if not explain:
        return keeper, {}
    why = {c.rec.path: cmp(keeper, c)[1] for c in copies if c is not keeper}
    return keeper, why
