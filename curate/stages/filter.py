"""Filter: apply quality thresholds to stored scores and record reject decisions with reasons."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import FilterConfig
from ..manifest import ImageRecord, Manifest


def reasons_for(rec: ImageRecord, cfg: FilterConfig, *, config_fix: bool = False) -> list[tuple[str, str]]:
    """Every rule ``rec`` violates as (reason, detail with the fix). Pure: reads stored numbers only.

    The fix names the `curate filter` flag, or with ``config_fix`` (for `curate check`, which has no
    threshold flags) the curate.toml key, and `curate keep`."""

    def fix(flag: str, key: str) -> str:
        return f"{key} in [filter] of curate.toml, or `curate keep` the file" if config_fix else flag

    out: list[tuple[str, str]] = []
    w, h = rec.width or 0, rec.height or 0
    short, long_ = min(w, h), max(w, h)
    s = rec.scores
    if short < cfg.min_side:
        hint = fix("lower with --min-side", "lower min_side")
        out.append(("too-small", f"short side {short}px < {cfg.min_side}px ({hint})"))
    if cfg.min_pixels and w * h < cfg.min_pixels:
        out.append(("too-small", f"{w * h} pixels < {cfg.min_pixels}"))
    if short and long_ / short > cfg.max_aspect:
        hint = fix("raise --max-aspect", "raise max_aspect")
        out.append(("aspect", f"aspect {long_ / short:.2f}:1 > {cfg.max_aspect}:1 (crop it, or {hint})"))
    if "sharpness" in s and s["sharpness"] < cfg.min_sharpness:
        hint = fix("lower with --min-sharpness", "lower min_sharpness")
        out.append(("blurry", f"sharpness {s['sharpness']:.1f} < {cfg.min_sharpness} ({hint})"))
    if "brightness" in s and s["brightness"] < cfg.min_brightness:
        hint = fix("lower with --min-brightness", "lower min_brightness")
        out.append(("too-dark", f"mean brightness {s['brightness']:.2f} < {cfg.min_brightness} ({hint})"))
    if "brightness" in s and s["brightness"] > cfg.max_brightness:
        hint = fix("raise --max-brightness", "raise max_brightness")
        out.append(("too-bright", f"mean brightness {s['brightness']:.2f} > {cfg.max_brightness} ({hint})"))
    if "entropy" in s and s["entropy"] < cfg.min_entropy:
        hint = fix("lower with --min-entropy", "lower min_entropy")
        bits = max(0.0, s["entropy"])  # a constant image's -0.0 would print as -0.00
        out.append(
            ("low-information", f"entropy {bits:.2f} bits < {cfg.min_entropy} (near-constant image; {hint})")
        )
    for flag in rec.flags:
        if flag in cfg.reject_flags:
            hint = fix(f"accept with --allow {flag}", f"accept: take {flag} out of reject_flags")
            out.append((flag, f"{_FLAG_TEXT.get(flag, flag)} ({hint})"))
    return out


_FLAG_TEXT = {
    "animated": "animated image; only the first frame would be used",
    "cmyk": "CMYK colour space; convert to RGB",
    "16bit": "16-bit image; trainers read 8-bit",
    "alpha": "has transparent pixels; trainers see them composited on a background",
}


@dataclass
class FilterResult:
    checked: int
    rejected: int  # images breaking a threshold, kept_by_hand included
    by_reason: dict[str, int]
    kept_by_hand: list[str] = field(default_factory=list)  # rejected files `curate keep` keeps anyway

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def filter_images(manifest: Manifest, cfg: FilterConfig = FilterConfig()) -> FilterResult:
    """Replace the 'filter' decisions in the manifest with those for ``cfg``."""
    rejects: dict[str, tuple[str, str | None]] = {}
    by_reason: dict[str, int] = {}
    records = manifest.images(include_errors=False)
    for rec in records:
        found = reasons_for(rec, cfg)
        if not found:
            continue
        reason = ",".join(dict.fromkeys(r for r, _ in found))
        detail = "; ".join(d for _, d in found)
        for r, _ in found:
            by_reason[r] = by_reason.get(r, 0) + 1
        for p in rec.paths:
            rejects[p] = (reason, detail)
    manifest.set_rejects("filter", rejects)
    rejected_images = sum(1 for rec in records if rec.paths[0] in rejects)
    kept = sorted(p for p, (d, _) in manifest.decisions().items() if d == "keep" and p in rejects)
    return FilterResult(len(records), rejected_images, by_reason, kept)
