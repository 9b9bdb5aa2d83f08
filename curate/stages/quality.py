"""Quality scores: pure functions of one decoded image, registered by name.

Scores are computed once during ``scan`` and stored; thresholds (``FilterConfig``) are applied
later to the stored numbers, so re-thresholding never re-reads an image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Every metric sees the image at the same pixel count, so scores do not depend on resolution.
ANALYSIS_AREA = 256 * 256


@dataclass
class Analysis:
    """What the metrics look at: a size-normalised grey image (float32, 0..255)."""

    grey: np.ndarray
    grey_image: Image.Image


def analysis_view(rgb: Image.Image) -> Analysis:
    w, h = rgb.size
    scale = (ANALYSIS_AREA / float(w * h)) ** 0.5
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    grey = rgb.convert("L")
    if size != grey.size:
        # Lanczos keeps edge contrast comparable across scales (box and bilinear soften by scale).
        grey = grey.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    return Analysis(np.asarray(grey, dtype=np.float32), grey)


ScoreFn = Callable[[Analysis], float]
SCORES: dict[str, ScoreFn] = {}


def score(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """Register a score function under ``name``."""

    def deco(fn: ScoreFn) -> ScoreFn:
        SCORES[name] = fn
        return fn

    return deco


@score("sharpness")
def sharpness(a: Analysis) -> float:
    """Variance of the 4-neighbour Laplacian; low means blurry."""
    g = a.grey
    lap = -4.0 * g[1:-1, 1:-1] + g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]
    return float(lap.var())


@score("brightness")
def brightness(a: Analysis) -> float:
    """Mean luminance in 0..1."""
    return float(a.grey.mean() / 255.0)


@score("dark_fraction")
def dark_fraction(a: Analysis) -> float:
    """Share of pixels below 16/255 (crushed shadows)."""
    return float((a.grey < 16).mean())


@score("bright_fraction")
def bright_fraction(a: Analysis) -> float:
    """Share of pixels above 239/255 (blown highlights)."""
    return float((a.grey > 239).mean())


@score("entropy")
def entropy(a: Analysis) -> float:
    """Shannon entropy of the grey histogram in bits (0 = one flat colour, 8 = maximal)."""
    hist = np.bincount(a.grey.astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum())


@score("contrast")
def contrast(a: Analysis) -> float:
    """Standard deviation of luminance (0..255)."""
    return float(a.grey.std())


def compute_scores(a: Analysis) -> dict[str, float]:
    return {name: round(fn(a), 4) for name, fn in SCORES.items()}
