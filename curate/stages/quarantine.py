"""Apply decisions by moving rejected files into ``.curate/quarantine/`` (same relative paths), and undo.

Each move is journaled before it happens (state 'pending') and marked 'done' after the atomic rename,
so an interrupted apply can always be reconciled. Nothing is ever deleted or overwritten.

Safety rules, checked for every file before it is touched:

- its manifest path must stay inside the dataset (``curate.io.inside``); a row such as ``../x.jpg``
  or one under a symlinked folder that leads out is skipped with the reason;
- it must still be the file the last scan saw (size and mtime, else its SHA-256); a file replaced
  since is skipped ("rescan and decide again");
- a symlink and the dataset file it points to move together or not at all: when some of them are
  kept and others rejected, none moves (a kept link never dangles). A symlink to a file outside the
  dataset moves as the link itself; the outside file is never touched.

An image's sidecars move with it, each by its own atomic rename, journaled like the image: its caption
files (``a.txt``, ``a.caption``) and the latent / text-encoder caches sd-scripts writes beside it (``a.npz``,
``a_0512x0512_sd.npz``, ``a_te_outputs.npz``, ...). A sidecar another image still in the dataset shares
(``a.png`` rejected, ``a.jpg`` kept) stays. An image whose sidecar already exists in the quarantine is not
moved at all (nothing is overwritten); restore moves each sidecar back unless a file took its place.

An image's line in a ``metadata.jsonl`` (HF imagefolder: ``file_name`` relative to the file's folder, in its
folder or any above) leaves that file with it, or a diffusers dataset trained as it is points at an image that
is gone (``datasets`` fails on it); the line is kept in ``.curate/quarantine/metadata_lines.jsonl`` with its
place, and restore puts it back there unless the file meanwhile has a line for that image.

The quarantine keeps its own index, ``.curate/quarantine/index.json`` (written atomically before the
moves of a batch and after them), listing what it holds, so ``restore`` works without the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CurateError
from ..io import IMAGE_EXTENSIONS, STATE_DIR, PathOutside, atomic_write, atomic_write_text, inside
from ..manifest import Manifest

QUARANTINE = "quarantine"
INDEX_NAME = "index.json"
CAPTION_SIDECARS = (".txt", ".caption")  # curate.stages.user_captions.SIDECARS, what trainers read
# sd-scripts' disk caches beside an image (library/strategy_*.py): <stem>.npz (old SD), <stem>_WWWWxHHHH_<arch>.npz
# latents and <stem>_<arch>_te.npz / <stem>_te_outputs.npz text-encoder outputs.
_NPZ_TAIL = re.compile(
    r"(?:_\d{4}x\d{4})?_(?:sd|sdxl|sd3|flux|anima|hi|lumina)\.npz|_(?:te_outputs|sd3_te|flux_te|anima_te|hi_te|lumina_te)\.npz"
)


@dataclass
class MoveResult:
    batch: str | None
    moved: list[str] = field(default_factory=list)  # images
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    sidecars: list[str] = field(default_factory=list)  # captions / latent caches moved with their images
    jsonl_lines: list[str] = field(default_factory=list)  # <dir/>metadata.jsonl::<image>: caption lines moved

    def as_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "moved": self.moved, "sidecars": self.sidecars,
                "jsonl_lines": self.jsonl_lines, "skipped": [list(s) for s in self.skipped]}  # fmt: skip


def _owners(name: str) -> list[str]:
    """The image stems a file name is a sidecar of (``a_0512x0512_sd.npz``: ``a``, and ``a_0512x0512_sd``
    as an old-style ``.npz``), or [] for other files."""
    base, ext = os.path.splitext(name)
    if ext in CAPTION_SIDECARS:
        return [base]
    if ext != ".npz":
        return []
    m = _NPZ_TAIL.search(name)
    return [base] + ([name[: m.start()]] if m and m.end() == len(name) and m.start() > 0 else [])


@dataclass
class _Folder:
    """One folder's files, indexed for sidecar look-ups: image stem -> image names, stem -> sidecar names."""

    images: dict[str, set[str]] = field(default_factory=dict)
    sidecars: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> _Folder:
        out = cls()
        try:
            names = [e.name for e in os.scandir(folder) if not e.is_dir(follow_symlinks=False)]
        except OSError:
            return out
        for n in names:
            stem, ext = os.path.splitext(n)
            if ext.lower() in IMAGE_EXTENSIONS:
                out.images.setdefault(stem, set()).add(n)
            for owner in _owners(n):
                out.sidecars.setdefault(owner, []).append(n)
        return out


def is_sidecar(rel: str) -> bool:
    """A journal / index entry of a sidecar (not an image): restore counts those apart."""
    return os.path.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS


def quarantine_dir(manifest: Manifest) -> Path:
    return manifest.root / STATE_DIR / QUARANTINE


# -- the quarantine's own index --------------------------------------------------------------------
def read_index(qdir: Path) -> list[dict[str, Any]]:
    """Entries ({batch, src, dst, sha256, state, at}) of files believed to be in the quarantine."""
    path = qdir / INDEX_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise CurateError(
            f"quarantine index {path} is unreadable ({exc}); the quarantined files are untouched: "
            f"fix or remove the index and move files back from {qdir} by hand"
        ) from None
    moves = data.get("moves") if isinstance(data, dict) else None
    if not isinstance(moves, list):
        raise CurateError(f"quarantine index {path} has no 'moves' list; fix or remove it")
    return [
        m
        for m in moves
        if isinstance(m, dict) and isinstance(m.get("src"), str) and isinstance(m.get("dst"), str)
    ]


def write_index(qdir: Path, moves: list[dict[str, Any]]) -> None:
    qdir.mkdir(parents=True, exist_ok=True)
    body = {
        "version": 1,
        "about": "files curate moved here; `curate restore` moves them back",
        "moves": moves,
    }
    atomic_write_text(qdir / INDEX_NAME, json.dumps(body, indent=1, ensure_ascii=False) + "\n")


def _lexists(p: Path) -> bool:
    return os.path.lexists(p)


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if _lexists(dst):
        raise FileExistsError(dst)
    os.rename(
        src, dst
    )  # atomic on one filesystem; never copies-then-deletes user data; a link moves as a link


def reconcile(manifest: Manifest) -> int:
    """Finish journal entries left 'pending' by an interrupted apply/restore. Returns how many."""
    root, qdir = manifest.root, quarantine_dir(manifest)
    fixed = 0
    for row in list(manifest.conn.execute("SELECT id, src, dst FROM moves WHERE state='pending'")):
        try:
            in_q = _lexists(inside(qdir, row["dst"]))
            in_root = _lexists(inside(root, row["src"]))
        except PathOutside:
            in_q, in_root = False, True
        state = "done" if in_q and not in_root else "restored"
        with manifest.transaction():
            manifest.conn.execute("UPDATE moves SET state=? WHERE id=?", (state, row["id"]))
            manifest.set_file_status(row["src"], "quarantined" if state == "done" else "ok")
        fixed += 1
    return fixed


# -- checks before a move ----------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _changed_since_scan(src: Path, row: Any) -> str | None:
    """Why ``src`` is no longer the file the last scan recorded, or None when it still is."""
    if not _lexists(src):
        return "gone since the last scan; run `curate scan`"
    if row["sha256"] is None:  # unreadable or a broken link at scan time: nothing to compare, moved as is
        return None
    try:
        st = os.stat(src)
    except OSError as exc:
        return f"cannot be read now ({exc.strerror}); run `curate scan`"
    if st.st_size == row["size"] and st.st_mtime_ns == row["mtime_ns"]:
        return None
    try:
        same = _sha256(src) == row["sha256"]
    except OSError as exc:
        return f"cannot be read now ({exc.strerror}); run `curate scan`"
    if not same:
        return "replaced since the last scan (its bytes changed); run `curate scan` and decide again"
    return None


def _link_families(root: Path, present: set[str]) -> dict[str, frozenset[str]]:
    """path -> every dataset path that is the same file through symlinks (the target and its links)."""
    root_real = Path(os.path.realpath(root))
    groups: dict[str, set[str]] = {}
    for rel in present:
        try:
            p = inside(root, rel)
        except PathOutside:
            continue
        if not os.path.islink(p):
            continue
        try:
            target = Path(os.path.realpath(p)).relative_to(root_real).as_posix()
        except ValueError:
            continue  # points outside the dataset: the link is the dataset's file, moved on its own
        if target in present and target != rel:
            groups.setdefault(target, {target}).add(rel)
    return {m: frozenset(g) for g in groups.values() for m in g}


def apply_rejects(manifest: Manifest, *, dry_run: bool = False) -> MoveResult:
    """Move every rejected file that is still in the dataset into the quarantine folder."""
    reconcile(manifest)
    root, qdir = manifest.root, quarantine_dir(manifest)
    rejected = manifest.rejected_paths()
    rows = {
        r["path"]: r
        for r in manifest.conn.execute("SELECT path, sha256, size, mtime_ns FROM files WHERE status='ok'")
    }
    batch = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    res = MoveResult(batch)
    families = _link_families(root, set(rows))
    plan: list[tuple[str, Path, Path]] = []
    for rel in sorted(p for p in rejected if p in rows):
        try:
            src, dst = inside(root, rel), inside(qdir, rel)
        except PathOutside as exc:
            res.skipped.append((rel, f"not touched: this manifest path is {exc}, outside {root}"))
            continue
        family = families.get(rel)
        if family:
            kept = sorted(m for m in family if m not in rejected)
            if kept:
                res.skipped.append(
                    (
                        rel,
                        f"not moved: it is the same file as kept {kept[0]} through a symlink, and a link "
                        "and its target move together (reject both, or keep both)",
                    )  # fmt: skip
                )
                continue
        why = _changed_since_scan(src, rows[rel])
        if why:
            res.skipped.append((rel, why))
            continue
        if _lexists(dst):
            res.skipped.append((rel, f"{dst} already exists"))
            continue
        plan.append((rel, src, dst))
    sidecars = _plan_sidecars(root, qdir, plan, res)
    if dry_run:
        res.moved = [rel for rel, _, _ in plan]
        res.sidecars = [s for rel, _, _ in plan for s, _, _ in sidecars.get(rel, [])]
        res.jsonl_lines = [
            f"{m}::{rel}" for m, found in _jsonl_lines(root, res.moved).items() for rel in found
        ]
        return res
    if plan:
        index = read_index(qdir)
        entries = []
        for rel, _, _ in plan:
            entries.append({"batch": batch, "src": rel, "dst": rel, "sha256": rows[rel]["sha256"],
                            "state": "pending", "at": time.time()})  # fmt: skip
            entries += [
                {"batch": batch, "src": s, "dst": s, "sidecar_of": rel, "state": "pending", "at": time.time()}
                for s, _, _ in sidecars.get(rel, [])
            ]
        write_index(qdir, index + entries)  # before any move: the index never misses a quarantined file
        by_src = {e["src"]: e for e in entries}
        attempted: set[str] = set()
        try:
            for rel, src, dst in plan:
                side = sidecars.get(rel, [])
                attempted.update([rel, *(s for s, _, _ in side)])
                outcome = _move_one(manifest, batch, rel, src, dst, side, res)
                for s, _, _ in [(rel, src, dst), *side]:
                    by_src[s]["state"] = "done" if s in outcome else "failed"
        finally:
            # The entry of a move cut short stays 'pending'; restore settles it by looking at the disk.
            keep = [e for e in entries if e["src"] in attempted and e["state"] != "failed"]
            with contextlib.suppress(OSError):
                write_index(qdir, index + keep)
            _take_jsonl_lines(root, qdir, batch, res)
    if not res.moved:
        res.batch = None
    return res


def _plan_sidecars(
    root: Path, qdir: Path, plan: list[tuple[str, Path, Path]], res: MoveResult
) -> dict[str, list[tuple[str, Path, Path]]]:
    """image -> its sidecars (rel, src, dst) that move with it. A sidecar an image staying in the dataset
    shares stays; an image whose sidecar already exists in the quarantine leaves ``plan`` (never overwrite)."""
    folders: dict[Path, _Folder] = {}
    while True:
        moving = {src for _, src, _ in plan}
        out: dict[str, list[tuple[str, Path, Path]]] = {}
        claimed: set[Path] = set()
        blocked = None
        for rel, src, _dst in plan:
            if src.parent not in folders:
                folders[src.parent] = _Folder.read(src.parent)
            here = folders[src.parent]
            side = []
            for name in sorted(here.sidecars.get(src.stem, [])):
                s_src = src.parent / name
                staying = any(
                    src.parent / img not in moving
                    for owner in _owners(name)
                    for img in here.images.get(owner, ())
                )
                if s_src in claimed or staying:
                    continue  # moves with another rejected image, or stays with a kept one
                s_rel = (Path(rel).parent / name).as_posix()
                s_dst = inside(qdir, s_rel)
                if _lexists(s_dst):
                    blocked = (rel, f"not moved: its sidecar {s_dst} already exists in the quarantine")
                    break
                claimed.add(s_src)
                side.append((s_rel, s_src, s_dst))
            if blocked:
                break
            if side:
                out[rel] = side
        if blocked is None:
            return out
        res.skipped.append(blocked)
        plan[:] = [p for p in plan if p[0] != blocked[0]]


def _move_one(
    manifest: Manifest,
    batch: str,
    rel: str,
    src: Path,
    dst: Path,
    sidecars: list[tuple[str, Path, Path]],
    res: MoveResult,
) -> set[str]:
    """Move an image, then each of its sidecars; every move journaled. Returns the paths that moved."""
    with manifest.transaction():
        ids = [
            manifest.conn.execute(
                "INSERT INTO moves(batch, src, dst, state, at) VALUES (?,?,?,?,?)",
                (batch, r, r, "pending", time.time()),
            ).lastrowid
            for r in [rel, *(s for s, _, _ in sidecars)]
        ]
    try:
        _move(src, dst)
    except OSError as exc:
        with manifest.transaction():
            manifest.conn.executemany("DELETE FROM moves WHERE id=?", [(i,) for i in ids])
        res.skipped.append((rel, str(exc)))
        return set()
    with manifest.transaction():
        manifest.conn.execute("UPDATE moves SET state='done' WHERE id=?", (ids[0],))
        manifest.set_file_status(rel, "quarantined")
    res.moved.append(rel)
    done = {rel}
    for (s_rel, s_src, s_dst), move_id in zip(sidecars, ids[1:], strict=True):
        try:
            _move(s_src, s_dst)
        except OSError as exc:
            with manifest.transaction():
                manifest.conn.execute("DELETE FROM moves WHERE id=?", (move_id,))
            res.skipped.append((s_rel, f"sidecar of {rel} not moved: {exc}"))
            continue
        with manifest.transaction():
            manifest.conn.execute("UPDATE moves SET state='done' WHERE id=?", (move_id,))
        res.sidecars.append(s_rel)
        done.add(s_rel)
    return done


# -- restore ------------------------------------------------------------------------------------------
def restore(manifest: Manifest, *, batch: str | None = None, all_batches: bool = True) -> MoveResult:
    """Move quarantined files back to where they were. Never overwrites a file that took their place.

    The manifest's journal and the quarantine's own index are both read, so a lost or rebuilt manifest
    still restores everything the index lists.
    """
    reconcile(manifest)
    root, qdir = manifest.root, quarantine_dir(manifest)
    index = read_index(qdir)
    journal = list(manifest.conn.execute("SELECT id, batch, src, dst, state FROM moves ORDER BY id"))
    known = {(str(r["batch"]), r["src"]) for r in journal}
    # (manifest row id or None, batch, src, dst), newest first
    todo: list[tuple[int | None, str, str, str]] = [
        (r["id"], r["batch"], r["src"], r["dst"]) for r in journal if r["state"] == "done"
    ]
    todo += [
        (None, str(e.get("batch", "")), e["src"], e["dst"])
        for e in index
        if (str(e.get("batch", "")), e["src"]) not in known and e.get("state") in ("done", "pending")
    ]
    if not all_batches and batch is None and todo:
        batch = max(todo, key=lambda t: t[1])[1]
    if batch:
        todo = [t for t in todo if t[1] == batch]
        if not todo:
            raise CurateError(f"no quarantine batch {batch!r} (see {qdir / INDEX_NAME})")
    todo.sort(key=lambda t: (t[1], t[0] or 0), reverse=True)
    res = MoveResult(batch)
    restored: set[tuple[str, str]] = set()
    listed = {t[3] for t in todo}
    try:
        for move_id, b, rel, qrel in todo:
            try:
                src, dst = inside(qdir, qrel), inside(root, rel)
            except PathOutside as exc:
                res.skipped.append((rel, f"not touched: this path is {exc}"))
                continue
            if not _lexists(src):
                if move_id is not None:
                    res.skipped.append((rel, f"{src} is gone from the quarantine"))
                elif _lexists(dst):
                    restored.add((b, rel))  # an earlier restore got it back before the index was updated
                else:
                    res.skipped.append((rel, f"{src} is gone from the quarantine"))
                continue
            if _restore_one(manifest, move_id, src, dst, rel, res):
                restored.add((b, rel))
    finally:
        if restored or index:
            left = [e for e in index if (str(e.get("batch", "")), e["src"]) not in restored]
            with contextlib.suppress(OSError):
                if left != index:
                    write_index(qdir, left)
        _give_jsonl_lines(root, qdir, {rel for _, rel in restored}, res)
    if batch is None:
        for stray in _unlisted(qdir, listed):
            res.skipped.append(
                (stray, "in the quarantine but in neither its index nor the manifest; move it back by hand")
            )
    return res


def _restore_one(
    manifest: Manifest, move_id: int | None, src: Path, dst: Path, rel: str, res: MoveResult
) -> bool:
    if move_id is not None:
        with manifest.transaction():
            manifest.conn.execute("UPDATE moves SET state='pending' WHERE id=?", (move_id,))
    try:
        _move(src, dst)
    except OSError as exc:
        if move_id is not None:
            with manifest.transaction():
                manifest.conn.execute("UPDATE moves SET state='done' WHERE id=?", (move_id,))
        if isinstance(exc, FileExistsError):  # never overwritten: say what is where, and what to do
            try:
                where = src.relative_to(manifest.root).as_posix()
            except ValueError:
                where = str(src)
            why = (f"a file is already there (left as it is); the quarantined one stays at {where}: compare "
                   "them and move it back by hand if you want it")  # fmt: skip
        else:
            why = f"not restored: {exc}"
        res.skipped.append((rel, why))
        return False
    with manifest.transaction():
        if move_id is not None:
            manifest.conn.execute("UPDATE moves SET state='restored' WHERE id=?", (move_id,))
        manifest.set_file_status(rel, "ok")
    (res.sidecars if is_sidecar(rel) else res.moved).append(rel)
    return True


def _unlisted(qdir: Path, listed: set[str]) -> list[str]:
    """Image files under the quarantine that nothing records (so restore cannot know where they belong)."""
    if not qdir.is_dir():
        return []
    out = []
    for dirpath, _dirs, files in os.walk(qdir):
        for name in files:
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            rel = Path(dirpath, name).relative_to(qdir).as_posix()
            if rel not in listed:
                out.append(rel)
    return sorted(out)


# -- metadata.jsonl lines ------------------------------------------------------------------------------
JSONL = "metadata.jsonl"  # curate.stages.user_captions.JSONL
LINES_NAME = (
    "metadata_lines.jsonl"  # the lines taken out of the dataset's metadata.jsonl files, with their place
)


def _split_lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


def _file_name(line: bytes) -> str | None:
    """The ``file_name`` of one metadata.jsonl line (normalised, relative to the file's folder), or None."""
    text = line.decode("utf-8", "replace").lstrip("\ufeff").strip()
    if not text:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    name = obj.get("file_name") if isinstance(obj, dict) else None
    if not isinstance(name, str) or not name:
        return None
    return os.path.normpath(name).replace(os.sep, "/")


def _jsonl_files(root: Path, rel: str) -> list[tuple[str, str]]:
    """(metadata.jsonl path, the file_name of ``rel`` in it) for every folder from ``rel``'s up to the root."""
    parts = rel.split("/")
    out = []
    for i in range(len(parts) - 1, -1, -1):
        d = "/".join(parts[:i])
        meta = f"{d}/{JSONL}" if d else JSONL
        if os.path.isfile(root / meta) and not os.path.islink(root / meta):
            out.append((meta, "/".join(parts[i:])))
    return out


def _jsonl_lines(root: Path, images: list[str]) -> dict[str, list[str]]:
    """metadata.jsonl path -> the images among ``images`` that have a line in it."""
    wanted: dict[str, dict[str, str]] = {}  # meta -> file_name -> image
    for rel in images:
        for meta, name in _jsonl_files(root, rel):
            wanted.setdefault(meta, {})[name] = rel
    out: dict[str, list[str]] = {}
    for meta, names in wanted.items():
        try:
            lines = _split_lines((root / meta).read_bytes())
        except OSError:
            continue
        found = {names[n] for n in map(_file_name, lines) if n in names}
        if found:
            out[meta] = sorted(found)
    return out


def _read_lines_store(qdir: Path) -> list[dict[str, Any]]:
    try:
        text = (qdir / LINES_NAME).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict) and {"metadata", "image", "line", "at"} <= obj.keys():
                out.append(obj)
    return out


def _write_lines_store(qdir: Path, entries: list[dict[str, Any]]) -> None:
    path = qdir / LINES_NAME
    if not entries:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # curate's own record, empty now
        return
    atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in entries))  # ASCII: any bytes


def _take_jsonl_lines(root: Path, qdir: Path, batch: str, res: MoveResult) -> None:
    """Take the lines of the images ``res`` moved out of their metadata.jsonl files (kept in the quarantine's
    metadata_lines.jsonl first, so a line is never only in memory)."""
    if not res.moved:
        return
    store = _read_lines_store(qdir)
    for meta, images in _jsonl_lines(root, res.moved).items():
        path = root / meta
        try:
            data = path.read_bytes()
        except OSError as exc:
            res.skipped.extend(
                (f"{meta}::{rel}", f"its caption line stays: {exc.strerror}") for rel in images
            )
            continue
        names = {name: rel for rel in images for m, name in _jsonl_files(root, rel) if m == meta}
        lines = _split_lines(data)
        taken = [(i, ln) for i, ln in enumerate(lines) if _file_name(ln) in names]
        new = [{"batch": batch, "metadata": meta, "image": names[_file_name(ln)], "at": i,
                "line": ln.decode("utf-8", "surrogateescape")} for i, ln in taken]  # fmt: skip
        try:
            _write_lines_store(qdir, store + new)
            with atomic_write(path, "wb") as fh:
                fh.write(b"".join(ln for i, ln in enumerate(lines) if i not in {t for t, _ in taken}))
        except OSError as exc:
            with contextlib.suppress(OSError):
                _write_lines_store(qdir, store)
            why = f"its caption line stays in {meta} (cannot rewrite it: {exc.strerror}); remove it by hand"
            res.skipped.extend((f"{meta}::{rel}", why) for rel in images)
            continue
        store += new
        res.jsonl_lines += [f"{meta}::{rel}" for rel in images]


def _give_jsonl_lines(root: Path, qdir: Path, restored: set[str], res: MoveResult) -> None:
    """Put the metadata.jsonl lines of the ``restored`` images back where they were; a line the file has
    again (the same text) is dropped from the store, one it has with other text stays there, said."""
    store = _read_lines_store(qdir)
    mine = [e for e in store if e["image"] in restored]
    if not mine:
        return
    left = [e for e in store if e["image"] not in restored]
    by_meta: dict[str, list[dict[str, Any]]] = {}
    for e in mine:
        by_meta.setdefault(e["metadata"], []).append(e)
    for meta, entries in sorted(by_meta.items()):
        try:
            path = inside(root, meta)
            lines = _split_lines(path.read_bytes()) if _lexists(path) else []
        except (PathOutside, OSError) as exc:
            left += entries
            res.skipped.extend(
                (f"{meta}::{e['image']}", f"caption line not restored: {exc}") for e in entries
            )
            continue
        present = {_file_name(ln): ln for ln in lines}
        back = []
        # newest batch first, each batch's lines by their places then: undoing in the order of applying
        entries = sorted(sorted(entries, key=lambda e: e["at"]), key=lambda e: str(e["batch"]), reverse=True)
        for e in entries:
            raw = e["line"].encode("utf-8", "surrogateescape")
            name = _file_name(raw)
            have = present.get(name)
            if have is None:
                back.append((e, raw))
            elif have.rstrip(b"\r\n") != raw.rstrip(b"\r\n"):
                left.append(e)
                res.skipped.append((f"{meta}::{e['image']}", f"{meta} has another line for {name} now (left as "
                                    f"it is); the quarantined line stays in {LINES_NAME}: compare them"))  # fmt: skip
        for e, raw in back:  # every line back: the file is byte for byte as it was
            at = min(int(e["at"]), len(lines))
            if at == len(lines) and lines and not lines[-1].endswith((b"\n", b"\r")):
                lines[-1] += b"\n"
            if at < len(lines) and not raw.endswith((b"\n", b"\r")):
                raw += b"\n"
            lines.insert(at, raw)
        if not back:
            continue
        try:
            with atomic_write(path, "wb") as fh:
                fh.write(b"".join(lines))
        except OSError as exc:
            left += [e for e, _ in back]
            res.skipped.extend(
                (f"{meta}::{e['image']}", f"caption line not restored: {exc}") for e, _ in back
            )
            continue
        res.jsonl_lines += [f"{meta}::{e['image']}" for e, _ in back]
    with contextlib.suppress(OSError):
        _write_lines_store(qdir, left)
