"""Scan: read every new or changed image once, in parallel, and record metadata, scores and hashes.

One decode per image feeds every metric. Unchanged files (same size and mtime) are not read again;
changed files are hashed first and only decoded when their bytes are new. Results commit in small
batches, so an interrupted scan keeps what it did and a rerun continues.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ScanConfig
from ..io import DecodeError, decode_image, iter_image_files
from ..manifest import Manifest
from .features import safe_extract as dedupe_features
from .features import store as store_features
from .quality import analysis_view, compute_scores

Progress = Callable[[int, int], None]  # (done, total)

_KNOWN: set[str] = set()
_CFG = ScanConfig()


@dataclass
class ScanResult:
    total_files: int = 0
    scanned: int = 0  # files whose bytes were read
    decoded: int = 0  # new distinct images decoded
    unchanged: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # reason -> count
    missing: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    captions: dict[str, Any] = field(default_factory=dict)  # caption files beside the images (user_captions)
    bad_names: list[str] = field(default_factory=list)  # not valid UTF-8 (shown escaped); left out
    linked_folders: list[str] = field(default_factory=list)  # symlinked folders, not followed
    changed: int = 0  # files whose bytes changed since the last scan (their filter/dedupe rejects dropped)
    moved: int = 0  # new paths holding the bytes of a file now missing: its rejects and decisions follow it
    split_kept: int = 0  # changed images that kept the train/val side of their old bytes
    split_notes: list[str] = field(default_factory=list)  # changed images that now sit near the other side

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _init_worker(known: frozenset[str], cfg: ScanConfig, parent: int | None = None) -> None:
    global _KNOWN, _CFG
    _KNOWN, _CFG = set(known), cfg
    if parent is not None:
        _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """Pool worker: exit when the scan process dies, even by SIGKILL, instead of lingering re-parented
    (holding the manifest and the caller's stdout open, so `curate scan D | tee log` would never end)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent handles it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits curate's SIGTERM handler
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    ppid = os.getppid()  # the scan process, or a fork server (forkserver start method) that dies with it

    def orphaned() -> bool:
        if os.getppid() != ppid:
            return True
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    if orphaned():  # the scan died before the death signal was armed
        os._exit(1)

    def watchdog() -> None:  # portable fallback (and for platforms without prctl)
        while True:
            time.sleep(0.5)
            if orphaned():
                os._exit(1)

    threading.Thread(target=watchdog, name="curate-watchdog", daemon=True).start()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM while workers are forked, then deliver them to this process."""
    got: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    try:
        old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in sigs}
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(got):
            os.kill(os.getpid(), s)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel queued work and end the workers now (they hold nothing worth waiting for)."""
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            proc.terminate()


def analyse_bytes(data: bytes, cfg: ScanConfig = ScanConfig()) -> dict[str, Any]:
    """Decode once and compute everything the manifest stores about an image's content."""
    import imagehash

    row: dict[str, Any] = {"size": len(data)}
    try:
        dec = decode_image(data, max_pixels=cfg.max_pixels, draft_size=cfg.draft_size)
    except DecodeError as exc:
        row.update(error=exc.reason, error_detail=exc.detail)
        return row
    view = analysis_view(dec.image)
    row.update(
        format=dec.format,
        mode=dec.mode,
        width=dec.width,
        height=dec.height,
        n_frames=dec.n_frames,
        flags=dec.flags,
        scores=compute_scores(view),
        phash=str(imagehash.phash(view.grey_image)),
        dhash=str(imagehash.dhash(view.grey_image)),
        dedupe_features=dedupe_features(dec.image, data),  # stored by record() into dedupe_features
    )
    return row


def _read_one(path: str) -> tuple[str, dict[str, Any]]:
    """Worker: hash the file, and analyse it unless its bytes are already known."""
    try:
        data = Path(path).read_bytes()
    except PermissionError:
        return path, {"file_error": "unreadable", "detail": "permission denied; fix with chmod +r"}
    except FileNotFoundError:
        return path, {"file_error": "missing", "detail": "file vanished during the scan"}
    except IsADirectoryError:
        return path, {"file_error": "not-a-file", "detail": "is a directory"}
    except OSError as exc:
        return path, {"file_error": "unreadable", "detail": str(exc)[:200]}
    sha = hashlib.sha256(data).hexdigest()
    if sha in _KNOWN:
        return path, {"sha256": sha, "size": len(data), "known": True}
    row = analyse_bytes(data, _CFG)
    row["sha256"] = sha
    _KNOWN.add(sha)  # an exact copy later in this worker's share is not decoded again
    return path, row


def scan(
    manifest: Manifest,
    cfg: ScanConfig = ScanConfig(),
    *,
    progress: Progress | None = None,
    batch_size: int = 64,
    mapper: Callable[[list[str], frozenset[str], ScanConfig], Any] | None = None,
) -> ScanResult:
    """Bring the manifest up to date with the files under ``manifest.root``.

    ``mapper`` runs ``_read_one`` elsewhere (curate.engine.ray_engine); the default is the local pool.
    """
    t0 = time.perf_counter()
    root = manifest.root
    res = ScanResult()
    manifest.ensure_table(PENDING_TABLE)
    index = manifest.file_index()
    todo: list[tuple[str, int, int]] = []  # (rel, size, mtime_ns)
    seen: set[str] = set()
    file_errors: list[tuple[str, str, str]] = []
    for p in iter_image_files(root, linked_dirs=res.linked_folders):
        rel = p.relative_to(root).as_posix()
        res.total_files += 1
        if not _is_utf8(rel):  # the manifest stores paths as UTF-8 TEXT: such a name cannot be recorded
            res.bad_names.append(os.fsencode(rel).decode("utf-8", "backslashreplace"))
            res.errors["bad-filename"] = res.errors.get("bad-filename", 0) + 1
            continue
        seen.add(rel)
        try:
            st = p.stat()
        except FileNotFoundError:
            file_errors.append((rel, "broken-symlink", f"link target {os.readlink(p)!r} does not exist"))
            continue
        except OSError as exc:
            file_errors.append((rel, "unreadable", str(exc)[:200]))
            continue
        prev = index.get(rel)
        if prev and prev[0] and prev[1] == st.st_size and prev[2] == st.st_mtime_ns and prev[3] == "ok":
            res.unchanged += 1
            continue
        todo.append((rel, st.st_size, st.st_mtime_ns))

    with manifest.transaction():
        for rel, reason, detail in file_errors:
            manifest.upsert_file(rel, None, None, None, error=reason, error_detail=detail)
            res.errors[reason] = res.errors.get(reason, 0) + 1
        # Files we knew that are gone (and not quarantined by us) are marked missing, never forgotten.
        for rel, (_sha, _size, _mtime, status) in index.items():
            if rel not in seen and status == "ok":
                manifest.set_file_status(rel, "missing")
                res.missing += 1

    total = len(todo)
    if progress:
        progress(0, total)
    meta = {rel: (size, mtime) for rel, size, mtime in todo}
    known = frozenset(manifest.known_hashes())
    workers = cfg.workers or os.cpu_count() or 1
    abs_paths = [str(root / rel) for rel, _, _ in todo]

    inserted: set[str] = set()

    def record(path: str, row: dict[str, Any]) -> None:
        rel = Path(path).relative_to(root).as_posix()
        size, mtime = meta[rel]
        res.scanned += 1
        if "file_error" in row:
            if row["file_error"] == "missing":
                manifest.set_file_status(rel, "missing")
                res.missing += 1
                return
            manifest.upsert_file(rel, None, size, mtime, error=row["file_error"], error_detail=row["detail"])
            res.errors[row["file_error"]] = res.errors.get(row["file_error"], 0) + 1
            return
        if not row.get("known") and row["sha256"] not in inserted:
            inserted.add(row["sha256"])
            row["scanned_at"] = time.time()
            manifest.upsert_image(row)
            store_features(manifest, row["sha256"], row.get("dedupe_features"))
            res.decoded += 1
            if row.get("error"):
                res.errors[row["error"]] = res.errors.get(row["error"], 0) + 1
        was = index.get(rel)
        if was is None:  # settled after the scan, from the table: also after a scan killed midway
            manifest.conn.execute(
                "INSERT OR REPLACE INTO scan_pending(path, sha256, old_sha256) VALUES (?,?,NULL)",
                (rel, row["sha256"]),
            )
        if was and was[0] and was[0] != row["sha256"]:  # new bytes: the old ones' rejects are stale
            res.changed += 1
            forget_stale_rejects(manifest, rel)
            manifest.conn.execute(
                "INSERT OR REPLACE INTO scan_pending(path, sha256, old_sha256) VALUES (?,?,?)",
                (rel, row["sha256"], was[0]),
            )
        manifest.upsert_file(rel, row["sha256"], size, mtime)

    def run(results) -> None:
        pending = 0
        manifest.conn.execute("BEGIN IMMEDIATE")
        try:
            for done, (path, row) in enumerate(results, 1):
                record(path, row)
                pending += 1
                if pending >= batch_size:
                    manifest.commit()  # fails if the manifest file was deleted meanwhile
                    manifest.conn.execute("BEGIN IMMEDIATE")
                    pending = 0
                if progress:
                    progress(done, total)
        except BaseException:
            # Commit what finished, also on Ctrl-C / SIGTERM: nothing already analysed is lost.
            with contextlib.suppress(Exception):
                manifest.commit()
            if manifest.conn.in_transaction:
                with contextlib.suppress(Exception):
                    manifest.conn.execute("ROLLBACK")
            raise
        manifest.commit()

    try:
        if mapper is not None:
            run(mapper(abs_paths, known, cfg))
        elif workers <= 1 or total < 16:
            _init_worker(known, cfg)
            run(map(_read_one, abs_paths))
        else:
            with ProcessPoolExecutor(
                workers, initializer=_init_worker, initargs=(known, cfg, os.getpid())
            ) as pool:
                try:
                    # map() forks the workers: none may start with curate's signal handlers
                    with _signals_deferred():
                        results = pool.map(_read_one, abs_paths, chunksize=4)
                    run(results)
                except BaseException:
                    _stop_pool(pool)
                    raise
    except KeyboardInterrupt:
        # Ctrl-C / SIGTERM: keep the scan rejects consistent with what was committed, then let the caller
        # exit 130 / 143 (an interrupted scan is not a success).
        res.interrupted = True
        with contextlib.suppress(Exception):
            settle_pending(manifest, res)
        with contextlib.suppress(Exception):
            _write_scan_rejects(manifest)
        raise
    settle_pending(manifest, res)
    _write_scan_rejects(manifest)
    res.captions = _refresh_captions(manifest).as_dict()
    res.seconds = time.perf_counter() - t0
    return res


STALE_STAGES = ("filter", "dedupe")

# Files a scan recorded as new paths (old_sha256 NULL) or with new bytes (old_sha256: the bytes before), written
# in the transaction that records the file and cleared once settled, so a scan interrupted or killed midway
# settles them on the rerun as a completed scan would: moves carried over, split sides kept.
PENDING_TABLE = """
CREATE TABLE IF NOT EXISTS scan_pending (
    path       TEXT PRIMARY KEY,
    sha256     TEXT NOT NULL,
    old_sha256 TEXT
);
"""


def settle_pending(manifest: Manifest, res: ScanResult) -> None:
    """Carry moves over and keep changed images' split sides for every file ``scan_pending`` lists."""
    rows = list(manifest.conn.execute("SELECT path, sha256, old_sha256 FROM scan_pending ORDER BY path"))
    if not rows:
        return
    res.moved += carry_over_moves(manifest, [(p, sha) for p, sha, old in rows if old is None])
    changed = [(p, sha, old) for p, sha, old in rows if old is not None]
    if changed:
        kept, notes = keep_split_sides(manifest, changed)
        res.split_kept += kept
        res.split_notes += notes
    with manifest.transaction():
        manifest.conn.executemany(
            "DELETE FROM scan_pending WHERE path=? AND sha256=?", [(p, sha) for p, sha, _ in rows]
        )


def keep_split_sides(manifest: Manifest, changed: list[tuple[str, str, str]]) -> tuple[int, list[str]]:
    """An image edited in place (same path, new bytes) keeps the train/val side of its old bytes, and a
    `curate review` move of them, unless its new pixels are a near-duplicate (split's pHash rule) of a kept
    image on the other side: then it joins that side, said in a note, so the split stays leak-free.
    Returns (how many kept their side, notes)."""
    from .dedupe import hex_to_u64
    from .split import MOVES_KEY, PHASH_THRESHOLD

    sides = {sha: side for sha, side in manifest.conn.execute("SELECT sha256, split FROM images")}
    if not any(sides.get(old) for _, _, old in changed):
        return 0, []
    records = [r for r in manifest.kept_images() if r.split in ("train", "val") and r.phash]
    phash = {sha: ph for sha, ph in manifest.conn.execute("SELECT sha256, phash FROM images")}
    hashes = hex_to_u64([r.phash for r in records]) if records else None
    moves = json.loads(manifest.get_meta(MOVES_KEY) or "{}")
    kept, notes, updates = 0, [], {}
    for rel, sha, old in changed:
        side = sides.get(old)
        if side not in ("train", "val") or sides.get(sha) is not None:
            continue  # no side to keep, or these bytes already have one (a copy of a known image)
        other = "val" if side == "train" else "train"
        near: list[str] = []
        if hashes is not None and phash.get(sha):
            dist = _popcount(hashes ^ hex_to_u64([phash[sha]])[0])
            near = [r.path for r, d in zip(records, dist.tolist(), strict=True)
                    if d <= PHASH_THRESHOLD and r.split == other and r.sha256 != sha]  # fmt: skip
        if near:
            notes.append(
                f"{rel} changed and is now a near-duplicate of {near[0]} on the {other} side: it moves from "
                f"{side} to {other} so the split stays leak-free (`curate split` deals the sides again)"
            )
            side = other
        else:
            kept += 1
        updates[sha] = {"split": side}
        sides[sha] = side
        if old in moves:
            moves[sha] = side
    if updates:
        with manifest.transaction():
            manifest.update_images(updates.items())
            if any(old in moves for _, _, old in changed):
                manifest.set_meta(MOVES_KEY, json.dumps(moves))
    return kept, notes


def _popcount(x):
    import numpy as np

    x = x.astype(np.uint64)
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def carry_over_moves(manifest: Manifest, arrived: list[tuple[str, str]]) -> int:
    """A new path whose bytes are those of a file now missing is that file moved (into a concept folder,
    say): its filter / dedupe rejects and the person's keep / reject go with it, so a rejected image does
    not come back as new, and the old path's row is dropped (one file, one row: a 'missing' row left
    beside it was counted and listed as a lost file, and took the decisions back when the file returned
    there). A caption file curate wrote that moved with it stays curate's. Returns how many moves."""
    if not arrived:
        return 0
    from .captions import TABLES as CAPTION_TABLES

    manifest.ensure_table(CAPTION_TABLES)
    gone: dict[str, list[str]] = {}
    for path, sha in manifest.conn.execute(
        "SELECT path, sha256 FROM files WHERE status='missing' ORDER BY path"
    ):
        gone.setdefault(sha, []).append(path)
    st = ",".join("?" * len(STALE_STAGES))
    n = 0
    with manifest.transaction():
        for rel, sha in arrived:
            olds = gone.get(sha)
            if not olds:
                continue
            old = olds.pop(0)  # one new path per old one: copies made elsewhere stay new files
            n += 1
            manifest.conn.execute(
                f"DELETE FROM rejects WHERE path=? AND stage IN ({st})", (rel, *STALE_STAGES)
            )
            manifest.conn.execute(
                f"INSERT INTO rejects(path, stage, reason, detail) SELECT ?, stage, reason, detail"
                f" FROM rejects WHERE path=? AND stage IN ({st})",
                (rel, old, *STALE_STAGES),
            )
            if manifest.conn.execute("SELECT 1 FROM decisions WHERE path=?", (old,)).fetchone():
                manifest.conn.execute("DELETE FROM decisions WHERE path=?", (rel,))
                manifest.conn.execute(
                    "INSERT INTO decisions(path, decision, reason, at) SELECT ?, decision, reason, at"
                    " FROM decisions WHERE path=?",
                    (rel, old),
                )
            _carry_caption_records(manifest, old, rel)
            for table in ("files", "rejects", "decisions"):
                manifest.conn.execute(f"DELETE FROM {table} WHERE path=?", (old,))
    return n


def _carry_caption_records(manifest: Manifest, old: str, new: str) -> None:
    """The caption files curate wrote beside ``old`` (``a.txt``, ``a.caption``) are curate's beside ``new``
    too when they moved along (same text): re-tagging may rewrite them, as before the move."""
    old_stem, new_stem = os.path.splitext(old)[0], os.path.splitext(new)[0]
    for ext in (".txt", ".caption"):
        row = manifest.conn.execute(
            "SELECT sha256, digest, at FROM caption_files WHERE target=?", (old_stem + ext,)
        ).fetchone()
        if row is None or (manifest.root / (old_stem + ext)).exists():
            continue  # none written there, or it stayed behind
        manifest.conn.execute(
            "INSERT OR IGNORE INTO caption_files(target, sha256, digest, at) VALUES (?,?,?,?)",
            (new_stem + ext, row[0], row[1], row[2]),
        )


def forget_stale_rejects(manifest: Manifest, rel: str) -> None:
    """``rel`` holds new bytes: drop the filter / dedupe rejects made on the old ones (a cropped panorama
    is no longer too wide; `curate apply` must not quarantine it for that) and note the file for those
    stages, so export says to run them again (`set_rejects` clears the note)."""
    manifest.conn.execute(
        f"DELETE FROM rejects WHERE path=? AND stage IN ({','.join('?' * len(STALE_STAGES))})",
        (rel, *STALE_STAGES),
    )
    for stage in STALE_STAGES:
        if manifest.stage_ran(stage):
            key = f"changed_since.{stage}"
            paths = json.loads(manifest.get_meta(key) or "[]")
            if rel not in paths:
                manifest.set_meta(key, json.dumps([*paths, rel]))


def _refresh_captions(manifest: Manifest):
    from .user_captions import refresh

    return refresh(manifest)


def _is_utf8(name: str) -> bool:
    """False for a name os.walk decoded with surrogate escapes (its bytes are not UTF-8)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _write_scan_rejects(manifest: Manifest) -> None:
    """Unusable files become 'scan' rejects with their reason."""
    rejects: dict[str, tuple[str, str | None]] = {}
    for row in manifest.conn.execute(
        "SELECT f.path, i.error, i.error_detail FROM files f JOIN images i ON i.sha256=f.sha256"
        " WHERE i.error IS NOT NULL AND f.status='ok'"
    ):
        rejects[row[0]] = (row[1], row[2])
    for row in manifest.file_errors():
        rejects[row["path"]] = (row["error"], row["error_detail"])
    manifest.set_rejects("scan", rejects)
