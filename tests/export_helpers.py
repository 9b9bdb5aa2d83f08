"""Builds small datasets in code for the split / bucket / export / plan tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from curate.dataset import Dataset

SIZES = [(640, 480), (480, 640), (512, 512), (800, 450), (600, 900), (700, 500)]


def smooth_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A random low-frequency picture: distinct pHash per seed, robust to resizing and JPEG."""
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def near_copy(img: Image.Image, k: int) -> bytes:
    """Re-sized, re-compressed and slightly brightened copy: a near-duplicate, not an exact one."""
    w, h = img.size
    out = img.resize((int(w * (0.9 - 0.05 * k)), int(h * (0.9 - 0.05 * k))), Image.Resampling.LANCZOS)
    arr = np.clip(np.asarray(out, np.int16) + 6 * (k + 1), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=80 - 5 * k)
    return buf.getvalue()


def build(
    root: Path, n_unique: int = 24, families: int = 6, copies: int = 2, seed: int = 0
) -> dict[str, list[str]]:
    """Write ``n_unique`` distinct images; the first ``families`` get ``copies`` near-duplicates each.

    Returns family name -> relative paths (the original first). Files go into two sub-folders.
    """
    rng = np.random.default_rng(seed)
    fams: dict[str, list[str]] = {}
    for d in ("a", "b"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n_unique):
        img = smooth_image(rng, SIZES[i % len(SIZES)])
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        rel = f"{sub.name}/img{i:03d}.png"
        img.save(root / rel)
        if i < families:
            fams[f"f{i}"] = [rel]
            for k in range(copies):
                crel = f"{'b' if i % 2 else 'a'}/copy{i:03d}_{k}.jpg"
                (root / crel).write_bytes(near_copy(img, k))
                fams[f"f{i}"].append(crel)
    return fams


def scanned(root: Path, **kw) -> tuple[Dataset, dict[str, list[str]]]:
    fams = build(root, **kw)
    ds = Dataset.open(root)
    ds.scan()
    return ds, fams


_TEMPLATES: dict[tuple, tuple[Path, dict[str, list[str]]]] = {}


def fresh_copy(factory, dest: Path, **kw) -> tuple[Dataset, dict[str, list[str]]]:
    """A scanned dataset at ``dest``; built and scanned once per session, then copied (mtimes kept)."""
    import shutil

    key = tuple(sorted(kw.items()))
    if key not in _TEMPLATES:
        root = factory.mktemp("template")
        _, fams = scanned(root, **kw)
        _TEMPLATES[key] = (root, fams)
    root, fams = _TEMPLATES[key]
    shutil.copytree(root, dest, copy_function=shutil.copy2)
    return Dataset.open(dest, create=False), fams
