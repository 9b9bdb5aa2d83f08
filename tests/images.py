"""Images built in code for tests (never downloaded)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image


def textured(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour fields plus edges and fine texture (phash-distinct per seed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(1, 6, 2).tolist() + [rng.uniform(0, 6.28)]
        img[..., c] = 127 + 80 * np.sin(fx * xx / w * 6.28 + ph) * np.cos(fy * yy / h * 6.28)
    for _ in range(12):  # rectangles give strong edges
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        x1, y1 = x0 + rng.integers(8, max(9, w // 3)), y0 + rng.integers(8, max(9, h // 3))
        img[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
    small = rng.uniform(-40, 40, (h // 4 + 1, w // 4 + 1, 3))
    img += np.kron(small, np.ones((4, 4, 1)))[:h, :w]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, quality: int = 92, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file outside .curate (what 'no user file changed' means)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] == ".curate" or p.is_dir():
            continue
        if p.is_symlink():
            out[str(rel)] = "link->" + str(p.readlink())
        else:
            try:
                out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
            except PermissionError:
                out[str(rel)] = "unreadable"
    return out
