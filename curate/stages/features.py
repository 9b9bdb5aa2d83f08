"""Per-image dedupe features, computed from scan's single decode and stored in the manifest.

What is stored (table ``dedupe_features``, one row per content hash):
- a small grey copy (``THUMB_SIDE`` px, JPEG q90) that pair verification warps and correlates, so re-grouping
  never decodes the original file again;
- multi-crop pHash codes: centre crops at 100/85/70 %, each also mirrored (6 x 64 bits);
- ORB keypoints and descriptors of the grey copy and of its mirror image;
- keeper signals: fine-detail ratio (upscale test), border/padding fraction, colourfulness,
  JPEG quality from the quantisation tables.
OpenCV (``cv2``) is imported inside the functions that need it.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

FEATURE_VERSION = 2  # 2: + the band-stripped code, marker rows
THUMB_SIDE = 384  # long side of the grey copy used for ORB, RANSAC and NCC
N_KEYPOINTS = 300
CROPS = (1.0, 0.85, 0.70)

TABLE_DDL = """
CREATE TABLE IF NOT EXISTS dedupe_features (
    sha256   TEXT PRIMARY KEY,
    version  INTEGER NOT NULL,
    thumb    BLOB NOT NULL,      -- grey JPEG q90, long side THUMB_SIDE
    codes    BLOB NOT NULL,      -- 8 x uint64 pHash: crop 100/85/70 % plain, then mirrored, then band-stripped plain/mirrored
    orb      BLOB NOT NULL,      -- zlib of raw keypoints + descriptors, see pack_orb
    signals  TEXT NOT NULL       -- JSON keeper signals
);
"""


_CV2: list[bool] = []


def have_cv2() -> bool:
    """True when OpenCV can be imported (it powers ORB, RANSAC and warping)."""
    if not _CV2:
        try:
            import cv2  # noqa: F401

            _CV2.append(True)
        except ImportError:
            _CV2.append(False)
    return _CV2[0]


@dataclass
class Features:
    """Decoded dedupe features of one image."""

    thumb: np.ndarray  # uint8 (h, w)
    codes: np.ndarray  # uint64 (6,)
    kp: np.ndarray  # float32 (n, 2), thumb coordinates
    desc: np.ndarray  # uint8 (n, 32)
    mkp: np.ndarray  # keypoints of the mirrored thumb
    mdesc: np.ndarray
    signals: dict[str, Any] = field(default_factory=dict)


# -- computing --------------------------------------------------------------------------------------
def _phash_u64(img: Image.Image) -> int:
    import imagehash

    return int(str(imagehash.phash(img)), 16)


def _orb(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    orb = cv2.ORB_create(nfeatures=N_KEYPOINTS, scaleFactor=1.2, nlevels=8, edgeThreshold=15, fastThreshold=7)
    kps, desc = orb.detectAndCompute(grey, None)
    if desc is None or not kps:
        return np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
    order = np.argsort([-k.response for k in kps], kind="stable")  # strongest first: the index uses a prefix
    return np.array([kps[k].pt for k in order], np.float32), desc[order].astype(np.uint8)


def jpeg_quality(data: bytes | None) -> float | None:
    """libjpeg-style quality (1-100) estimated from the luma quantisation table; None if not a JPEG."""
    if not data or data[:2] != b"\xff\xd8":
        return None
    try:
        q = Image.open(io.BytesIO(data)).quantization  # header only, no decode
    except Exception:
        return None
    if not q or 0 not in q:
        return None
    table = np.array(q[0], np.float64)[:64]
    std = np.array(_STD_LUMA, np.float64)
    # Tables are stored in zigzag order by Pillow; the mean ratio is order independent.
    scale = float(np.mean(table) / np.mean(std)) * 100.0
    quality = (200.0 - scale) / 2.0 if scale <= 100 else 5000.0 / scale
    return round(float(np.clip(quality, 1, 100)), 1)


_STD_LUMA = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]  # fmt: skip


DETAIL_SIDE = 768  # the detail ratio is measured on a centre crop of at most this side, at native scale


def _native_detail(rgb: Image.Image, grey: np.ndarray, data: bytes | None) -> float | None:
    """Detail ratio at native resolution; scan decodes big JPEGs at reduced scale, so those are decoded
    again in grey (cheaper than RGB) just for this. None when that fails."""
    try:
        if data:
            img = Image.open(io.BytesIO(data))
            if sorted(img.size) != sorted(rgb.size):
                if img.size[0] * img.size[1] > 50_000_000:
                    return None
                img.draft("L", img.size)
                grey = np.asarray(img.convert("L"))
        h, w = grey.shape
        s = DETAIL_SIDE
        y0, x0 = max(0, (h - s) // 2), max(0, (w - s) // 2)
        return detail_ratio(grey[y0 : y0 + s, x0 : x0 + s])
    except Exception:
        return None


def detail_ratio(grey: np.ndarray) -> float:
    """Fine detail over coarse detail: energy lost by a 2x down/up resample relative to a 4x one.

    An upscaled image has (almost) nothing between half and full Nyquist, so its ratio is far lower
    than a native photo's; comparing it within a group tells an upscale from the original.
    """
    import cv2

    h, w = grey.shape
    if min(h, w) < 32:
        return 0.0
    g = grey.astype(np.float32)

    def loss(f: int) -> float:
        small = cv2.resize(g, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
        back = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        return float(np.mean(np.abs(g - back)))

    coarse = loss(4)
    return round(loss(2) / coarse, 4) if coarse > 1e-3 else 0.0


def border_fraction(rgb: np.ndarray) -> float:
    """Fraction of the area in flat bars along the edges (letterbox, padding, caption bars)."""
    h, w = rgb.shape[:2]
    grey = rgb.astype(np.float32).mean(axis=2)
    total = 0.0
    for side in range(4):
        a = np.rot90(grey, side)  # edge under test becomes the top rows
        n = 0
        ref = np.median(a[0])
        for row in a[: a.shape[0] // 2]:
            med = np.median(row)
            if abs(med - ref) > 8 or np.mean(np.abs(row - med) <= 6) < 0.9:
                break
            n += 1
        total += n / a.shape[0]
    return round(min(1.0, total), 4) if total * min(h, w) >= 2 else 0.0


def bands(grey: np.ndarray) -> list[float]:
    """Loose caption-bar detector: share of the frame, per side (top, right, bottom, left), in rows of one
    flat fill value, possibly crossed by text (white bar with black text, letterbox). Keypoints there are
    ignored in matching, so two different photos under the same caption do not match on the text."""
    out = []
    for side in range(4):
        a = np.rot90(grey, side).astype(np.int16)  # the side under test becomes the top rows
        ref = int(np.median(a[0]))
        end = 0
        for r, row in enumerate(a[: a.shape[0] // 3]):
            share = float(np.mean(np.abs(row - ref) <= 6))
            if share < 0.35:  # neither fill nor text on fill: the picture starts
                break
            if share >= 0.9:
                end = r + 1
        out.append(round(end / a.shape[0], 4) if end >= 3 else 0.0)
    # np.rot90(x, k) turns counter-clockwise: k=1 brings the right edge to the top, k=3 the left edge
    return out


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler-Suesstrunk colourfulness; near 0 for grey copies."""
    r, g, b = (rgb[..., k].astype(np.float32) for k in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return round(float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())), 3)


def extract(rgb: Image.Image, data: bytes | None = None) -> dict[str, Any]:
    """Compute the stored feature row of one decoded RGB image (``data``: its file bytes, for JPEG tables)."""
    import cv2

    cv2.setNumThreads(1)
    full_grey = np.asarray(rgb.convert("L"))
    small = rgb.copy()
    small.thumbnail((128, 128), Image.Resampling.BILINEAR)
    small_rgb = np.asarray(small)
    w0, h0 = rgb.size
    scale = THUMB_SIDE / max(w0, h0)
    size = (max(1, round(w0 * scale)), max(1, round(h0 * scale)))
    grey_img = Image.fromarray(full_grey)
    if size != (w0, h0):  # Lanczos keeps the contrast of small detail (stars, texture) that ORB needs
        grey_img = grey_img.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0 if scale < 1 else None)
    thumb = np.asarray(grey_img)
    mirror = np.ascontiguousarray(thumb[:, ::-1])
    codes = []
    for m in (grey_img, Image.fromarray(mirror)):
        w, h = m.size
        for c in CROPS:
            cw, ch = max(8, round(w * c)), max(8, round(h * c))
            x0, y0 = (w - cw) // 2, (h - ch) // 2
            codes.append(_phash_u64(m.crop((x0, y0, x0 + cw, y0 + ch))))
    b = bands(thumb)
    # 7th and 8th codes: the frame without its flat edge bands (caption bar, letterbox), plain and mirrored,
    # so a meme's photo area meets the original's full-frame code
    w, h = grey_img.size
    top, right, bottom, left = b
    box = (round(left * w), round(top * h), w - round(right * w), h - round(bottom * h))
    if box[2] - box[0] < 8 or box[3] - box[1] < 8:
        box = (0, 0, w, h)
    inner = grey_img.crop(box)
    codes += [_phash_u64(inner), _phash_u64(inner.transpose(Image.Transpose.FLIP_LEFT_RIGHT))]
    kp, desc = _orb(thumb)
    mkp, mdesc = _orb(mirror)
    signals = {
        "detail": _native_detail(rgb, full_grey, data),
        "border": border_fraction(small_rgb),
        "colour": colourfulness(small_rgb),
        "jpeg_q": jpeg_quality(data),
        "bands": b,
        "thumb": list(thumb.shape),
        "decoded": list(rgb.size),
    }
    buf = io.BytesIO()
    grey_img.save(buf, "JPEG", quality=90)
    return {
        "version": FEATURE_VERSION,
        "thumb": buf.getvalue(),
        "codes": np.array(codes, np.uint64).tobytes(),
        "orb": pack_orb(kp, desc, mkp, mdesc),
        "signals": json.dumps(signals),
    }


MIN_SIDE = 16  # smaller than this on either side: too small to describe


def marker(why: str) -> dict[str, Any]:
    """A feature row that says "nothing to describe" (too small, undecodable), so re-grouping skips it
    without decoding the file again; :func:`load_light` and :class:`FeatureCache` leave it out."""
    return {
        "version": FEATURE_VERSION,
        "thumb": b"",
        "codes": b"",
        "orb": b"",
        "signals": json.dumps({"none": why}),
    }


def safe_extract(rgb: Image.Image, data: bytes | None = None) -> dict[str, Any] | None:
    """:func:`extract`; a :func:`marker` row when the image is too small to describe; None when OpenCV
    is missing or extraction failed (dedupe then computes the row itself)."""
    if not have_cv2():
        return None
    if min(rgb.size) < MIN_SIDE:
        return marker("too small")
    try:
        return extract(rgb, data)
    except Exception:  # features are an optimisation; dedupe computes missing ones itself
        return None


def pack_orb(kp: np.ndarray, desc: np.ndarray, mkp: np.ndarray, mdesc: np.ndarray) -> bytes:
    """Two keypoint sets as raw bytes: [n, m] uint16, then float16 coords and uint8 descriptors."""
    head = np.array([len(kp), len(mkp)], np.uint16).tobytes()
    body = b"".join(
        [kp.astype(np.float16).tobytes(), desc.tobytes(), mkp.astype(np.float16).tobytes(), mdesc.tobytes()]
    )
    return zlib.compress(head + body, 1)


def unpack_orb(blob: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    raw = zlib.decompress(blob)
    n, m = np.frombuffer(raw[:4], np.uint16).tolist()
    out, off = [], 4
    for count in (n, m):
        kp = np.frombuffer(raw, np.float16, count * 2, off).reshape(count, 2).astype(np.float32)
        off += count * 4
        desc = np.frombuffer(raw, np.uint8, count * 32, off).reshape(count, 32)
        off += count * 32
        out += [kp, desc]
    return out[0], out[1], out[2], out[3]


def decode_row(row: Any) -> Features:
    """A stored feature row back into arrays."""
    thumb = np.asarray(Image.open(io.BytesIO(row["thumb"])).convert("L"))
    kp, desc, mkp, mdesc = unpack_orb(row["orb"])
    return Features(
        thumb, np.frombuffer(row["codes"], np.uint64).copy(), kp, desc, mkp, mdesc, json.loads(row["signals"])
    )


# -- manifest storage --------------------------------------------------------------------------------
def ensure(manifest) -> None:
    """Create the table once per connection; a plain execute, so it also works inside scan's transaction."""
    if getattr(manifest, "_dedupe_features_ready", False):
        return
    manifest.conn.execute(TABLE_DDL.strip().rstrip(";"))
    manifest._dedupe_features_ready = True


def store(manifest, sha256: str, feat: dict[str, Any] | None) -> None:
    """Write one image's feature row (inside the caller's transaction)."""
    if not feat:
        return
    ensure(manifest)
    manifest.conn.execute(
        "INSERT OR REPLACE INTO dedupe_features(sha256, version, thumb, codes, orb, signals) VALUES (?,?,?,?,?,?)",
        (sha256, feat["version"], feat["thumb"], feat["codes"], feat["orb"], feat["signals"]),
    )


def missing(manifest, shas: Iterable[str]) -> list[str]:
    """Content hashes with no current feature row (scanned before features existed, or older version)."""
    ensure(manifest)
    have = {
        r[0]
        for r in manifest.conn.execute(
            "SELECT sha256 FROM dedupe_features WHERE version=?", (FEATURE_VERSION,)
        )
    }
    return [s for s in shas if s not in have]


def _compute_file(path: str) -> dict[str, Any] | None:
    """Worker: decode one file and compute its features (None when it cannot be decoded)."""
    from pathlib import Path

    from ..io import DecodeError, decode_image

    try:
        data = Path(path).read_bytes()
        dec = decode_image(data)
    except (OSError, DecodeError):
        return marker("undecodable")
    return safe_extract(dec.image, data)


def compute_files(paths: list[str]) -> list[dict[str, Any] | None]:
    """Task: :func:`_compute_file` for a chunk of paths (the dataset folder must be visible to the worker)."""
    return [_compute_file(p) for p in paths]


def backfill(
    manifest,
    todo: dict[str, str],
    progress: Callable[[int, int], None] | None = None,
    workers: int = 0,
    mapper: Callable[..., Any] | None = None,
    chunk: int = 16,
) -> int:
    """Compute features for images scanned before this version (sha -> a path); returns how many were done.

    ``mapper(fn, calls)`` runs chunks of files elsewhere (Ray); rows are stored here as they come back.
    """
    import os

    if not todo:
        return 0
    ensure(manifest)
    items = list(todo.items())
    paths = [str(manifest.root / p) for _, p in items]
    workers = workers or os.cpu_count() or 1
    if progress:
        progress(0, len(items))
    done = 0

    def results():
        if mapper is not None:
            calls = ((paths[k : k + chunk],) for k in range(0, len(paths), chunk))
            for res in mapper(compute_files, calls):
                yield from res
            return
        if workers <= 1 or len(items) < 8:
            yield from map(_compute_file, paths)
            return
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            yield from pool.map(_compute_file, paths, chunksize=4)

    with manifest.transaction():
        for k, feat in enumerate(results(), 1):
            if feat is not None:
                store(manifest, items[k - 1][0], feat)
                done += 1
            if progress:
                progress(k, len(items))
    return done


def raw_rows(manifest, shas: Iterable[str]) -> dict[str, dict[str, bytes]]:
    """Stored feature rows (as :func:`decode_row` reads them) of the given hashes; marker rows left out."""
    out = {}
    for sha in shas:
        row = manifest.conn.execute(
            "SELECT thumb, codes, orb, signals FROM dedupe_features WHERE sha256=?", (sha,)
        ).fetchone()
        if row is not None and row[1]:
            out[sha] = {"thumb": row[0], "codes": row[1], "orb": row[2], "signals": row[3]}
    return out


@dataclass
class Light:
    """What candidate search needs for every image at once: hash codes, index descriptors, signals."""

    codes: np.ndarray  # uint64 (6,)
    desc: np.ndarray  # the strongest K_INDEX descriptors of the image
    mdesc: np.ndarray  # ... and of its mirror
    signals: dict[str, Any]


K_INDEX = 100


def load_light(manifest, shas: list[str]) -> dict[str, Light]:
    """Candidate-search data for the given content hashes (thumbnails stay on disk)."""
    ensure(manifest)
    want = set(shas)
    out: dict[str, Light] = {}
    for sha, codes, orb, signals in manifest.conn.execute(
        "SELECT sha256, codes, orb, signals FROM dedupe_features WHERE version=?", (FEATURE_VERSION,)
    ):
        if sha in want and codes:  # empty codes: a marker row, nothing to describe
            kp, desc, mkp, mdesc = unpack_orb(orb)
            sig = json.loads(signals)
            b = sig.get("bands")
            if b and any(b):  # the strongest keypoints outside caption bars and letterbox
                from .local_match import _outside_bands

                shape = tuple(sig.get("thumb", (0, 0))) or None
                if shape and shape[0]:
                    desc = desc[_outside_bands(kp, shape, b, False)]
                    mdesc = mdesc[_outside_bands(mkp, shape, b, True)]
            out[sha] = Light(
                np.frombuffer(codes, np.uint64).copy(), desc[:K_INDEX].copy(), mdesc[:K_INDEX].copy(), sig
            )
    return out


class FeatureCache:
    """Full features (thumb + all keypoints) read on demand, a bounded number kept in memory."""

    def __init__(self, manifest, size: int = 256):
        self.manifest, self.size = manifest, size
        self._cache: dict[str, Features] = {}

    def get(self, sha: str) -> Features | None:
        hit = self._cache.pop(sha, None)
        if hit is None:
            row = self.manifest.conn.execute(
                "SELECT thumb, codes, orb, signals FROM dedupe_features WHERE sha256=?", (sha,)
            ).fetchone()
            if row is None or not row[1]:
                return None
            hit = decode_row(row)
        self._cache[sha] = hit  # most recent last
        if len(self._cache) > self.size:
            self._cache.pop(next(iter(self._cache)))
        return hit
