"""Apply decisions by moving rejected files into ``.curate/quarantine/`` (same relative paths), and undo.

Each move is journaled before it happens (state 'pending') and marked 'done' after the atomic rename,
so an interrupted apply can always be reconciled. Nothing is ever deleted or overwritten.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CurateError
from ..io import STATE_DIR
from ..manifest import Manifest

QUARANTINE = "quarantine"


@dataclass
class MoveResult:
    batch: str | None
    moved: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    def as_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "moved": self.moved, "skipped": [list(s) for s in self.skipped]}


def quarantine_dir(manifest: Manifest) -> Path:
    return manifest.root / STATE_DIR / QUARANTINE


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(dst)
    os.rename(src, dst)  # atomic on one filesystem; never copies-then-deletes user data


def reconcile(manifest: Manifest) -> int:
    """Finish journal entries left 'pending' by an interrupted apply/restore. Returns how many."""
    root, qdir = manifest.root, quarantine_dir(manifest)
    fixed = 0
    for row in list(manifest.conn.execute("SELECT id, src, dst FROM moves WHERE state='pending'")):
        in_q = (qdir / row["dst"]).exists() or (qdir / row["dst"]).is_symlink()
        in_root = (root / row["src"]).exists() or (root / row["src"]).is_symlink()
        state = "done" if in_q and not in_root else "restored"
        with manifest.transaction():
            manifest.conn.execute("UPDATE moves SET state=? WHERE id=?", (state, row["id"]))
            manifest.set_file_status(row["src"], "quarantined" if state == "done" else "ok")
        fixed += 1
    return fixed


def apply_rejects(manifest: Manifest, *, dry_run: bool = False) -> MoveResult:
    """Move every rejected file that is still in the dataset into the quarantine folder."""
    reconcile(manifest)
    rejected = manifest.rejected_paths()
    present = {r["path"] for r in manifest.conn.execute("SELECT path FROM files WHERE status='ok'")}
    batch = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    res = MoveResult(batch)
    qdir = quarantine_dir(manifest)
    for rel in sorted(p for p in rejected if p in present):
        src, dst = manifest.root / rel, qdir / rel
        if dry_run:
            res.moved.append(rel)
            continue
        if dst.exists() or dst.is_symlink():
            res.skipped.append((rel, f"{dst} already exists"))
            continue
        with manifest.transaction():
            cur = manifest.conn.execute(
                "INSERT INTO moves(batch, src, dst, state, at) VALUES (?,?,?,?,?)",
                (batch, rel, rel, "pending", time.time()),
            )
        move_id = cur.lastrowid
        try:
            _move(src, dst)
        except OSError as exc:
            with manifest.transaction():
                manifest.conn.execute("DELETE FROM moves WHERE id=?", (move_id,))
            res.skipped.append((rel, str(exc)))
            continue
        with manifest.transaction():
            manifest.conn.execute("UPDATE moves SET state='done' WHERE id=?", (move_id,))
            manifest.set_file_status(rel, "quarantined")
        res.moved.append(rel)
    if not res.moved:
        res.batch = None
    return res


def restore(manifest: Manifest, *, batch: str | None = None, all_batches: bool = True) -> MoveResult:
    """Move quarantined files back to where they were. Never overwrites a file that took their place."""
    reconcile(manifest)
    q = "SELECT id, batch, src, dst FROM moves WHERE state='done'"
    args: tuple = ()
    if batch:
        q += " AND batch=?"
        args = (batch,)
    elif not all_batches:
        last = manifest.conn.execute(
            "SELECT batch FROM moves WHERE state='done' ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if last is None:
            return MoveResult(None)
        q += " AND batch=?"
        args = (last[0],)
    rows = list(manifest.conn.execute(q + " ORDER BY id DESC", args))
    if batch and not rows:
        raise CurateError(f"no quarantine batch {batch!r}; `curate restore --list` shows batches")
    res = MoveResult(batch)
    qdir = quarantine_dir(manifest)
    for row in rows:
        src, dst = qdir / row["dst"], manifest.root / row["src"]
        if not (src.exists() or src.is_symlink()):
            res.skipped.append((row["src"], f"{src} is gone from the quarantine"))
            continue
        with manifest.transaction():
            manifest.conn.execute("UPDATE moves SET state='pending' WHERE id=?", (row["id"],))
        try:
            _move(src, dst)
        except OSError as exc:
            with manifest.transaction():
                manifest.conn.execute("UPDATE moves SET state='done' WHERE id=?", (row["id"],))
            res.skipped.append((row["src"], f"not restored: {exc}"))
            continue
        with manifest.transaction():
            manifest.conn.execute("UPDATE moves SET state='restored' WHERE id=?", (row["id"],))
            manifest.set_file_status(row["src"], "ok")
        res.moved.append(row["src"])
    return res
