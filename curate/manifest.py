"""The dataset record: one row per distinct image (keyed by the SHA-256 of its bytes), one row per file path.

Stored in SQLite (WAL) at ``<dataset>/.curate/manifest.db``. Every stage reads and writes this record;
no stage keeps hidden state elsewhere. Decisions are rows in ``rejects`` (one per path and stage), so a
stage can be re-run with new thresholds by replacing only its own rows.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CurateError
from .io import STATE_DIR, lexical_escape

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    sha256      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    format      TEXT,
    mode        TEXT,
    width       INTEGER,
    height      INTEGER,
    n_frames    INTEGER DEFAULT 1,
    flags       TEXT NOT NULL DEFAULT '[]',
    error       TEXT,              -- reason code when the bytes cannot be used (truncated, not-an-image, ...)
    error_detail TEXT,
    scores      TEXT NOT NULL DEFAULT '{}',
    phash       TEXT,              -- 64-bit, 16 hex digits
    dhash       TEXT,
    dup_group   INTEGER,           -- near/exact duplicate group id (NULL: no duplicate)
    dup_keeper  INTEGER,           -- 1 for the copy kept in its group
    dup_explain TEXT,
    tags        TEXT,              -- JSON list, filled by the tagger
    caption     TEXT,
    split       TEXT,              -- 'train' | 'val'
    bucket_w    INTEGER,
    bucket_h    INTEGER,
    scanned_at  REAL
);
CREATE TABLE IF NOT EXISTS files (
    path        TEXT PRIMARY KEY,  -- relative to the dataset root, POSIX separators
    sha256      TEXT,              -- NULL when the file could not be read at all
    size        INTEGER,
    mtime_ns    INTEGER,
    status      TEXT NOT NULL DEFAULT 'ok',   -- ok | quarantined | missing
    error       TEXT,              -- reason when unreadable (permission, broken-symlink, ...)
    error_detail TEXT,
    seen_at     REAL
);
CREATE INDEX IF NOT EXISTS files_sha ON files(sha256);
CREATE TABLE IF NOT EXISTS rejects (
    path    TEXT NOT NULL,
    stage   TEXT NOT NULL,         -- scan | filter | dedupe | ...
    reason  TEXT NOT NULL,
    detail  TEXT,
    PRIMARY KEY (path, stage)
);
CREATE TABLE IF NOT EXISTS moves (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    batch   TEXT NOT NULL,
    src     TEXT NOT NULL,         -- relative path in the dataset
    dst     TEXT NOT NULL,         -- relative path under the quarantine folder
    state   TEXT NOT NULL,         -- pending | done | restored
    at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    path     TEXT PRIMARY KEY,     -- a person's per-file decision (curate keep / curate reject)
    decision TEXT NOT NULL CHECK (decision IN ('keep', 'reject')),
    reason   TEXT,
    at       REAL NOT NULL
);
"""


@dataclass
class ImageRecord:
    """One distinct image as the manifest knows it."""

    sha256: str
    path: str  # representative path (relative), the first kept path
    paths: list[str]
    size: int
    format: str | None
    mode: str | None
    width: int | None
    height: int | None
    flags: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    phash: str | None = None
    dhash: str | None = None
    error: str | None = None
    error_detail: str | None = None
    dup_group: int | None = None
    dup_keeper: bool | None = None
    dup_explain: str | None = None
    tags: list[str] | None = None
    caption: str | None = None
    split: str | None = None
    bucket: tuple[int, int] | None = None
    user_caption: str | None = None  # a caption a person wrote or edited (stages/user_captions.py)

    @property
    def pixels(self) -> int:
        return (self.width or 0) * (self.height or 0)


def _decode_row(row: sqlite3.Row, paths: list[str]) -> ImageRecord:
    return ImageRecord(
        sha256=row["sha256"],
        path=paths[0] if paths else "",
        paths=paths,
        size=row["size"],
        format=row["format"],
        mode=row["mode"],
        width=row["width"],
        height=row["height"],
        flags=json.loads(row["flags"] or "[]"),
        scores=json.loads(row["scores"] or "{}"),
        phash=row["phash"],
        dhash=row["dhash"],
        error=row["error"],
        error_detail=row["error_detail"],
        dup_group=row["dup_group"],
        dup_keeper=None if row["dup_keeper"] is None else bool(row["dup_keeper"]),
        dup_explain=row["dup_explain"],
        tags=json.loads(row["tags"]) if row["tags"] else None,
        caption=row["caption"],
        split=row["split"],
        bucket=(row["bucket_w"], row["bucket_h"]) if row["bucket_w"] else None,
    )


def _first_caption(paths: list[str], captions: dict[str, str]) -> str | None:
    return next((captions[p] for p in paths if p in captions), None)


def default_manifest_path(root: Path) -> Path:
    return root / STATE_DIR / MANIFEST_NAME


# -- opening safely: writer lock, damaged files, read-only folders -----------------------------------------
SQLITE_HEADER = b"SQLite format 3\x00"
QUICK_CHECK_MAX_BYTES = 64 << 20  # PRAGMA quick_check on open below this (~120k images, ~0.1 s)
BUSY_EXIT = 75  # EX_TEMPFAIL: try again later
WAIT_FOR_WRITER = False  # set by `curate --wait`; CURATE_WAIT=1 does the same
_OPENED: list[Path] = []  # manifests this process opened, for error messages
_LOCKS: dict[str, list[int]] = {}  # lock path -> [fd, users]; re-entrant within one process


def last_opened() -> Path | None:
    """The manifest this process opened last (for one-line error messages)."""
    return _OPENED[-1] if _OPENED else None


def _close_locks_in_child() -> None:
    # A forked child (scan worker) must not keep the parent's writer lock alive.
    for fd, _users in _LOCKS.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)


def lock_path(path: Path) -> Path:
    """The writer lock beside the manifest: ``manifest.db.lock``, holding the writer's pid."""
    return path.with_name(path.name + ".lock")


def _holder(lock: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        return str(int(lock.read_text().split()[0]))
    return "?"


def _wait_default() -> bool:
    return WAIT_FOR_WRITER or os.environ.get("CURATE_WAIT", "").lower() in ("1", "true", "yes", "on")


def acquire_writer_lock(path: Path, *, wait: bool | None = None, on_wait=None) -> str:
    """Take the per-manifest writer lock (flock on ``manifest.db.lock``); returns the key to release it.

    Busy without ``wait``: CurateError naming the holder's pid. Re-entrant within one process.
    """
    key = str(lock_path(path))
    if key in _LOCKS:
        _LOCKS[key][1] += 1
        return key
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process lock, sqlite's busy timeout only
        _LOCKS[key] = [-1, 1]
        return key
    fd = os.open(key, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(Path(key))
            if not (_wait_default() if wait is None else wait):
                raise CurateError(
                    f"busy: another curate (pid {pid}) is writing this dataset; wait or pass --wait "
                    "(curate --wait COMMAND ...)",
                    exit_code=BUSY_EXIT,
                ) from None
            if on_wait is not None:
                on_wait(pid)
            else:
                sys.stderr.write(f"waiting for curate (pid {pid}) to finish writing this dataset...\n")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except BaseException:
        os.close(fd)
        raise
    _LOCKS[key] = [fd, 1]
    return key


def release_writer_lock(key: str) -> None:
    entry = _LOCKS.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _LOCKS[key]
        if entry[0] >= 0:
            with contextlib.suppress(OSError):
                os.close(entry[0])  # closing the descriptor releases the flock


def is_corruption(exc: BaseException) -> bool:
    """sqlite's words for a damaged file (not for busy, full or read-only)."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.DatabaseError) and (
        "file is not a database" in text or "malformed" in text or "database corrupt" in text
    )


def _damage(path: Path) -> str | None:
    """Cheap checks of the file itself: empty, foreign header, page size, truncation. None when it looks fine."""
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes)"
    with open(path, "rb") as fh:
        head = fh.read(100)
    if len(head) < 100 or not head.startswith(SQLITE_HEADER):
        return "it has no SQLite header"
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    if page < 512 or page & (page - 1):
        return "its header is garbled"
    if size % page:
        return f"it is truncated ({size} bytes is not a whole number of {page}-byte pages)"
    pages = int.from_bytes(head[28:32], "big")
    valid = head[24:28] == head[92:96]  # the in-header page count is trustworthy
    wal = path.with_name(path.name + "-wal")
    # A checkpoint in progress (another curate writing) writes page 1 before it extends the file: only
    # trust the count when no WAL is pending.
    settled = not (wal.exists() and wal.stat().st_size > 0)
    if valid and settled and pages and size < pages * page:
        return f"it is truncated ({size // page} of {pages} pages)"
    return None


def is_damaged(path: Path) -> bool:
    """Full check (quick_check), for when sqlite reported damage mid-command: is it really this file?"""
    if not path.exists():
        return False
    if _damage(path):
        return True
    try:
        with contextlib.closing(sqlite3.connect(path.as_uri() + "?mode=ro", uri=True, timeout=5)) as c:
            return c.execute("PRAGMA quick_check(1)").fetchone()[0] != "ok"
    except sqlite3.DatabaseError as exc:
        return is_corruption(exc)


def set_aside(path: Path, label: str = "corrupt") -> Path:
    """Rename ``manifest.db`` (with its -wal/-shm) to ``manifest.db.<label>-<time>``; return the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = path.with_name(f"{path.name}.{label}-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.{label}-{stamp}-{n}")
    os.replace(path, dest)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.replace(side, dest.with_name(dest.name + suffix))
    return dest


def set_aside_copies(path: Path) -> list[Path]:
    """Damaged manifests set aside earlier (newest last)."""
    return sorted(
        p for p in path.parent.glob(path.name + ".corrupt-*") if not p.name.endswith(("-wal", "-shm"))
    )


def _root_hint(path: Path) -> str:
    # <root>/.curate/manifest.db -> root; else the caller passed --manifest and knows their dataset
    return str(path.parent.parent) if path.parent.name == STATE_DIR else "DATASET"


def damaged_error(path: Path | None, why: str) -> CurateError:
    """Set a damaged manifest aside (when no other curate writes it) and say so in one line."""
    why = " ".join(why.split())[:160]  # sqlite's quick_check report spans lines
    if path is None:
        return CurateError(f"the manifest is damaged ({why}); run `curate scan DATASET --rebuild`")
    where = ""
    key = None
    try:
        key = acquire_writer_lock(path, wait=False)
        if path.exists():
            where = f"; moved it to {set_aside(path)}"
    except (CurateError, OSError):
        where = "; left it in place (another curate is using it or the folder is read-only)"
    finally:
        if key:
            release_writer_lock(key)
    return CurateError(
        f"manifest {path} is damaged: {why}{where}; rebuild it from the images with "
        f"`curate scan {_root_hint(path)} --rebuild`"
    )


def _writable_dir(d: Path) -> OSError | None:
    """Create ``d`` if needed; the error when curate cannot write there."""
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return exc
    if not os.access(d, os.W_OK | os.X_OK):
        return OSError(errno.EROFS if _on_read_only_fs(d) else errno.EACCES, "not writable", str(d))
    return None


def _on_read_only_fs(d: Path) -> bool:
    try:
        return bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


class Manifest:
    """SQLite-backed dataset record. Cheap to open; safe to interrupt (every batch commits).

    ``write`` (default) takes the per-dataset writer lock for the life of the object, so two writers never
    interleave; readers (``write=False``) never wait for it. ``rebuild`` sets the current file aside and
    starts a fresh one. A damaged file is set aside with a one-line CurateError; never re-created silently.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        path: str | os.PathLike | None = None,
        *,
        create: bool = True,
        write: bool = True,
        rebuild: bool = False,
        wait: bool | None = None,
    ):
        self.root = Path(root).resolve()
        self.default_location = path is None
        self.path = Path(path).expanduser().resolve() if path else default_manifest_path(self.root)
        self._lock: str | None = None
        self.conn: sqlite3.Connection | None = None  # type: ignore[assignment]
        existed = self.path.exists()
        if self.path.is_dir():
            raise CurateError(
                f"--manifest {self.path} is a folder; pass a file path such as {self.path}/manifest.db"
            )
        if not existed and not create and not rebuild:
            copies = set_aside_copies(self.path)
            if copies:
                raise CurateError(
                    f"no manifest at {self.path}: the damaged one was set aside as {copies[-1].name}; "
                    f"rebuild it with `curate scan {root} --rebuild`"
                )
            raise CurateError(f"no manifest at {self.path}; run `curate scan {root}` first")
        problem = _writable_dir(self.path.parent)
        if problem is None and existed and not os.access(self.path, os.W_OK):
            problem = OSError(errno.EACCES, "not writable", str(self.path))
        if problem is not None:
            raise self._unwritable(problem)
        _OPENED.append(self.path)
        if write or rebuild:
            self._lock = acquire_writer_lock(self.path, wait=wait)
        try:
            self._open(existed, create, rebuild)
        except BaseException:
            self.close()
            if not existed:  # do not leave an empty file behind (it would read as a damaged manifest)
                with contextlib.suppress(OSError):
                    if self.path.stat().st_size == 0:
                        for suffix in ("", "-wal", "-shm"):
                            self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
            raise

    def _unwritable(self, exc: OSError) -> CurateError:
        why = "read-only" if exc.errno == errno.EROFS else "not writable"
        if self.default_location:
            return CurateError(
                f"dataset folder {self.root} is {why}; pass --manifest PATH to keep the manifest elsewhere"
            )
        return CurateError(f"cannot write the manifest {self.path} ({why}); pass a writable --manifest PATH")

    def _open(self, existed: bool, create: bool, rebuild: bool) -> None:
        if existed and rebuild:
            why = _damage(self.path)
            set_aside(self.path, "corrupt" if why else "before-rebuild")
            existed = False
        elif existed:
            why = _damage(self.path)
            if why:
                raise damaged_error(self.path, why)
        elif not rebuild and set_aside_copies(self.path):
            raise CurateError(
                f"no manifest at {self.path}: the damaged one was set aside as "
                f"{set_aside_copies(self.path)[-1].name}; rebuild it with `curate scan {self.root} --rebuild`"
            )
        try:
            self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise CurateError(f"cannot open manifest {self.path}: {exc}") from None
        st = os.stat(self.path)
        self._ident = (st.st_dev, st.st_ino)
        self.conn.row_factory = sqlite3.Row
        try:
            if existed:
                check = (
                    "PRAGMA quick_check(1)"
                    if st.st_size <= QUICK_CHECK_MAX_BYTES
                    else "PRAGMA schema_version"
                )
                result = self.conn.execute(check).fetchone()
                if check.startswith("PRAGMA quick") and result[0] != "ok":
                    raise sqlite3.DatabaseError(f"database disk image is malformed: {result[0]}")
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                raise
            self.conn.close()
            self.conn = None  # type: ignore[assignment]
            raise damaged_error(self.path, str(exc)) from None

    @property
    def state_dir(self) -> Path:
        """Where curate writes its own files (report, thumbnails): ``<root>/.curate`` or, on a read-only
        dataset, the folder of the manifest."""
        d = self.root / STATE_DIR
        if _writable_dir(d) is None:
            return d
        return self.path.parent

    def check_alive(self) -> None:
        """Raise when the manifest file was deleted or replaced since it was opened (work would be lost)."""
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self._ident
        except OSError:
            same = False
        if not same:
            raise CurateError(
                f"the manifest {self.path} was deleted or replaced while curate was writing it; "
                f"this run's results are lost; rerun `curate scan {self.root}`",
                exit_code=1,
            )

    def commit(self) -> None:
        """COMMIT the open transaction after checking the file is still the one we opened."""
        if not self.conn.in_transaction:
            return
        try:
            self.check_alive()
        except CurateError:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- schema ---------------------------------------------------------------------------------
    def _migrate(self) -> None:
        # executescript commits implicitly, so it runs outside any explicit transaction.
        self.conn.executescript(_SCHEMA)
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
            self.set_meta("created_at", str(time.time()))
        elif int(version) > SCHEMA_VERSION:
            raise CurateError(
                f"manifest {self.path} has schema v{version}, newer than this curate (v{SCHEMA_VERSION}); "
                "upgrade curate: pip install -U curate"
            )

    def ensure_table(self, ddl: str) -> None:
        """Create a stage-owned table (``CREATE TABLE IF NOT EXISTS ...``) if missing."""
        self.conn.executescript(ddl)

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; rolls back on error. Nested use joins the outer transaction."""
        if self.conn.in_transaction:
            yield self.conn
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            if self.conn.in_transaction:  # sqlite may have rolled back already (disk full)
                self.conn.execute("ROLLBACK")
            raise
        self.commit()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None  # type: ignore[assignment]
        if self._lock is not None:
            release_writer_lock(self._lock)
            self._lock = None

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- files ----------------------------------------------------------------------------------
    def file_index(self) -> dict[str, tuple[str | None, int | None, int | None, str]]:
        """path -> (sha256, size, mtime_ns, status) for every known file."""
        rows = self.conn.execute("SELECT path, sha256, size, mtime_ns, status FROM files")
        return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}

    def known_hashes(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT sha256 FROM images")}

    def upsert_file(
        self,
        path: str,
        sha256: str | None,
        size: int | None,
        mtime_ns: int | None,
        *,
        status: str = "ok",
        error: str | None = None,
        error_detail: str | None = None,
    ) -> None:
        self.conn.execute(
            "INSERT INTO files(path, sha256, size, mtime_ns, status, error, error_detail, seen_at)"
            " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(path) DO UPDATE SET sha256=excluded.sha256,"
            " size=excluded.size, mtime_ns=excluded.mtime_ns, status=excluded.status,"
            " error=excluded.error, error_detail=excluded.error_detail, seen_at=excluded.seen_at",
            (path, sha256, size, mtime_ns, status, error, error_detail, time.time()),
        )

    def set_file_status(self, path: str, status: str) -> None:
        self.conn.execute("UPDATE files SET status=? WHERE path=?", (status, path))

    def upsert_image(self, row: dict[str, Any]) -> None:
        cols = [
            "sha256", "size", "format", "mode", "width", "height", "n_frames", "flags", "error",
            "error_detail", "scores", "phash", "dhash", "scanned_at",
        ]  # fmt: skip
        values = [row.get(c) for c in cols]
        values[cols.index("flags")] = json.dumps(row.get("flags") or [])
        values[cols.index("scores")] = json.dumps(row.get("scores") or {})
        placeholders = ",".join("?" * len(cols))
        updates = ",".join(f"{c}=excluded.{c}" for c in cols[1:])
        self.conn.execute(
            f"INSERT INTO images({','.join(cols)}) VALUES ({placeholders})"
            f" ON CONFLICT(sha256) DO UPDATE SET {updates}",
            values,
        )

    # -- queries ----------------------------------------------------------------------------------
    def _paths_by_sha(self, statuses: tuple[str, ...] = ("ok",)) -> dict[str, list[str]]:
        q = f"SELECT sha256, path FROM files WHERE sha256 IS NOT NULL AND status IN ({','.join('?' * len(statuses))}) ORDER BY length(path), path"
        out: dict[str, list[str]] = {}
        for sha, path in self.conn.execute(q, statuses):
            if lexical_escape(path) is None:  # a hand-edited row such as ../x.jpg reaches no stage
                out.setdefault(sha, []).append(path)
        return out

    def images(
        self, *, include_errors: bool = True, statuses: tuple[str, ...] = ("ok",)
    ) -> list[ImageRecord]:
        """Every distinct image that has at least one file with one of ``statuses``."""
        paths = self._paths_by_sha(statuses)
        captions = self.user_captions()
        rows = self.conn.execute("SELECT * FROM images ORDER BY sha256")
        out = []
        for row in rows:
            p = paths.get(row["sha256"])
            if not p:
                continue
            if not include_errors and row["error"]:
                continue
            rec = _decode_row(row, p)
            rec.user_caption = _first_caption(rec.paths, captions)
            out.append(rec)
        out.sort(key=lambda r: r.path)
        return out

    def user_captions(self) -> dict[str, str]:
        """image path -> the caption a person wrote beside it (.txt before .caption before metadata.jsonl)."""
        try:
            rows = self.conn.execute(
                "SELECT image, text FROM user_captions WHERE origin != 'curate' AND text != ''"
                " ORDER BY image, rank DESC"
            ).fetchall()
        except sqlite3.OperationalError:  # no caption seen yet: the table is created by the first scan
            return {}
        return {image: text for image, text in rows}  # the lowest rank comes last and wins

    def image(self, sha256: str) -> ImageRecord | None:
        row = self.conn.execute("SELECT * FROM images WHERE sha256=?", (sha256,)).fetchone()
        if row is None:
            return None
        rec = _decode_row(row, self._paths_by_sha(("ok", "quarantined")).get(sha256, []))
        rec.user_caption = _first_caption(rec.paths, self.user_captions())
        return rec

    def rejected_paths(self, *, raw: bool = False) -> dict[str, list[tuple[str, str, str | None]]]:
        """path -> [(stage, reason, detail), ...], with the manual decisions applied (unless ``raw``).

        A manual keep cancels every stage's reject except the scan's (unusable bytes stay unusable);
        a manual reject adds a ``manual`` entry.
        """
        out: dict[str, list[tuple[str, str, str | None]]] = {}
        for path, stage, reason, detail in self.conn.execute(
            "SELECT path, stage, reason, detail FROM rejects ORDER BY path, stage"
        ):
            out.setdefault(path, []).append((stage, reason, detail))
        if raw:
            return out
        for path, (decision, reason) in self.decisions().items():
            if decision == "keep":
                left = [r for r in out.get(path, []) if r[0] == "scan"]
                if left:
                    out[path] = left
                else:
                    out.pop(path, None)
            else:
                out.setdefault(path, []).append(("manual", reason or "manual", "rejected by hand"))
        return out

    # -- manual decisions -------------------------------------------------------------------------
    def decisions(self) -> dict[str, tuple[str, str | None]]:
        """path -> (keep | reject, reason) for every file a person decided on."""
        rows = self.conn.execute("SELECT path, decision, reason FROM decisions")
        return {p: (d, r) for p, d, r in rows}

    def set_decisions(self, paths: Iterable[str], decision: str | None, reason: str | None = None) -> None:
        """Record ``decision`` ('keep' | 'reject') for ``paths``; None forgets their decisions."""
        if decision not in ("keep", "reject", None):
            raise CurateError(f"decision must be keep or reject, got {decision!r}")
        now = time.time()
        with self.transaction():
            for p in paths:
                if decision is None:
                    self.conn.execute("DELETE FROM decisions WHERE path=?", (p,))
                else:
                    self.conn.execute(
                        "INSERT OR REPLACE INTO decisions(path, decision, reason, at) VALUES (?,?,?,?)",
                        (p, decision, reason, now),
                    )

    def kept_images(self) -> list[ImageRecord]:
        """Images with at least one present, un-rejected file; ``path`` is that file.

        Manual decisions count: a manual keep beats filter/dedupe rejects (never a scan error), a
        manual reject removes the file.
        """
        rejected = self.rejected_paths()
        captions = self.user_captions()
        out = []
        for rec in self.images(include_errors=False):
            keep = [p for p in rec.paths if p not in rejected]
            if keep:
                rec.user_caption = _first_caption(keep + rec.paths, captions)
                rec.paths = keep
                rec.path = keep[0]
                out.append(rec)
        return out

    def set_rejects(self, stage: str, rejects: dict[str, tuple[str, str | None]]) -> None:
        """Replace every reject row of ``stage`` with ``rejects`` (path -> (reason, detail)); records that
        the stage ran (export warns when filter or dedupe never did)."""
        with self.transaction():
            self.set_meta(f"ran.{stage}", str(time.time()))
            self.conn.execute("DELETE FROM meta WHERE key=?", (f"changed_since.{stage}",))
            self.conn.execute("DELETE FROM rejects WHERE stage=?", (stage,))
            self.conn.executemany(
                "INSERT INTO rejects(path, stage, reason, detail) VALUES (?,?,?,?)",
                [(p, stage, r, d) for p, (r, d) in rejects.items()],
            )

    def update_images(self, column_values: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Set columns per image: iterable of (sha256, {column: value}). JSON-encodes lists/dicts."""
        with self.transaction():
            for sha, values in column_values:
                if not values:
                    continue
                cols = list(values)
                vals = [json.dumps(v) if isinstance(v, (list, dict)) else v for v in values.values()]
                self.conn.execute(
                    f"UPDATE images SET {', '.join(f'{c}=?' for c in cols)} WHERE sha256=?", [*vals, sha]
                )

    def stage_ran(self, stage: str) -> bool:
        """Whether ``stage`` (filter, dedupe) has run on this manifest (its rejects, or a manifest written
        before the record was kept: any reject or group it left)."""
        if self.get_meta(f"ran.{stage}") is not None:
            return True
        if self.conn.execute("SELECT 1 FROM rejects WHERE stage=? LIMIT 1", (stage,)).fetchone():
            return True
        return stage == "dedupe" and bool(
            self.conn.execute("SELECT 1 FROM images WHERE dup_group IS NOT NULL LIMIT 1").fetchone()
        )

    def nothing_kept(self, verb: str) -> str:
        """The error when no image is kept: why, and the fix (scan, or the rejects `curate status` lists)."""
        n = self.conn.execute("SELECT count(*) FROM files WHERE status='ok'").fetchone()[0]
        if not n:
            return f"no images to {verb}; put images in {self.root} and run `curate scan {self.root}`"
        return (
            f"no kept images to {verb}: all {n} files are rejected or unusable; `curate status` lists why "
            "(lower a threshold, or `curate keep` files)"
        )

    def changed_since(self, stage: str) -> list[str]:
        """Files whose bytes the scan found changed since ``stage`` (filter, dedupe) last ran."""
        return json.loads(self.get_meta(f"changed_since.{stage}") or "[]")

    def file_errors(self) -> list[sqlite3.Row]:
        """Files that could not be read at all (permissions, broken symlinks)."""
        return list(
            self.conn.execute("SELECT * FROM files WHERE error IS NOT NULL AND status='ok' ORDER BY path")
        )

    def counts(self) -> dict[str, int]:
        c = self.conn
        ok = {r[0] for r in c.execute("SELECT path FROM files WHERE status='ok'")}
        decisions = self.decisions()
        return {
            "files": c.execute("SELECT count(*) FROM files WHERE status='ok'").fetchone()[0],
            "images": c.execute(
                "SELECT count(DISTINCT sha256) FROM files WHERE status='ok' AND sha256 IS NOT NULL"
            ).fetchone()[0],
            "quarantined": c.execute("SELECT count(*) FROM files WHERE status='quarantined'").fetchone()[0],
            "rejected_files": len(self.rejected_paths().keys() & ok),
            "manual_keep": sum(1 for p, (d, _) in decisions.items() if d == "keep" and p in ok),
            "manual_reject": sum(1 for p, (d, _) in decisions.items() if d == "reject" and p in ok),
            "dedupe_overrides": self._count_overrides(),
        }

    def _count_overrides(self) -> int:
        """Duplicate-group choices made by hand (keeper / split / merge; curate/stages/overrides.py)."""
        q = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='dedupe_overrides'"
        if self.conn.execute(q).fetchone() is None:
            return 0
        return self.conn.execute("SELECT count(*) FROM dedupe_overrides").fetchone()[0]
