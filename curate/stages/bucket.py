"""Aspect-ratio buckets exactly as kohya-ss/sd-scripts makes and assigns them, plus a preflight report.

The rules (library/model_util.py ``make_bucket_resolutions`` and library/train_util.py ``BucketManager``):

* Buckets: the square ``floor(sqrt(area) / step) * step``, and for every width from ``min_size`` to
  ``max_size`` in ``step``: height = ``min(max_size, floor(area // width / step) * step)``; both (w, h)
  and (h, w) are added when height >= min_size. The set is sorted.
* Assignment: an image whose exact size is a bucket uses it; otherwise the bucket with the smallest
  ``|bucket_w / bucket_h - w / h|`` (first in sorted order on ties). The image is scaled so it covers
  the bucket (match height if the image is wider than the bucket, else width), rounded half up,
  and centre-cropped to the bucket.
* No-upscale: images with more pixels than ``resolution**2`` are shrunk to that area, keeping the
  aspect, with the side whose step rounding keeps the aspect better rounded to the step; the bucket is
  the resized size floored to the step. Smaller images are never scaled up; min/max sizes are ignored.

Our report is computed with the same rules, so the buckets it shows are the buckets the trainer uses.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import CurateError
from ..manifest import Manifest

META_KEY = "bucket_settings"

# The one default model family of `run`, `plan`, `bucket` and the trainer, and each family's bucket defaults.
# step_multiple: sd-scripts' train_network.py checks bucket_reso_steps % 64, sdxl_train_network.py % 32.
DEFAULT_FAMILY = "sd15"
FAMILIES: dict[str, dict[str, int]] = {
    "sd15": {"resolution": 512, "step_multiple": 64},
    "sdxl": {"resolution": 1024, "step_multiple": 32},
}
RESOLUTION: dict[str, int] = {k: v["resolution"] for k, v in FAMILIES.items()}

# Preflight thresholds (fractions); a crop above CROP_WARN or an upscale above UPSCALE_WARN is listed.
CROP_WARN = 0.10
UPSCALE_WARN = 1.0
SMALL_BUCKET = 2  # buckets with this many images or fewer waste batch slots


def _round_to_steps(x: float, step: int) -> int:
    x = int(x + 0.5)
    return x - x % step


def make_buckets(
    resolution: int | tuple[int, int], min_size: int = 256, max_size: int = 1024, step: int = 64
) -> list[tuple[int, int]]:
    """Every bucket (width, height) the trainer predefines for a base resolution, sorted."""
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    _check_settings((width, height), min_size, max_size, step)
    area = width * height
    resos = {(int(math.sqrt(area) // step) * step,) * 2}
    w = min_size
    while w <= max_size:
        h = min(max_size, int((area // w) // step) * step)
        if h >= min_size:
            resos.add((w, h))
            resos.add((h, w))
        w += step
    return sorted(resos)


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The predefined bucket the trainer picks for an image: its exact size, else the nearest aspect ratio."""
    if (width, height) in set(buckets):
        return (width, height)
    ratios = np.array([w / h for w, h in buckets])
    return tuple(buckets[int(np.abs(ratios - width / height).argmin())])  # type: ignore[return-value]


def resized_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """Size the image is scaled to before the centre crop: it covers the bucket, aspect kept."""
    ar = width / height
    scale = bucket[1] / height if ar > bucket[0] / bucket[1] else bucket[0] / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def bucket_no_upscale(
    width: int, height: int, resolution: int, step: int = 64
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(bucket, resized size) in no-upscale mode: shrink to the base area if larger, floor to the step."""
    max_area = resolution * resolution
    ar = width / height
    if width * height > max_area:
        rw = math.sqrt(max_area * ar)
        rh = max_area / rw
        bw = _round_to_steps(rw, step)
        bh_w = _round_to_steps(bw / ar, step)
        bh = _round_to_steps(rh, step)
        bw_h = _round_to_steps(bh * ar, step)
        err_w = abs(bw / bh_w - ar) if bh_w else math.inf
        err_h = abs(bw_h / bh - ar) if bh else math.inf
        if err_w < err_h:
            size = (bw, int(bw / ar + 0.5))
        else:
            size = (int(bh * ar + 0.5), bh)
    else:
        size = (width, height)
    return (size[0] - size[0] % step, size[1] - size[1] % step), size


@dataclass(frozen=True)
class BucketSettings:
    """The trainer's bucket options; exported into the dataset TOML so both sides agree.

    Checked on creation with sd-scripts' rules, so an export never writes a TOML it would reject.
    The defaults are those of :data:`DEFAULT_FAMILY`; :func:`family_settings` derives them per family.
    """

    resolution: int = 512
    min_size: int = 256
    max_size: int = 1024
    step: int = 64
    no_upscale: bool = False
    family: str | None = None  # sd15 | sdxl: adds that trainer's step rule; None: the family-free rules

    def __post_init__(self) -> None:
        _check_settings(self.resolution, self.min_size, self.max_size, self.step, self.family)

    def buckets(self) -> list[tuple[int, int]]:
        return make_buckets(self.resolution, self.min_size, self.max_size, self.step)


def family_settings(
    family: str | None = None,
    *,
    resolution: int | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    step: int | None = None,
    no_upscale: bool = False,
) -> BucketSettings:
    """Bucket settings for a model family, any given value winning over the family's defaults.

    Unset sides follow the resolution: --min 256 (never above the resolution), --max twice the resolution.
    """
    fam = FAMILIES[check_family(family)]
    res = int(resolution) if resolution is not None else int(fam["resolution"])
    step = int(step) if step is not None else 64
    if min_size is None:
        min_size = max(step, min(256, res - res % step))
    if max_size is None:
        max_size = 2 * res + (-2 * res) % step
    return BucketSettings(res, int(min_size), int(max_size), step, no_upscale, check_family(family))


def check_family(family: str | None) -> str:
    """The family name, :data:`DEFAULT_FAMILY` for None; a one-line error for anything else."""
    family = family or DEFAULT_FAMILY
    if family not in FAMILIES:
        raise CurateError(f"unknown --model {family!r}; choose {' or '.join(FAMILIES)}")
    return family


@dataclass
class Placement:
    """Where one image lands: bucket, the size it is scaled to, and what that costs."""

    bucket: tuple[int, int]
    resized: tuple[int, int]
    scale: float  # > 1 means the trainer upscales the image
    crop_loss: float  # fraction of the scaled image cut away by the centre crop
    ar_error: float  # bucket aspect - image aspect

    @property
    def upscaled(self) -> bool:
        return self.scale > 1.0 + 1e-9


def place(
    width: int, height: int, settings: BucketSettings, buckets: list[tuple[int, int]] | None = None
) -> Placement:
    """Bucket, resize and crop for one image, as the trainer will do it."""
    if settings.no_upscale:
        bucket, size = bucket_no_upscale(width, height, settings.resolution, settings.step)
    else:
        bucket = assign_bucket(width, height, buckets if buckets is not None else settings.buckets())
        size = resized_size(width, height, bucket)
    area = size[0] * size[1]
    crop = 1.0 - (bucket[0] * bucket[1]) / area if area else 1.0
    ar_error = (bucket[0] / bucket[1] - width / height) if bucket[1] else math.inf
    return Placement(bucket, size, size[0] / width, max(0.0, crop), ar_error)


def _check_settings(
    resolution: int | tuple[int, int], min_size: int, max_size: int, step: int, family: str | None = None
) -> None:
    """Reject what sd-scripts would reject or silently change (its BucketManager and dataset checks)."""
    lo, hi = (resolution, resolution) if isinstance(resolution, int) else (min(resolution), max(resolution))
    if step <= 0 or lo <= 0 or min_size <= 0:
        raise CurateError("resolution, --min, --max and --step must be positive")
    if family is not None and family not in FAMILIES:
        raise CurateError(f"unknown model family {family!r}; choose {' or '.join(FAMILIES)}")
    if step % 8:
        raise CurateError(f"--step {step} must be a multiple of 8 (the VAE downscale); use 64")
    need = FAMILIES[family]["step_multiple"] if family else 0
    if need and step % need:
        raise CurateError(
            f"--step {step}: sd-scripts' {family} trainer needs bucket_reso_steps divisible by {need}; use 64"
        )
    for name, v in (("--min", min_size), ("--max", max_size)):
        if v % step:
            raise CurateError(
                f"{name} {v} is not a multiple of --step {step} (sd-scripts would round it); "
                f"use {v - v % step or step} or {v + step - v % step}"
            )
    if max_size < min_size:
        raise CurateError(f"--max ({max_size}) must be at least --min ({min_size})")
    if min_size > lo:
        raise CurateError(
            f"--min ({min_size}) must be at most the resolution ({lo}); sd-scripts refuses this too: "
            f"lower --min or raise --resolution"
        )
    if max_size < hi:
        raise CurateError(
            f"--max ({max_size}) must be at least the resolution ({hi}); sd-scripts refuses this too"
        )


# -- images smaller than the training resolution ------------------------------------------------------
def small_images(sizes: dict[str, tuple[int, int]], settings: BucketSettings) -> dict[str, Any] | None:
    """Images with fewer pixels than the resolution squared: how many, and how far the trainer enlarges them.

    Without no-upscale each is scaled up to cover its bucket (``worst_scale``: up to which factor); with it
    (sd-scripts' ``bucket_no_upscale``) each trains at its own size, cropped to a multiple of the step.
    None when there is none. ``sizes`` is path -> (width, height) as the trainer sees it (EXIF applied).
    """
    resolution, no_upscale = settings.resolution, settings.no_upscale
    area = resolution * resolution
    small = {p: wh for p, wh in sizes.items() if wh[0] and wh[1] and wh[0] * wh[1] < area}
    if not small:
        return None
    buckets = None if no_upscale else settings.buckets()
    placed = {p: place(w, h, settings, buckets) for p, (w, h) in small.items()}
    worst = max(placed, key=lambda p: (placed[p].scale, p))
    smallest = min(small, key=lambda p: (small[p][0] * small[p][1], p))
    return {
        "count": len(small),
        "of": len(sizes),
        "resolution": resolution,
        "no_upscale": no_upscale,
        "upscaled": sum(pl.upscaled for pl in placed.values()),
        "worst_scale": round(placed[worst].scale, 4),
        "worst": {"path": worst, "size": list(small[worst]), "bucket": list(placed[worst].bucket)},
        "smallest": {
            "path": smallest,
            "size": list(small[smallest]),
            "bucket": list(placed[smallest].bucket),
        },
        "zero_bucket": sorted(p for p, pl in placed.items() if 0 in pl.bucket),
    }


def small_images_message(info: dict[str, Any], fix: str = "--no-upscale") -> str:
    """One line about ``small_images``: how many, by how much, and what to do (``fix`` names the option)."""
    n, of, res = info["count"], info["of"], info["resolution"]
    sm = info["smallest"]
    head = f"{n} of {of} image(s) are smaller than the {res} px training resolution"
    if info["no_upscale"]:
        w, h = sm["size"]
        bw, bh = sm["bucket"]
        msg = (f"{head}: with bucket_no_upscale they train at their own size, cropped to a multiple of the "
               f"bucket step (smallest {sm['path']}: {w}x{h} in bucket {bw}x{bh})")  # fmt: skip
        if info["zero_bucket"]:
            msg += (f"; {len(info['zero_bucket'])} have a side under the bucket step (e.g. "
                    f"{info['zero_bucket'][0]}) and get a bucket side of 0: remove or enlarge them")  # fmt: skip
        return msg
    wo = info["worst"]
    return (f"{head} and are upscaled to fill their buckets (up to x{info['worst_scale']:.2f}: {wo['path']}, "
            f"{wo['size'][0]}x{wo['size'][1]} to bucket {wo['bucket'][0]}x{wo['bucket'][1]}), which blurs "
            f"them; replace them with larger originals, or use {fix} (sd-scripts' bucket_no_upscale: "
            "each trains at its own size)")  # fmt: skip


# -- the preflight report ----------------------------------------------------------------------------
@dataclass
class BucketReport:
    settings: BucketSettings
    counts: dict[tuple[int, int], int] = field(default_factory=dict)  # bucket -> images
    placements: dict[str, Placement] = field(default_factory=dict)  # path -> placement
    warnings: list[str] = field(default_factory=list)

    @property
    def small_buckets(self) -> dict[tuple[int, int], int]:
        return {b: n for b, n in self.counts.items() if n <= SMALL_BUCKET}

    @property
    def upscaled(self) -> dict[str, float]:
        return {p: pl.scale for p, pl in self.placements.items() if pl.upscaled}

    @property
    def mean_crop(self) -> float:
        return float(np.mean([p.crop_loss for p in self.placements.values()])) if self.placements else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "buckets": [{"width": w, "height": h, "images": n} for (w, h), n in sorted(self.counts.items())],
            "small_buckets": [f"{w}x{h}" for (w, h) in sorted(self.small_buckets)],
            "images": {
                p: {
                    "bucket": list(pl.bucket),
                    "resized": list(pl.resized),
                    "scale": round(pl.scale, 4),
                    "crop_loss": round(pl.crop_loss, 4),
                }
                for p, pl in self.placements.items()
            },
            "upscaled": len(self.upscaled),
            "mean_crop_loss": round(self.mean_crop, 4),
            "warnings": self.warnings,
        }


def _warnings(rep: BucketReport) -> list[str]:
    out = []
    small = rep.small_buckets
    if small:
        n = sum(small.values())
        names = ", ".join(f"{w}x{h} ({c})" for (w, h), c in sorted(small.items()))
        out.append(
            f"{len(small)} bucket(s) hold only 1-2 images ({n} images: {names}): each makes short batches; "
            "crop those images to a common aspect ratio, or train with batch size 1"
        )
    crops = {p: pl.crop_loss for p, pl in rep.placements.items() if pl.crop_loss > CROP_WARN}
    if crops:
        worst = max(crops, key=crops.__getitem__)
        out.append(
            f"{len(crops)} image(s) lose more than {CROP_WARN:.0%} to the centre crop (worst {worst}: "
            f"{crops[worst]:.0%}); crop them yourself to their bucket's aspect so the subject stays in frame"
        )
    up = {p: s for p, s in rep.upscaled.items() if s > UPSCALE_WARN}
    if up:
        worst = max(up, key=up.__getitem__)
        out.append(
            f"{len(up)} image(s) are upscaled by the trainer (worst {worst}: x{up[worst]:.2f}); "
            "replace them with larger originals, or use --no-upscale"
        )
    zero = [p for p, pl in rep.placements.items() if 0 in pl.bucket]
    if zero:
        out.append(
            f"{len(zero)} image(s) get a bucket side of 0 (a side under {rep.settings.step} px after scaling: "
            f"tiny or extremely elongated, e.g. {zero[0]}); sd-scripts fails on these: remove or crop them"
        )
    return out


def bucket_images(
    manifest: Manifest, settings: BucketSettings | None = None, *, store: bool = True
) -> BucketReport:
    """Assign every kept image to its trainer bucket; store bucket_w/bucket_h and the settings."""
    settings = settings or BucketSettings()
    images = manifest.kept_images()
    if not images and store:  # the report's preview (store=False) shows an empty table instead
        raise CurateError(manifest.nothing_kept("bucket"))
    buckets = None if settings.no_upscale else settings.buckets()
    rep = BucketReport(settings)
    updates: dict[str, dict[str, Any]] = {
        r.sha256: {"bucket_w": None, "bucket_h": None} for r in manifest.images(include_errors=True)
    }
    from ..export.kohya import zero_repeat_folder, zero_repeat_warnings

    for rec in images:
        if not rec.width or not rec.height:
            continue
        pl = place(rec.width, rec.height, settings, buckets)
        updates[rec.sha256] = {"bucket_w": pl.bucket[0], "bucket_h": pl.bucket[1]}
        if zero_repeat_folder(rec.path) is None:  # a 0_name folder is bucketed but trains in no bucket
            rep.placements[rec.path] = pl
    rep.counts = dict(sorted(Counter(pl.bucket for pl in rep.placements.values()).items()))
    rep.warnings = zero_repeat_warnings([r.path for r in images]) + _warnings(rep)
    if store:
        manifest.update_images(updates.items())
        manifest.set_meta(META_KEY, json.dumps(asdict(settings)))
    return rep


def stored_settings(manifest: Manifest) -> BucketSettings | None:
    """The settings of the last stored `curate bucket` run, if any."""
    raw = manifest.get_meta(META_KEY)
    if not raw:
        return None
    try:
        return BucketSettings(**json.loads(raw))
    except CurateError as exc:
        raise CurateError(
            f"the stored `curate bucket` settings are invalid ({exc}); run `curate bucket` again"
        ) from None


def report_section(manifest: Manifest) -> str:
    """HTML for `curate report`: images per bucket and the preflight warnings (empty before bucketing)."""
    settings = stored_settings(manifest)
    if settings is None:
        return ""
    rep = bucket_images(manifest, settings, store=False)
    s = settings
    parts = [
        f"<h2>Buckets ({len(rep.counts)})</h2><p>resolution {s.resolution}, sides {s.min_size}-{s.max_size}, "
        f"step {s.step}{', no upscale' if s.no_upscale else ''}; mean crop loss {rep.mean_crop:.1%}, "
        f"{len(rep.upscaled)} upscaled</p><table><tr><th>bucket</th><th>aspect</th><th>images</th></tr>",
    ]
    for (w, h), n in rep.counts.items():
        cls = ' style="color:#c33"' if n <= SMALL_BUCKET else ""
        parts.append(f"<tr{cls}><td>{w}x{h}</td><td>{w / h:.2f}</td><td>{n}</td></tr>")
    parts.append("</table>")
    if rep.warnings:
        parts.append("<ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in rep.warnings) + "</ul>")
    return "\n".join(parts)
