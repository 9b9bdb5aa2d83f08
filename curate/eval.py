"""Dedupe evaluation: a real-photo ground-truth set built from photos that installed packages bundle.

Sources: scikit-image's sample photos, scikit-learn's two sample images and matplotlib's Grace Hopper
(whichever are installed). Every source gets one copy per transform family (the way scrapers repost:
resize, upscale, recompress, crops, mirror, flip+crop, rotation, letterbox/border, caption-bar meme,
text overlay, grey, hue shift, perspective). Hard negatives: disjoint crops of photos that are not
otherwise in the set, and different photos under the same caption bar (the memes share one text).

``build_set(folder)`` writes the images and returns the truth; ``score(groups, truth)`` gives pairwise
precision / recall / F1 overall and per transform, mixed groups, linked hard negatives and keeper accuracy.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

TRANSFORMS = (
    "resize", "upscale", "recompress", "crop10", "crop25", "crop40", "mirror", "flip_crop", "rotate",
    "rotate_crop", "letterbox", "border", "meme", "overlay", "grey", "hue", "perspective",
)  # fmt: skip
# transform family of each transform (for the per-family table)
FAMILY = {
    "resize": "resize", "upscale": "resize", "recompress": "recompress", "crop10": "crop", "crop25": "crop",
    "crop40": "crop", "mirror": "mirror", "flip_crop": "flip+crop", "rotate": "rotation",
    "rotate_crop": "rotation", "letterbox": "letterbox", "border": "letterbox", "meme": "meme",
    "overlay": "meme", "grey": "grey", "hue": "hue", "perspective": "perspective",
}  # fmt: skip
# Which copy a person would keep: the original, except for a colour-free source's grey copy (same pixels).
NEG_PREFIX = "neg_"


def _skimage_photos() -> dict[str, Path]:
    try:
        import skimage
    except ImportError:
        return {}
    d = Path(skimage.__file__).parent / "data"
    names = {
        "astronaut": "astronaut.png", "chelsea": "chelsea.png", "coffee": "coffee.png", "rocket": "rocket.jpg",
        "motorcycle": "motorcycle_left.png", "hubble": "hubble_deep_field.jpg", "retina": "retina.jpg",
        "ihc": "ihc.png", "camera": "camera.png", "coins": "coins.png", "moon": "moon.png",
    }  # fmt: skip
    return {k: d / v for k, v in names.items() if (d / v).exists()}


def source_photos() -> dict[str, Path]:
    """name -> path of every bundled real photo found in the installed packages."""
    out = _skimage_photos()
    try:
        import sklearn.datasets

        d = Path(sklearn.datasets.__file__).parent / "images"
        out.update({k: d / f"{k}.jpg" for k in ("china", "flower") if (d / f"{k}.jpg").exists()})
    except ImportError:
        pass
    try:
        import matplotlib

        p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if p.exists():
            out["hopper"] = p
    except ImportError:
        pass
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _jpeg(img: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _crop(img: Image.Image, frac: float, rng: np.random.Generator) -> Image.Image:
    """Remove ``frac`` of each side length, at a random offset."""
    w, h = img.size
    cw, ch = round(w * (1 - frac)), round(h * (1 - frac))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def caption_bar(img: Image.Image, text: str = "WHEN THE LORA FINALLY WORKS") -> Image.Image:
    """A meme repost: a white bar with black text above the photo."""
    w, h = img.size
    bar = max(24, h // 5)
    out = Image.new("RGB", (w, h + bar), "white")
    out.paste(img, (0, bar))
    d = ImageDraw.Draw(out)
    d.text((w // 2, bar // 2), text, fill="black", font=_font(max(10, bar // 3)), anchor="mm")
    return out


def transform(img: Image.Image, name: str, seed: int = 0) -> Image.Image:
    """One scraper-style copy of ``img``."""
    rng = np.random.default_rng(seed)
    w, h = img.size
    if name == "resize":
        return img.resize((w // 2, h // 2), Image.Resampling.LANCZOS)
    if name == "upscale":
        return img.resize((w * 2, h * 2), Image.Resampling.BICUBIC)
    if name == "recompress":
        return _jpeg(img, 30)
    if name.startswith("crop"):
        return _crop(img, int(name[4:]) / 100, rng)
    if name == "mirror":
        return ImageOps.mirror(img)
    if name == "flip_crop":
        return _crop(ImageOps.mirror(img), 0.2, rng)
    if name == "rotate":
        return img.rotate(
            float(rng.choice([-1, 1]) * rng.uniform(5, 12)), Image.Resampling.BICUBIC, expand=True
        )
    if name == "rotate_crop":
        r = img.rotate(float(rng.uniform(12, 20)), Image.Resampling.BICUBIC, expand=False)
        return r.crop((w // 6, h // 6, w - w // 6, h - h // 6))
    if name == "letterbox":
        side = max(w, h) * 5 // 4
        out = Image.new("RGB", (side, side), "black")
        out.paste(img, ((side - w) // 2, (side - h) // 2))
        return out
    if name == "border":
        return ImageOps.expand(img, border=max(8, w // 12), fill=(255, 255, 255))
    if name == "meme":
        return caption_bar(img)
    if name == "overlay":
        out = img.copy()
        d = ImageDraw.Draw(out)
        f = _font(max(12, h // 9))
        for y, t in ((h // 8, "TOP TEXT"), (h - h // 8, "BOTTOM TEXT")):
            d.text((w // 2, y), t, fill="white", font=f, anchor="mm", stroke_width=3, stroke_fill="black")
        return out
    if name == "grey":
        return ImageOps.grayscale(img).convert("RGB")
    if name == "hue":
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + 40) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")
    if name == "perspective":
        dx, dy = w * 0.12, h * 0.08
        src = [(0, 0), (w, 0), (w, h), (0, h)]
        dst = [(dx, dy), (w - dx * 0.3, 0), (w, h), (0, h - dy)]
        coeffs = _perspective_coeffs(dst, src)
        return img.transform((w, h), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC)
    raise ValueError(f"unknown transform {name}")


def _perspective_coeffs(dst: list, src: list) -> list[float]:
    rows = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    a = np.array(rows, np.float64)
    b = np.array([c for p in src for c in p], np.float64)
    return np.linalg.solve(a, b).tolist()


@dataclass
class Truth:
    """Ground truth of a built set: path -> cluster, path -> transform, the originals."""

    cluster: dict[str, str] = field(default_factory=dict)
    transform: dict[str, str] = field(default_factory=dict)  # 'original' for the source itself
    negatives: list[tuple[str, str]] = field(default_factory=list)  # pairs that must never be linked

    def as_dict(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "transform": self.transform, "negatives": self.negatives}


def _save(img: Image.Image, path: Path, quality: int = 95) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        img.save(path)
    else:
        img.save(path, "JPEG", quality=quality)


def build_set(
    folder: str | os.PathLike,
    *,
    transforms: Iterable[str] = TRANSFORMS,
    sources: dict[str, Path] | None = None,
    n_negative_sources: int = 3,
    max_side: int = 640,
) -> Truth:
    """Write originals, their copies and the hard negatives under ``folder``; return the truth."""
    folder = Path(folder)
    photos = sources if sources is not None else source_photos()
    if len(photos) < 2:
        raise RuntimeError("no bundled photos found: pip install scikit-image scikit-learn matplotlib")
    names = sorted(photos)
    neg_names = names[-n_negative_sources:] if len(names) > n_negative_sources + 2 else []
    truth = Truth()
    for k, name in enumerate(names):
        img = Image.open(photos[name]).convert("RGB")
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        if name in neg_names:
            # Four disjoint crops (a gap between them): views of one photo that share no pixel.
            w, h = img.size
            cw, ch = int(w * 0.46), int(h * 0.46)
            boxes = [(0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch)]
            paths = []
            for q, (x0, y0) in enumerate(boxes):
                rel = f"{NEG_PREFIX}{name}_part{q}.png"
                _save(img.crop((x0, y0, x0 + cw, y0 + ch)), folder / rel)
                truth.cluster[rel] = rel
                truth.transform[rel] = "disjoint_crop"
                paths.append(rel)
            truth.negatives += list(combinations(paths, 2))
            continue
        rel = f"{name}/original.png"
        _save(img, folder / rel)
        truth.cluster[rel], truth.transform[rel] = name, "original"
        for t_i, t in enumerate(transforms):
            copy = transform(img, t, seed=k * 100 + t_i)
            rel_t = f"{name}/{t}.jpg"
            _save(copy, folder / rel_t, quality=30 if t == "recompress" else 88)
            truth.cluster[rel_t], truth.transform[rel_t] = name, t
    memes = [p for p, t in truth.transform.items() if t == "meme"]
    truth.negatives += list(combinations(memes, 2))  # same caption bar, different photos
    return truth


def score(groups: list[list[str]], truth: Truth, keepers: dict[int, str] | None = None) -> dict[str, Any]:
    """Pairwise precision / recall / F1 overall and per transform, plus safety numbers.

    ``groups``: lists of paths that a method puts together; ``keepers``: group index -> kept path.
    """
    paths = set(truth.cluster)
    group_of = {}
    for g_i, g in enumerate(groups):
        for p in g:
            if p in paths:
                group_of[p] = g_i
    pred = set()
    for g in groups:
        members = sorted(p for p in g if p in paths)
        pred |= set(combinations(members, 2))
    by_cluster: dict[str, list[str]] = {}
    for p, c in truth.cluster.items():
        by_cluster.setdefault(c, []).append(p)
    true = set()
    for members in by_cluster.values():
        true |= set(combinations(sorted(members), 2))
    tp = len(pred & true)
    out: dict[str, Any] = {"pairs_true": len(true), "pairs_pred": len(pred), "tp": tp}
    out.update(_prf(tp, len(pred), len(true)))
    # per transform: the copy must share a group with its original
    per: dict[str, dict[str, Any]] = {}
    originals = {truth.cluster[p]: p for p, t in truth.transform.items() if t == "original"}
    for t in sorted({t for t in truth.transform.values() if t not in ("original", "disjoint_crop")}):
        copies = [p for p, tt in truth.transform.items() if tt == t]
        found = sum(
            1 for p in copies if p in group_of and group_of.get(originals[truth.cluster[p]]) == group_of[p]
        )
        wrong = sum(1 for a, b in pred if (a in copies or b in copies) and (a, b) not in true)
        involving = sum(1 for a, b in pred if a in copies or b in copies)
        per[t] = {
            "copies": len(copies),
            "found": found,
            "recall": round(found / len(copies), 3) if copies else None,
            "precision": round(1 - wrong / involving, 3) if involving else 1.0,
        }
        r, p_ = per[t]["recall"], per[t]["precision"]
        per[t]["f1"] = round(2 * r * p_ / (r + p_), 3) if r and p_ else 0.0
    out["per_transform"] = per
    fam: dict[str, list[int]] = {}
    for t, v in per.items():
        f = FAMILY.get(t, t)
        fam.setdefault(f, [0, 0])
        fam[f][0] += v["found"]
        fam[f][1] += v["copies"]
    out["recall_per_family"] = {f: round(a / b, 3) for f, (a, b) in sorted(fam.items())}
    neg = [(a, b) for a, b in truth.negatives if a in group_of and group_of.get(b) == group_of[a]]
    out["hard_negatives"] = len(truth.negatives)
    out["hard_negatives_linked"] = len(neg)
    out["mixed_groups"] = sum(1 for g in groups if len({truth.cluster[p] for p in g if p in paths}) > 1)
    if keepers is not None:
        judged = [
            (keepers[g_i], truth.cluster[keepers[g_i]])
            for g_i, g in enumerate(groups)
            if g_i in keepers and keepers[g_i] in paths and originals.get(truth.cluster[keepers[g_i]]) in g
        ]
        good = sum(1 for k, c in judged if k == originals[c])
        out["keeper_original"] = {"groups": len(judged), "original_kept": good}
        out["keeper_original"]["rate"] = round(good / len(judged), 3) if judged else None
        out["wrong_keepers"] = sorted(k for k, c in judged if k != originals[c])
    return out


def _prf(tp: int, n_pred: int, n_true: int) -> dict[str, float]:
    p = tp / n_pred if n_pred else 1.0
    r = tp / n_true if n_true else 1.0
    return {
        "precision": round(p, 4),
        "recall": round(r, 4),
        "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0,
    }
