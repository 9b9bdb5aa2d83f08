"""Caption files beside the images: which are the user's, what they say, and when they change.

For an image ``a/b.png`` a caption is ``a/b.txt``, ``a/b.caption`` or the ``b.png`` entry of
``a/metadata.jsonl`` (``file_name`` + ``text``, as HF imagefolder reads it). Every caption found is a
row of ``user_captions`` with its text and digest. A file is curate's when its digest is the one curate
recorded when writing it (``caption_files``); any other text is a person's: written before curate ran, or
edited by hand afterwards, and it wins over what curate would generate.

``refresh`` is cheap enough to run before every export: one directory listing per image folder, and a
file is read only when its size or mtime changed (then its digest decides whether the text changed).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import CurateError
from ..io import STATE_DIR, atomic_write_text, atomic_write_texts
from ..manifest import Manifest
from .captions import TABLES as CAPTION_TABLES
from .captions import digest, jsonl_name, reconcile_pending

TABLE = """
CREATE TABLE IF NOT EXISTS user_captions (
    target   TEXT PRIMARY KEY,      -- caption file path, or <dir/>metadata.jsonl::<image path>
    image    TEXT NOT NULL,         -- the image's path (relative to the dataset root)
    rank     INTEGER NOT NULL,      -- 0 .txt, 1 .caption, 2 metadata.jsonl: the lowest present one is used
    text     TEXT NOT NULL,         -- stripped text
    digest   TEXT NOT NULL,         -- captions.digest of the text as read (compared with caption_files)
    size     INTEGER,               -- size and mtime of the file it came from (cheap change test)
    mtime_ns INTEGER,
    origin   TEXT NOT NULL,         -- user (curate never wrote it) | edited (changed after curate wrote it) | curate
    at       REAL NOT NULL          -- when this row was last written
);
CREATE INDEX IF NOT EXISTS user_captions_image ON user_captions(image);
"""

SIDECARS = ((".txt", 0), (".caption", 1))
JSONL = "metadata.jsonl"


@dataclass
class RefreshResult:
    """What a refresh found: counts of caption files by origin and what changed since the last one."""

    user: int = 0  # images with a caption a person wrote or edited
    curate: int = 0  # caption files curate wrote and nobody changed
    new: list[str] = field(default_factory=list)  # caption files seen for the first time
    changed: list[str] = field(default_factory=list)  # caption files whose text changed
    removed: list[str] = field(default_factory=list)  # caption files that are gone

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def ensure(manifest: Manifest) -> None:
    manifest.ensure_table(CAPTION_TABLES)
    manifest.ensure_table(TABLE)


def _origin(target: str, dig: str, ours: dict[str, str]) -> str:
    mine = ours.get(target)
    if mine is None:
        return "user"
    return "curate" if mine == dig else "edited"


def _read_text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # a legacy Windows editor's text (cp1252), else Latin-1, which takes any byte:
        try:  # decoding with "replace" turned the person's accents into U+FFFD in every export
            return data.decode("cp1252")
        except UnicodeDecodeError:
            return data.decode("latin-1")


def _clean(text: str) -> str:
    return text.lstrip("\ufeff").strip()


def _jsonl_entries(path: Path) -> dict[str, str]:
    """file_name -> text of a metadata.jsonl; lines that are not JSON objects are skipped."""
    out: dict[str, str] = {}
    text = _read_text(path) or ""
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj.get("file_name") is not None:
            out[jsonl_name(obj["file_name"])] = obj["text"]
    return out


def jsonl_columns(root: Path, rel: str, cache: dict[str, dict[str, dict]] | None = None) -> dict[str, Any]:
    """The other columns (besides file_name and text) of image ``rel``'s entry in the nearest
    metadata.jsonl holding one (its folder or above, as HF imagefolder reads them); {} when none."""
    cache = {} if cache is None else cache
    parts = PurePosixPath(rel).parts
    for i in range(len(parts) - 1, -1, -1):
        d = "/".join(parts[:i])
        if d not in cache:
            meta = (root / d if d else root) / JSONL
            objs: dict[str, dict] = {}
            if meta.is_file():
                for line in (_read_text(meta) or "").splitlines():
                    try:
                        obj = json.loads(line) if line.strip() else None
                    except json.JSONDecodeError:
                        continue
                    if isinstance(obj, dict) and obj.get("file_name") is not None:
                        objs[jsonl_name(obj["file_name"])] = obj
            cache[d] = objs
        obj = cache[d].get("/".join(parts[i:]))
        if obj is not None:
            return {k: v for k, v in obj.items() if k not in ("file_name", "text")}
    return {}


def refresh(manifest: Manifest) -> RefreshResult:
    """Bring ``user_captions`` up to date with the caption files beside every present image."""
    ensure(manifest)
    reconcile_pending(manifest)
    root = manifest.root
    conn = manifest.conn
    ours = dict(conn.execute("SELECT target, digest FROM caption_files").fetchall())
    known = {
        r[0]: r
        for r in conn.execute(
            "SELECT target, image, rank, text, digest, size, mtime_ns, origin FROM user_captions"
        )
    }
    images = sorted(
        r[0] for r in conn.execute("SELECT path FROM files WHERE status='ok' AND sha256 IS NOT NULL")
    )
    by_dir: dict[str, list[str]] = {}
    for p in images:
        by_dir.setdefault(str(PurePosixPath(p).parent), []).append(p)

    res = RefreshResult()
    rows: list[tuple] = []  # rows to (re)write
    seen: set[str] = set()
    now = time.time()

    def consider(target: str, image: str, rank: int, st: os.stat_result, read) -> None:
        if target in seen:  # a.jpg and a.png share a.txt: the first (as the writer does) owns it
            return
        seen.add(target)
        prev = known.get(target)
        if prev is not None and prev[5] == st.st_size and prev[6] == st.st_mtime_ns and prev[1] == image:
            text, dig = prev[3], prev[4]
            origin = _origin(target, dig, ours)
            if origin != prev[7]:
                rows.append((target, image, rank, text, dig, st.st_size, st.st_mtime_ns, origin, now))
        else:
            raw = read()
            if raw is None:
                seen.discard(target)
                return
            text, dig = _clean(raw), digest(raw)
            origin = _origin(target, dig, ours)
            if prev is None:
                res.new.append(target)
            elif prev[4] != dig:
                res.changed.append(target)
            rows.append((target, image, rank, text, dig, st.st_size, st.st_mtime_ns, origin, now))
        if origin == "curate":
            res.curate += 1

    for d, paths in by_dir.items():
        folder = root if d == "." else root / d
        try:
            listing = {e.name: e for e in os.scandir(folder) if e.is_file()}
        except OSError:
            continue
        prefix = "" if d == "." else d + "/"
        for p in paths:
            stem = PurePosixPath(p).stem
            for ext, rank in SIDECARS:
                e = listing.get(stem + ext)
                if e is None:
                    continue
                try:
                    st = e.stat()
                except OSError:
                    continue
                consider(prefix + stem + ext, p, rank, st, lambda e=e: _read_text(Path(e.path)))
    # metadata.jsonl files in the root or any folder holding images (or above one): file_name is
    # relative to the metadata file's folder, as HF imagefolder reads it (curate writes root paths).
    folders = {"."}
    for d in by_dir:
        parts = PurePosixPath(d).parts
        folders.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    for d in sorted(folders):
        meta = (root if d == "." else root / d) / JSONL
        try:
            st = meta.stat()
        except OSError:
            continue
        prefix = "" if d == "." else d + "/"
        entries: dict[str, str] | None = None
        for p in images:
            if not p.startswith(prefix):
                continue
            target = f"{prefix}{JSONL}::{p}"
            prev = known.get(target)
            if prev is not None and prev[5] == st.st_size and prev[6] == st.st_mtime_ns and prev[1] == p:
                consider(target, p, 2, st, lambda: None)
                continue
            if entries is None:
                entries = _jsonl_entries(meta)
            text = entries.get(p[len(prefix) :])
            if text is not None:
                consider(target, p, 2, st, lambda text=text: text)

    gone = [t for t in known if t not in seen]
    res.removed = sorted(gone)
    if (rows or gone) and not _read_only(manifest):
        with manifest.transaction():
            conn.executemany(
                "INSERT OR REPLACE INTO user_captions(target, image, rank, text, digest, size, mtime_ns, origin, at)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                rows,
            )
            conn.executemany("DELETE FROM user_captions WHERE target=?", [(t,) for t in gone])
    res.user = len(manifest.user_captions())
    return res


def _read_only(manifest: Manifest) -> bool:
    """A manifest that cannot be written (read-only dataset): the captions of the last scan are used."""
    return not os.access(manifest.path, os.W_OK) or not os.access(manifest.path.parent, os.W_OK)


def sources(manifest: Manifest) -> dict[str, tuple[str, str, str]]:
    """image path -> (target, text, origin) of the caption it uses (a person's, lowest rank first)."""
    ensure(manifest)
    out: dict[str, tuple[str, str, str]] = {}
    for target, image, text, origin in manifest.conn.execute(
        "SELECT target, image, text, origin FROM user_captions WHERE origin != 'curate' ORDER BY image, rank DESC"
    ):
        out[image] = (target, text, origin)
    return out


def write_user_text(
    manifest: Manifest, target: str, text: str, *, stamp: str | None = None, update: bool = True
) -> str | None:
    """Replace a person's caption at ``target`` with ``text`` (backed up first); it stays theirs.

    Returns the backup folder, or None when there was nothing to back up.
    """
    ensure(manifest)
    root = manifest.root
    backup_dir = None
    stamp = stamp or new_stamp()
    if "::" in target:
        meta_rel, image = target.split("::", 1)
        meta = root / meta_rel
        prefix = str(PurePosixPath(meta_rel).parent)
        name = image if prefix == "." else image[len(prefix) + 1 :]
        original = _read_text(meta) or ""
        lines, found = [], False
        for line in original.splitlines():
            try:
                obj = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict) and jsonl_name(obj.get("file_name")) in (name, image) and not found:
                obj["text"] = text
                found = True
                line = json.dumps(obj, ensure_ascii=False)
            lines.append(line)
        if not found:
            lines.append(json.dumps({"file_name": name, "text": text}, ensure_ascii=False))
        if original:
            backup_dir = _backup(manifest, meta_rel, original, stamp)
        atomic_write_text(meta, "\n".join(lines) + "\n")
    else:
        f = root / target
        cur = _read_text(f)
        if cur is not None and _clean(cur) != text:
            backup_dir = _backup(manifest, target, cur, stamp)
        atomic_write_text(f, text + "\n")
    # A person's text at this target from now on: curate's record of what it wrote there no longer applies.
    with manifest.transaction():
        manifest.conn.execute("DELETE FROM caption_files WHERE target=?", (target,))
    if update:
        refresh(manifest)
    return backup_dir


def new_stamp() -> str:
    """A backup folder name, unique per operation (two edits in one second must not share one)."""
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def _backup(manifest: Manifest, rel: str, text: str, stamp: str) -> str:
    bdir = manifest.root / STATE_DIR / "caption_backups" / stamp
    if not (bdir / rel).exists():  # several edits of one metadata.jsonl: the first backup is the original
        atomic_write_text(bdir / rel, text)
    return str(bdir)


def resolve_image(manifest: Manifest, path: str | os.PathLike, *, allow_missing: bool = False) -> str:
    """A path the user typed (relative to the dataset or the current folder, or absolute) -> manifest path.

    A file the last scan found gone is an error unless ``allow_missing`` (forgetting a decision on it)."""
    root = manifest.root
    raw = Path(path).expanduser()
    candidates = [raw] if raw.is_absolute() else [root / raw, Path.cwd() / raw]
    index = manifest.file_index()
    outside = True
    for c in candidates:
        for form in (Path(os.path.abspath(c)), c.resolve()):
            try:
                rel = form.relative_to(root).as_posix()
            except ValueError:
                continue
            outside = False
            if rel.split("/", 1)[0] == STATE_DIR:
                continue
            if rel in index:
                if index[rel][3] == "missing" and not allow_missing:
                    raise CurateError(
                        f"{path} is gone since the last scan of {root}; pick a file that is there"
                    )
                return rel
    if outside:
        raise CurateError(f"{path} is outside the dataset {root}; pass a file inside it")
    raise CurateError(f"{path} is not an image curate knows in {root}; run `curate scan {root}` first")


def caption_target(manifest: Manifest, rel: str, srcs: dict, fmt: str | None = None) -> str:
    """Where a person's caption of image ``rel`` goes: the caption of theirs it already has, else a new
    sidecar (or metadata.jsonl entry) in ``fmt`` (default: the caption format curate last wrote)."""
    from .captions import FORMATS, sidecar

    src = srcs.get(rel)
    if src is not None:
        return src[0]
    fmt = fmt or manifest.get_meta("caption.format") or "txt"
    if fmt not in FORMATS:
        raise CurateError(f"caption format {fmt!r} unknown; choose txt, caption or jsonl")
    return f"{JSONL}::{rel}" if fmt == "jsonl" else sidecar(rel, fmt)


def _one_line(text: str) -> str:
    from ..export.common import one_line  # lines of tags joined with commas, as export joins them

    return one_line(str(text)) if "\n" in str(text) else str(text).strip()


def set_captions(manifest: Manifest, texts: dict[str, str], fmt: str | None = None) -> dict[str, str]:
    """Write several people's captions at once (manifest paths -> text): the other text of theirs backed up
    first, every file atomically (fsyncs shared), one manifest transaction and one refresh for all.
    Returns path -> caption target."""
    refresh(manifest)
    root = manifest.root
    srcs = sources(manifest)
    stamp = new_stamp()
    out: dict[str, str] = {}
    writes: dict[Path, str] = {}
    backups: dict[Path, str] = {}
    jsonl: list[tuple[str, str]] = []
    for rel, raw in texts.items():
        text = _one_line(raw)
        target = caption_target(manifest, rel, srcs, fmt)
        out[rel] = target
        if "::" in target:
            jsonl.append((target, text))
            continue
        if rel in srcs:  # a person's text: back it up first (curate's own text it can write again)
            cur = _read_text(root / target)
            if cur is not None and _clean(cur) != text:
                backups.setdefault(root / STATE_DIR / "caption_backups" / stamp / target, cur)
        writes[root / target] = text + "\n"
    atomic_write_texts(backups)
    atomic_write_texts(writes)
    with manifest.transaction():  # write_user_text's own transactions join this one
        for target, text in jsonl:
            write_user_text(manifest, target, text, stamp=stamp, update=False)
        # A person's text at these targets from now on: curate's record of writing them no longer applies.
        manifest.conn.executemany(
            "DELETE FROM caption_files WHERE target=?", [(t,) for t in out.values() if "::" not in t]
        )
    refresh(manifest)
    return out


def set_caption(manifest: Manifest, path: str | os.PathLike, text: str, fmt: str | None = None) -> str:
    """Write ``text`` as the person's caption of image ``path`` (atomically; backup if it replaces other
    text of theirs) and record it. Returns the caption target written."""
    rel = resolve_image(manifest, path)
    return set_captions(manifest, {rel: text}, fmt)[rel]
