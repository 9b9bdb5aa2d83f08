"""File discovery, robust decoding (EXIF orientation, odd modes, bad files) and atomic writes."""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image, ImageFile, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
STATE_DIR = ".curate"
TMP_PREFIX = ".curate-tmp-"  # atomic_write's temporary sibling (hidden, so never scanned as an image)
# Decompression-bomb limit: images with more pixels than this are rejected without decoding.
DEFAULT_MAX_PIXELS = 40_000 * 40_000 // 10  # 160 MP

ImageFile.LOAD_TRUNCATED_IMAGES = False


class DecodeError(Exception):
    """An image that cannot be used, with a short machine-readable reason and a human detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Decoded:
    """An RGB image ready for metrics plus what we learned while decoding it."""

    image: Image.Image  # RGB, EXIF-transposed, possibly reduced by JPEG draft
    width: int  # full size after EXIF orientation
    height: int
    format: str
    mode: str  # original mode
    n_frames: int = 1
    flags: list[str] = field(default_factory=list)


def iter_image_files(
    root: Path, *, exclude: tuple[str, ...] = (STATE_DIR,), linked_dirs: list[str] | None = None
) -> Iterator[Path]:
    """Yield image-like files under ``root`` (by extension), skipping hidden and state folders.

    Broken symlinks are yielded too, so the scan can report them. Symlinked folders are not followed;
    their paths (relative to ``root``) are appended to ``linked_dirs`` when given, so the scan can say so.
    """
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in exclude)
        if linked_dirs is not None:
            linked_dirs += [
                (Path(dirpath) / d).relative_to(root).as_posix()
                for d in dirnames
                if os.path.islink(os.path.join(dirpath, d))
            ]
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield Path(dirpath) / name


class PathOutside(ValueError):
    """A relative path (from the manifest or an index) that would leave the dataset root."""


def lexical_escape(rel: str) -> str | None:
    """Why the relative path ``rel`` (as the manifest stores it) would leave the dataset, or None."""
    if not rel or "\0" in rel:
        return "empty path"
    pure = PurePosixPath(rel)
    if pure.is_absolute() or re.match(r"^[A-Za-z]:[\\/]", rel):
        return "an absolute path"
    if any(part == ".." for part in pure.parts) or pure.name in ("", ".", ".."):
        return "a path that goes up with .."
    if pure.parts[0] == STATE_DIR:
        return f"inside {STATE_DIR}/, curate's own folder"
    return None


def inside(root: str | os.PathLike, rel: str) -> Path:
    """``root / rel`` if ``rel`` is a clean relative path that stays inside ``root``, else PathOutside(why).

    The folders on the way are resolved (a symlinked folder leading out is refused); the last component
    is not followed, so a symlink inside the dataset is the link itself, never the file it points to.
    """
    why = lexical_escape(rel)
    if why:
        raise PathOutside(why)
    pure = PurePosixPath(rel)
    root_real = os.path.realpath(root)
    parent = os.path.realpath(os.path.join(root_real, *pure.parts[:-1]))
    if os.path.commonpath([parent, root_real]) != root_real:
        raise PathOutside("a folder on the way is a symlink that leads out of the dataset")
    return Path(root) / pure


def _flatten_alpha(img: Image.Image, flags: list[str]) -> Image.Image:
    """Composite images with real transparency onto white (what trainers would see) and flag them."""
    rgba = img.convert("RGBA")
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] < 255:
        flags.append("alpha")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(img: Image.Image, flags: list[str]) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "CMYK":
        flags.append("cmyk")
        return img.convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        flags.append("16bit")
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _flatten_alpha(img, flags)
    return img.convert("RGB")


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = 512
) -> Decoded:
    """Decode bytes into an RGB image, raising DecodeError with a reason for anything unusable.

    For JPEG, ``draft_size`` lets libjpeg decode at a reduced scale (never below ``draft_size``
    on the short side), which is what makes scanning large photos cheap.
    """
    if not data:
        raise DecodeError("empty", "zero-byte file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise DecodeError("bomb", str(exc).split(".")[0]) from None
        except Image.DecompressionBombWarning as exc:
            raise DecodeError("bomb", str(exc).split(".")[0]) from None
        except Exception:
            raise DecodeError("not-an-image", "not a readable image file") from None
        fmt = img.format or "?"
        w0, h0 = img.size
        if w0 * h0 > max_pixels:
            raise DecodeError("bomb", f"{w0}x{h0} = {w0 * h0} pixels exceeds the limit of {max_pixels}")
        if w0 == 0 or h0 == 0:
            raise DecodeError("corrupt", "image has zero width or height")
        mode = img.mode
        n_frames = int(getattr(img, "n_frames", 1) or 1)
        flags: list[str] = []
        if n_frames > 1:
            flags.append("animated")
        # EXIF orientation: swap the reported size for rotated orientations (5..8).
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:
            orientation = 1
        width, height = (h0, w0) if orientation in (5, 6, 7, 8) else (w0, h0)
        if orientation not in (1, None):
            flags.append("exif-rotated")
        try:
            if fmt == "JPEG" and draft_size and min(w0, h0) > 2 * draft_size:
                scale = min(w0, h0) / draft_size
                img.draft("RGB" if mode != "CMYK" else "CMYK", (int(w0 / scale), int(h0 / scale)))
            img.load()
        except Image.DecompressionBombError as exc:
            raise DecodeError("bomb", str(exc).split(".")[0]) from None
        except OSError as exc:
            msg = str(exc)
            if "truncated" in msg or "broken data stream" in msg or "premature end" in msg.lower():
                raise DecodeError("truncated", "file is truncated (incomplete download?)") from None
            raise DecodeError("corrupt", msg.splitlines()[0][:200] if msg else "undecodable data") from None
        except Exception as exc:  # any decoder failure is a property of the file, not a crash
            raise DecodeError("corrupt", f"{type(exc).__name__}: {str(exc)[:160]}") from None
        if orientation not in (1, None):
            img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img, flags)
    return Decoded(rgb, width, height, fmt, mode, n_frames, flags)


def open_rgb(path: str | os.PathLike, max_side: int | None = None) -> Image.Image:
    """Open an image file as RGB with EXIF orientation applied (used by taggers, exporters, trainers)."""
    data = Path(path).read_bytes()
    dec = decode_image(data, draft_size=max_side)
    img = dec.image
    if max_side and max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return img


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Write a file via a temporary sibling and an atomic rename; the target is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A short temp name: the target's own name may already be at the 255-byte limit of a file name.
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    try:
        with open(fd, mode, encoding=encoding if "b" not in mode else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:  # name the target, not the temp file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def atomic_write_texts(files: dict[Path, str], workers: int = 16) -> None:
    """Write many small files, each atomically (temporary sibling, fsync, rename), on a few threads: one
    fsync after another costs a journal commit each, concurrent ones share commits. Raises the first error
    after every other file is written."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item: tuple[Path, str]) -> None:
        atomic_write_text(item[0], item[1])

    if not files:
        return
    with ThreadPoolExecutor(max(1, min(workers, len(files)))) as pool:
        futures = [pool.submit(one, item) for item in files.items()]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def write_thumbnail(root: Path, rel: str, out: Path, size: int) -> bool:
    """A JPEG thumbnail (longest side ``size``) of ``root/rel``, or of its quarantined copy once decisions were
    applied, written atomically to ``out`` unless it is there already; False when the image cannot be decoded."""
    if out.exists():
        return True
    src = root / rel
    if not src.exists():  # applied decisions live in the quarantine
        src = root / STATE_DIR / "quarantine" / rel
    try:
        img = open_rgb(src, max_side=size * 2)
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        img.save(tmp, "JPEG", quality=85)
        tmp.replace(out)
    except Exception:
        return False
    return True
