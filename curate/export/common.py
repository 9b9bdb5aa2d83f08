"""What every exporter shares: the staging folder (atomic, never overwriting), captions, image files.

An export is built in a hidden sibling folder and renamed onto the target in one step, so the target
either does not exist or is complete. Source images are never modified and never share an inode with
the export: files the trainer can read as they are are copied (reflinked where the file system can),
hard- or symlinked only on request; the rest are re-encoded (never in place).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import CurateError
from ..io import open_rgb
from ..manifest import ImageRecord, Manifest
from ..stages.bucket import BucketSettings, place, stored_settings

# Extensions sd-scripts and HF imagefolder both read as they are.
PASSTHROUGH = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# Flags meaning the bytes on disk are not what the trainer should see (sd-scripts ignores EXIF rotation).
REENCODE_FLAGS = {"exif-rotated", "cmyk", "16bit", "alpha", "animated"}
PNG_LEVEL = 1  # zlib level for written PNGs: level 6 is ~5x slower for a few % smaller files
FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int): clone a file's blocks copy-on-write (btrfs, XFS, ...)


@dataclass
class ExportItem:
    """One image to export: where it comes from, its caption, its split and (optionally) its bucket."""

    rec: ImageRecord
    source: Path
    caption: str
    split: str  # train | val
    name: str  # file stem in the export
    caption_file: Path | None = None  # the person's caption file the caption comes from (None: curate's text)


@dataclass
class ExportResult:
    out: Path
    format: str
    train: int = 0
    val: int = 0
    linked: int = 0  # hard or symbolic links (only with --link)
    reflinked: int = 0  # copy-on-write clones: independent files sharing blocks until written
    copied: int = 0
    reencoded: int = 0
    resized: int = 0
    reg: int = 0  # regularization images (kohya --reg)
    files: list[str] = field(default_factory=list)  # config files written (relative to out)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "out": str(self.out)}


def tag_caption(tags: list[str]) -> str:
    """Tags as a caption: comma separated, underscores as spaces (kaomoji like ^_^ kept as they are)."""
    return ", ".join(t.replace("_", " ") if len(t) > 3 else t for t in tags)


def looks_like_tags(text: str) -> bool:
    """True for a comma-separated tag list ("1girl, long hair, smile"), False for a sentence or nothing.

    Tag lists shuffle well (kohya's shuffle_caption); sentences lose their meaning when shuffled.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) < 2:
        return False
    for p in parts:  # a sentence: long clauses, articles ("a photo of a cat"), end punctuation
        words = p.lower().split()
        if len(words) > 4 or {"a", "an", "the"} & set(words) or p.endswith((".", "!", "?")):
            return False
    return True


def one_line(text: str) -> str:
    """The caption on one line, as trainers read only the first: lines of tags are joined with commas
    (a space would fuse the last tag of a line with the first of the next), sentences with a space."""
    lines = [" ".join(ln.split()) for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if len(lines) > 1 and looks_like_tags(", ".join(ln.rstrip(",") for ln in lines)):
        return ", ".join(ln.rstrip(",").rstrip() for ln in lines)
    return " ".join(lines)


def make_caption(rec: ImageRecord, trigger: str | None = None, class_word: str | None = None) -> str:
    """Caption text for one image: the caption a person wrote (or edited), else curate's, else its tags;
    the trigger word is put first when given (prepended when missing, never substituted)."""
    text = (rec.user_caption or "").strip() or (rec.caption or "").strip() or tag_caption(rec.tags or [])
    text = one_line(text)
    if not text:  # what kohya would fall back to (class_tokens); an empty caption file is an error there
        return " ".join(w for w in (trigger, class_word) if w)
    if trigger:
        parts = [p.strip() for p in text.split(",")] if text else []
        if trigger in parts:  # a tag: move it first, where keep_tokens = 1 holds it when captions shuffle
            text = ", ".join([trigger, *(p for p in parts if p != trigger)])
        elif trigger not in text.split():  # a sentence that already names it is left as written
            text = f"{trigger}, {text}" if text else trigger
    return text


def caption_bytes(caption: str, source: Path | None = None) -> bytes:
    """What an exported caption file holds. A person's caption file (``source``) whose text is the caption
    unchanged is kept byte for byte (its own line ending, trailing space or missing final newline), less a
    UTF-8 BOM that sd-scripts would read into the first tag; a caption curate changed (trigger put first,
    lines joined) keeps the file's own ending. curate's own captions end in one newline. sd-scripts reads the
    first line, stripped, so all of these train the same text."""
    raw = None
    if source is not None:
        with contextlib.suppress(OSError):
            raw = source.read_bytes()
    if raw is None:
        return (caption + "\n").encode("utf-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # cp1252 / Latin-1: sd-scripts reads only UTF-8, so it is written as UTF-8
        from ..stages.user_captions import _read_text

        text = _read_text(source) or ""
    text = text.lstrip("\ufeff")
    if text.strip() == caption:
        return text.encode("utf-8")
    return (caption + text[len(text.rstrip()) :]).encode("utf-8")


EXPORT_RECORD = "curate_export.json"  # written by every kohya export; marks a folder as curate's output


def check_target(out: Path, dataset_root: Path, *, replace: bool = False) -> None:
    """Refuse targets that would overwrite anything or land inside the dataset.

    ``replace``: an earlier curate export (it holds curate_export.json) may be replaced as a whole.
    """
    out = out.resolve()
    root = dataset_root.resolve()
    if out == root or root in out.parents:
        raise CurateError(
            f"export target {out} is inside the dataset folder (the next scan would read it); "
            "choose a folder outside it"
        )
    if replace and out.is_dir() and (out / EXPORT_RECORD).is_file():
        foreign = foreign_files(out)
        if foreign:
            raise CurateError(
                f"{out} holds {len(foreign)} file(s) the earlier export did not write (e.g. {foreign[0]}); "
                "the re-export replaces that folder as a whole, so move them out of it (put images in the "
                "dataset and run `curate scan`), then rerun"
            )
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CurateError(
            f"{out} already exists and is not empty; export never overwrites: choose a new folder"
            + (" (it is not a curate export, so curate will not replace it)" if replace else "")
        )


def foreign_files(out: Path) -> list[str]:
    """Files in the earlier export ``out`` that it did not write, nor sd-scripts' latent / text-encoder
    caches beside its images: a person's (an image added by hand, notes), which replacing it would delete."""
    import json

    from ..stages.quarantine import _owners

    try:
        record = json.loads((out / EXPORT_RECORD).read_text("utf-8"))
    except (OSError, ValueError):
        return []
    ours = {EXPORT_RECORD, "dataset.toml", "dataset_val.toml"}
    stems: set[str] = set()
    for im in [*(record.get("images") or []), *(record.get("reg") or [])]:
        f = str(im.get("file", "")) if isinstance(im, dict) else ""
        if f:
            ours |= {f, os.path.splitext(f)[0] + ".txt"}
            stems.add(os.path.splitext(f)[0])
    found = []
    for dirpath, _dirs, files in os.walk(out):
        for name in files:
            rel = Path(dirpath, name).relative_to(out).as_posix()
            folder = rel.rpartition("/")[0]
            if rel in ours or (
                name.endswith(".npz") and any(f"{folder}/{o}".lstrip("/") in stems for o in _owners(name))
            ):
                continue
            found.append(rel)
    return sorted(found)


@contextlib.contextmanager
def staging(out: Path, *, replace: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` on success and disappears on failure.

    ``replace``: an existing ``out`` (an earlier export, see check_target) is renamed aside, the new
    folder renamed in, then the old one removed, so ``out`` is always one complete export.
    """
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if replace and out.exists() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / out.name, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
            return
        if out.exists():
            out.rmdir()  # empty (checked before); fails loudly if someone filled it meanwhile
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def collect(
    manifest: Manifest, trigger: str | None, class_word: str | None
) -> tuple[list[ExportItem], list[str]]:
    """Kept images with their captions and splits; warnings for what the user should know."""
    from ..stages.user_captions import JSONL, refresh, sources

    warnings = []
    refresh(manifest)  # a caption edited by hand since the last scan is exported as it is now
    caption_files = {  # image -> the person's .txt / .caption file its caption comes from (as user_captions)
        image: target for image, (target, text, _) in sources(manifest).items() if text
    }
    index = manifest.file_index()
    items = []
    records = manifest.kept_images()
    if not records:
        raise CurateError(manifest.nothing_kept("export"))
    skipped = [f"`curate {s}`" for s in ("filter", "dedupe") if not manifest.stage_ran(s)]
    if skipped:
        let_through = {
            "`curate filter`": "too small, blurry or badly exposed images",
            "`curate dedupe`": "duplicates",
        }
        warnings.append(
            f"no {' or '.join(skipped)} run: {' and '.join(let_through[s] for s in skipped)} are exported "
            f"too; run {' and '.join(skipped)} first"
        )
    kept_paths = {r.path for r in records}
    stale = {s: [p for p in manifest.changed_since(s) if p in kept_paths] for s in ("filter", "dedupe")}
    stale_stages = [f"`curate {s}`" for s, ps in stale.items() if ps and f"`curate {s}`" not in skipped]
    if stale_stages:
        n = len({p for ps in stale.values() for p in ps})
        warnings.append(
            f"{n} image(s) changed since the last {' and '.join(stale_stages)}: they are exported unchecked; "
            f"run {' and '.join(stale_stages)} again"
        )
    if all(r.split is None for r in records):
        warnings.append("no split stored: every image goes to train; run `curate split` for a validation set")
    no_caption = 0
    for rec in records:
        src = manifest.root / rec.path
        known = index.get(rec.path)
        try:
            st = src.stat()
        except OSError:
            raise CurateError(f"{rec.path} is gone since the last scan; run `curate scan` again") from None
        if known and (known[1] != st.st_size or known[2] != st.st_mtime_ns):
            raise CurateError(f"{rec.path} changed since the last scan; run `curate scan` again")
        caption = make_caption(rec, trigger, class_word)
        no_caption += not caption
        split = "val" if rec.split == "val" else "train"
        target = next((caption_files[p] for p in rec.paths if p in caption_files), None)
        own = manifest.root / target if rec.user_caption and target and f"{JSONL}::" not in target else None
        items.append(ExportItem(rec, src, caption, split, rec.sha256[:16], own))
    if no_caption:
        warnings.append(
            f"{no_caption} image(s) have no caption, tags or trigger word; run the tagger or pass --trigger"
        )
    return items, warnings


def resolve_settings(
    manifest: Manifest, settings: BucketSettings | None, warnings: list[str] | None = None
) -> BucketSettings:
    """Explicit settings, else those of the last `curate bucket`, else the defaults (with a warning)."""
    found = settings or stored_settings(manifest)
    if found is None and warnings is not None:
        d = BucketSettings()
        warnings.append(
            f"no `curate bucket` run: the config uses resolution {d.resolution}, buckets {d.min_size}-"
            f"{d.max_size} step {d.step}; run `curate bucket` first to choose and check them"
        )
    return found or BucketSettings()


LINK_MODES = ("copy", "hard", "sym")


def link_mode(link: str | bool | None) -> str:
    """``copy`` (the default: reflink where the file system can, else a copy), ``hard`` or ``sym``."""
    if link is None or link is False:
        return "copy"
    if link is True:  # the old boolean API meant hard links
        return "hard"
    if link not in LINK_MODES:
        raise CurateError(f"unknown --link {link!r}; choose hard or sym (the default copies)")
    return link


def link_warning(mode: str, root: Path) -> str | None:
    """What a user must know about a linked export, or None for copies."""
    if mode == "copy":
        return None
    kind = "hard-linked" if mode == "hard" else "symlinked"
    return (
        f"files are {kind} to the originals in {root}: editing an exported image in place (a batch resize, "
        "say) changes the original; export without --link to get independent copies"
    )


def clone_file(src: Path, dest: Path) -> str:
    """Copy ``src``'s bytes (a symlink's target, never the link) to ``dest``: 'reflinked' or 'copied'.

    A reflink (FICLONE) shares blocks copy-on-write, so it costs no space and a later write to either
    file leaves the other unchanged; file systems without it get a plain copy.
    """
    real = Path(os.path.realpath(src))
    try:
        import fcntl

        with open(real, "rb") as fsrc, open(dest, "wb") as fdst:
            fcntl.ioctl(fdst.fileno(), FICLONE, fsrc.fileno())
        how = "reflinked"
    except (ImportError, OSError):
        shutil.copyfile(real, dest)  # replaces the empty file; sendfile where the OS has it
        how = "copied"
    shutil.copystat(real, dest)
    return how


def place_file(src: Path, dest: Path, mode: str) -> str:
    """Put ``src``'s bytes at ``dest`` as ``mode`` asks; how it was done (linked, reflinked, copied)."""
    real = Path(os.path.realpath(src))  # a symlinked source: link or copy what it points to
    if mode == "hard":
        try:
            os.link(real, dest)
            return "linked"
        except OSError:
            pass  # another file system, or links not allowed: copy instead
    elif mode == "sym":
        dest.symlink_to(real)
        return "linked"
    return clone_file(real, dest)


def write_images(
    items: list[ExportItem],
    dest_dir: Path,
    res: ExportResult,
    *,
    resize: BucketSettings | None,
    link: str = "copy",
) -> list[str]:
    """Write ``items`` into ``dest_dir`` on a few threads (PIL and zlib release the GIL); file names in order."""
    workers = min(8, os.cpu_count() or 1, max(1, len(items)))
    with ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(lambda it: write_image(it, dest_dir, resize=resize, link=link), items))
    for _, kind in done:
        setattr(res, kind, getattr(res, kind) + 1)
    return [name for name, _ in done]


def write_image(
    item: ExportItem, dest_dir: Path, *, resize: BucketSettings | None, link: str = "copy"
) -> tuple[str, str]:
    """Put one image into ``dest_dir``: (file name, how). Copy / reflink (or a link on request) > re-encode > resize."""
    rec = item.rec
    ext = item.source.suffix.lower()
    if resize is not None and rec.width and rec.height:
        pl = place(rec.width, rec.height, resize)
        img = open_rgb(item.source)
        if img.size != pl.resized:
            img = img.resize(pl.resized, Image.Resampling.LANCZOS)
        left = (pl.resized[0] - pl.bucket[0]) // 2
        top = (pl.resized[1] - pl.bucket[1]) // 2
        img = img.crop((left, top, left + pl.bucket[0], top + pl.bucket[1]))
        name = f"{item.name}.png"
        img.save(dest_dir / name, "PNG", compress_level=PNG_LEVEL)
        return name, "resized"
    if ext not in PASSTHROUGH or REENCODE_FLAGS & set(rec.flags):
        name = f"{item.name}.png"
        open_rgb(item.source).save(dest_dir / name, "PNG", compress_level=PNG_LEVEL)
        return name, "reencoded"
    name = f"{item.name}{'.jpg' if ext == '.jpeg' else ext}"
    return name, place_file(item.source, dest_dir / name, link_mode(link))
