"""What `curate review` reads and changes: duplicate groups, rejects, captions, split and buckets.

Every change is one manifest transaction through a short-lived writer (so the CLI can run between clicks)
and journaled with the state it replaced in the ``review_undo`` table of the manifest itself, in the same
transaction, so a change and its undo record never disagree. Caption files are written the way
``curate`` writes a person's captions (stages/user_captions.py: atomic, other text backed up first).
Undo restores the recorded state; nothing is deleted (a caption file review created is moved into
``.curate/caption_backups/`` on undo).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import FilterConfig, override
from ..dataset import Dataset
from ..errors import CurateError
from ..io import STATE_DIR, atomic_write_texts
from ..manifest import ImageRecord, Manifest
from ..stages.overrides import TABLE as OVERRIDES_TABLE

UNDO_TABLE = """
CREATE TABLE IF NOT EXISTS review_undo (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      REAL NOT NULL,
    action  TEXT NOT NULL,          -- what was done, in words
    before  TEXT NOT NULL,          -- JSON: the rows / caption files the change replaced
    undone  REAL                    -- when it was undone (the row stays)
);
"""
FILTER_META = "review.filter"  # thresholds last applied from the review page (JSON)
GROUP_COLS = ("dup_group", "dup_keeper", "dup_explain", "split")
THRESHOLDS = ("min_sharpness", "min_brightness", "max_brightness", "min_entropy", "min_side", "max_aspect")
BY_HAND = "keeper chosen in curate review"
_LINE = re.compile(r"^(kept|dropped) (.+?)( \([^()]*\))?(: .*)?$")


def _chunks(items: list, n: int = 500) -> Iterator[list]:
    for k in range(0, len(items), n):
        yield items[k : k + n]


def link_evidence(explain: str | None) -> list[tuple[str, str, dict[str, float], str]]:
    """(a, b, numbers, words) per link line of a group's explain text (what the manifest records)."""
    out = []
    for line in (explain or "").splitlines():
        if not (line.startswith("  ") and " ~ " in line and ": " in line):
            continue
        pair, words = line.strip().split(": ", 1)
        a, b = pair.split(" ~ ", 1)
        nums: dict[str, float] = {}
        for key, pat in (
            ("phash", r"pHash distance (\d+)"),
            ("dhash", r"dHash distance (\d+)"),
            ("inliers", r"(\d+) RANSAC inliers"),
            ("ncc", r"NCC (-?[\d.]+)"),
            ("clip", r"CLIP similarity (-?[\d.]+)"),
        ):
            m = re.search(pat, words)
            if m:
                nums[key] = float(m.group(1))
        out.append((a, b, nums, words))
    return out


class Review:
    """The dataset as the review page sees it: cached reads, journaled writes."""

    def __init__(
        self, root: str | Path, manifest: str | Path | None = None, config: str | Path | None = None
    ):
        self.ds = Dataset.open(root, manifest=manifest, config=config, create=False, write=False)
        self.root = self.ds.root
        self.path = self.ds.manifest.path
        self.config = self.ds.config
        self._cache: dict[str, Any] = {}
        self._version: Any = None
        from ..stages.user_captions import refresh

        with self.writer() as m:
            m.ensure_table(UNDO_TABLE)
            m.ensure_table(OVERRIDES_TABLE)
            refresh(m)  # captions edited by hand since the last scan count

    def close(self) -> None:
        self.ds.close()

    @property
    def reader(self) -> Manifest:
        return self.ds.manifest

    @contextlib.contextmanager
    def writer(self) -> Iterator[Manifest]:
        """A writer for one change: takes the dataset's writer lock only while it lasts."""
        m = Manifest(self.root, self.path, create=False, write=True)
        try:
            yield m
        finally:
            m.close()
            self._cache.clear()

    # -- cached reads ------------------------------------------------------------------------------
    def _cached(self, key: str, make):
        version = self.reader.conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self._cache.clear()
            self._version = version
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def records(self) -> list[ImageRecord]:
        """Every image with a present or quarantined file, errors included."""
        return self._cached("records", lambda: self.reader.images(statuses=("ok", "quarantined")))

    def by_sha(self) -> dict[str, ImageRecord]:
        return self._cached("by_sha", lambda: {r.sha256: r for r in self.records()})

    def rejected(self) -> dict[str, list[tuple[str, str, str | None]]]:
        return self._cached("rejected", self.reader.rejected_paths)

    def kept(self) -> list[ImageRecord]:
        return self._cached("kept", self.reader.kept_images)

    def trigger(self) -> str | None:
        from ..export.report import trigger_word

        return self._cached("trigger", lambda: trigger_word(self.reader))

    def record(self, sha: str) -> ImageRecord:
        rec = self.by_sha().get(sha)
        if rec is None:
            raise CurateError(f"no image {sha[:12]} in the manifest; reload the page")
        return rec

    def sha_of_path(self, path: str) -> str:
        for r in self.records():
            if path in r.paths:
                return r.sha256
        raise CurateError(f"{path} is not an image of this dataset; reload the page")

    # -- journal -------------------------------------------------------------------------------------
    def _snapshot(
        self,
        m: Manifest,
        shas: list[str] = (),  # type: ignore[assignment]
        paths: list[str] | None = None,
        stages: tuple[str, ...] = (),
        meta: tuple[str, ...] = (),
        decisions: list[str] = (),  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """The rows a change is about to replace: image columns, reject rows of ``stages`` for ``paths``
        (None: the whole stages), manual decisions and meta values."""
        c = m.conn
        images = {}
        for chunk in _chunks(list(shas)):
            q = f"SELECT sha256, {', '.join(GROUP_COLS)} FROM images WHERE sha256 IN ({','.join('?' * len(chunk))})"
            for row in c.execute(q, chunk):
                images[row[0]] = list(row[1:])
        rows: list[list] = []
        if stages:
            st = ",".join("?" * len(stages))
            if paths is None:
                rows = [list(r) for r in c.execute(f"SELECT * FROM rejects WHERE stage IN ({st})", stages)]
            else:
                for chunk in _chunks(list(paths)):
                    q = f"SELECT * FROM rejects WHERE stage IN ({st}) AND path IN ({','.join('?' * len(chunk))})"
                    rows += [list(r) for r in c.execute(q, [*stages, *chunk])]
        dec = []
        for chunk in _chunks(list(decisions)):
            q = f"SELECT path, decision, reason, at FROM decisions WHERE path IN ({','.join('?' * len(chunk))})"
            dec += [list(r) for r in c.execute(q, chunk)]
        return {
            "images": images,
            "rejects": {"stages": list(stages), "paths": paths, "rows": rows},
            "decisions": {"paths": list(decisions), "rows": dec},
            "meta": {k: m.get_meta(k) for k in meta},
            "captions": [],
        }

    def _caption_snapshot(self, m: Manifest, targets: list[str]) -> list[dict[str, Any]]:
        out, seen = [], set()
        for t in targets:
            rel = t.split("::", 1)[0]
            if rel in seen:
                continue
            seen.add(rel)
            f = self.root / rel
            text = f.read_bytes().decode("utf-8", "replace") if f.is_file() else None
            out.append({"file": rel, "text": text})
        for item in out:
            item["ours"] = [
                list(r)
                for r in m.conn.execute(
                    "SELECT target, sha256, digest, at FROM caption_files WHERE target=? OR target LIKE ?",
                    (item["file"], item["file"] + "::%"),
                )
            ]
        return out

    def _journal(self, m: Manifest, action: str, before: dict[str, Any]) -> None:
        m.conn.execute(
            "INSERT INTO review_undo(at, action, before) VALUES (?,?,?)",
            (time.time(), action, json.dumps(before)),
        )

    def history(self, n: int = 10) -> list[tuple[int, str, bool]]:
        self.reader.ensure_table(UNDO_TABLE)
        rows = self.reader.conn.execute(
            "SELECT id, action, undone FROM review_undo ORDER BY id DESC LIMIT ?", (n,)
        )
        return [(i, a, u is not None) for i, a, u in rows]

    def undo(self) -> str:
        """Put back what the last change (not yet undone) replaced."""
        from ..stages.captions import TABLES
        from ..stages.user_captions import new_stamp, refresh

        with self.writer() as m:
            m.ensure_table(TABLES)
            row = m.conn.execute(
                "SELECT id, action, before FROM review_undo WHERE undone IS NULL ORDER BY id DESC LIMIT 1"
            ).fetchone()
            if row is None:
                raise CurateError("nothing to undo")
            before = json.loads(row["before"])
            stamp = new_stamp() + "-undo"
            back: dict[Path, str] = {}
            for item in before["captions"]:  # files first: the manifest rows below describe them
                f = self.root / item["file"]
                if item["text"] is not None:
                    back[f] = item["text"]
                elif f.exists():  # review created it: set it aside, never delete
                    dest = self.root / STATE_DIR / "caption_backups" / stamp / item["file"]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(f, dest)
            atomic_write_texts(back)
            with m.transaction():
                c = m.conn
                for sha, vals in before["images"].items():
                    c.execute(
                        f"UPDATE images SET {', '.join(f'{k}=?' for k in GROUP_COLS)} WHERE sha256=?",
                        [*vals, sha],
                    )
                rj = before["rejects"]
                if rj["stages"]:
                    st = ",".join("?" * len(rj["stages"]))
                    if rj["paths"] is None:
                        c.execute(f"DELETE FROM rejects WHERE stage IN ({st})", rj["stages"])
                    else:
                        for chunk in _chunks(rj["paths"]):
                            c.execute(
                                f"DELETE FROM rejects WHERE stage IN ({st}) AND path IN ({','.join('?' * len(chunk))})",
                                [*rj["stages"], *chunk],
                            )
                    c.executemany("INSERT OR REPLACE INTO rejects VALUES (?,?,?,?)", rj["rows"])
                dec = before["decisions"]
                c.executemany("DELETE FROM decisions WHERE path=?", [(p,) for p in dec["paths"]])
                c.executemany(
                    "INSERT INTO decisions(path, decision, reason, at) VALUES (?,?,?,?)", dec["rows"]
                )
                for k, v in before["meta"].items():
                    if v is None:
                        c.execute("DELETE FROM meta WHERE key=?", (k,))
                    else:
                        m.set_meta(k, v)
                for item in before["captions"]:
                    c.execute(
                        "DELETE FROM caption_files WHERE target=? OR target LIKE ?",
                        (item["file"], item["file"] + "::%"),
                    )
                    c.executemany("INSERT INTO caption_files VALUES (?,?,?,?)", item["ours"])
                for oid in before.get("overrides", []):  # the hand choice is no longer replayed by dedupe
                    c.execute("DELETE FROM dedupe_overrides WHERE id=?", (oid,))
                c.execute("UPDATE review_undo SET undone=? WHERE id=?", (time.time(), row["id"]))
            if before["captions"]:
                refresh(m)
        return f"undid: {row['action']}"

    # -- duplicate groups ----------------------------------------------------------------------------
    def groups(self) -> dict[int, list[ImageRecord]]:
        def make():
            out: dict[int, list[ImageRecord]] = {}
            for r in self.records():
                if r.dup_group is not None:
                    out.setdefault(r.dup_group, []).append(r)
            for members in out.values():
                members.sort(key=lambda r: (not r.dup_keeper, r.path))
            return dict(sorted(out.items()))

        return self._cached("groups", make)

    def _members(self, gid: int) -> list[ImageRecord]:
        members = self.groups().get(gid)
        if not members:
            raise CurateError(f"no duplicate group {gid}; reload the page")
        return members

    def _write_group(
        self,
        m: Manifest,
        gid: int | None,
        keeper: ImageRecord,
        members: list[ImageRecord],
        note: str,
        old: str,
    ) -> None:
        """Store one group: keeper, explain text, and the dedupe rejects of its other copies."""
        from ..stages.dedupe import preferred_paths

        kpaths = preferred_paths(self.root, keeper.paths)
        kp = kpaths[0]
        if len(members) == 1 and len(kpaths) == 1:
            gid = None
        desc = {}
        for line in old.splitlines():
            mt = _LINE.match(line)
            if mt:
                desc[mt.group(2)] = mt.group(3) or ""
        ours = {p for r in members for p in r.paths}
        others = [r for r in members if r.sha256 != keeper.sha256]
        explain = [f"kept {kp}{desc.get(kp, '')}: {note}"]
        explain += [f"dropped {q}: identical bytes to {kp}" for q in kpaths[1:]]
        explain += [f"dropped {p}{desc.get(p, '')}: {note}" for r in others for p in r.paths]
        explain += [
            ln for ln in old.splitlines() if ln.startswith("  ") and " ~ " in ln and {
                *ln.strip().split(": ", 1)[0].split(" ~ ", 1)
            } <= ours
        ]  # fmt: skip
        text = "\n".join(explain) if gid is not None else None
        for r in members:
            keep = None if gid is None else int(r.sha256 == keeper.sha256)
            m.conn.execute(
                "UPDATE images SET dup_group=?, dup_keeper=?, dup_explain=? WHERE sha256=?",
                (gid, keep, text, r.sha256),
            )
        paths = sorted(ours)
        for chunk in _chunks(paths):
            m.conn.execute(
                f"DELETE FROM rejects WHERE stage='dedupe' AND path IN ({','.join('?' * len(chunk))})", chunk
            )
        if gid is None:
            return
        rows = [(q, "dedupe", "duplicate", f"exact copy of {kp}") for q in kpaths[1:]]
        rows += [
            (p, "dedupe", "duplicate", f"near-duplicate of {kp} ({BY_HAND})") for r in others for p in r.paths
        ]
        m.conn.executemany("INSERT OR REPLACE INTO rejects VALUES (?,?,?,?)", rows)

    def _group_change(
        self, action: str, members: list[ImageRecord], write, kind: str, a: list[str], b: list[str]
    ) -> None:
        """Write the group change and record it as a durable override (stages/overrides.py), so every later
        `curate dedupe` replays it; undo removes the override with the rest."""
        from ..stages import overrides

        paths = [p for r in members for p in r.paths]
        with self.writer() as m, m.transaction():
            before = self._snapshot(m, [r.sha256 for r in members], paths, ("dedupe",))
            write(m)
            before["overrides"] = [overrides.add(m, kind, a, b, source="review")]
            self._journal(m, action, before)

    def _elsewhere(self, rec: ImageRecord) -> str:
        """' (note: ... rejected by filter: blurry)' when the chosen copy is rejected by another check."""
        rej = self.rejected()
        why = [f"{s}: {r}" for p in rec.paths for s, r, _ in rej.get(p, []) if s != "dedupe"]
        return f"; note: it is also rejected ({', '.join(why)}); keep it from the Rejects page" if why else ""

    def set_keeper(self, sha: str) -> str:
        rec = self.record(sha)
        if rec.dup_group is None:
            raise CurateError(f"{rec.path} is in no duplicate group")
        members = self._members(rec.dup_group)
        if rec.dup_keeper:
            return f"{rec.path} is already the keeper of group {rec.dup_group}"
        old = next((r.path for r in members if r.dup_keeper), "?")
        action = f"group {rec.dup_group}: keep {rec.path} instead of {old}"
        self._group_change(
            action,
            members,
            lambda m: self._write_group(
                m, rec.dup_group, rec, members, f"{BY_HAND} (curate kept {old})", rec.dup_explain or ""
            ),
            "keeper",
            [rec.sha256],
            [r.sha256 for r in members if r.sha256 != rec.sha256],
        )
        return action + self._elsewhere(rec)

    def split_group(self, shas: list[str]) -> str:
        """Take ``shas`` out of their group: two or more form a new group, one stands alone."""
        recs = [self.record(s) for s in dict.fromkeys(shas)]
        gids = {r.dup_group for r in recs}
        if len(gids) != 1 or None in gids:
            raise CurateError("select copies of one duplicate group to split it")
        gid = gids.pop()
        members = self._members(gid)  # type: ignore[arg-type]
        out = {r.sha256 for r in recs}
        rest = [r for r in members if r.sha256 not in out]
        if not rest:
            raise CurateError("leave at least one copy in the group (select the copies that do not belong)")
        new_gid = 1 + max(r.dup_group or 0 for r in self.records())
        explain = members[0].dup_explain or ""

        def best(rs: list[ImageRecord]) -> ImageRecord:
            return next((r for r in rs if r.dup_keeper), None) or max(rs, key=lambda r: (r.pixels, r.path))

        def write(m: Manifest) -> None:
            self._write_group(m, gid, best(rest), rest, "group split in curate review", explain)
            self._write_group(
                m, new_gid, best(recs), recs, f"split off group {gid} in curate review", explain
            )

        names = ", ".join(r.path for r in recs)
        action = f"group {gid}: split off {names}"
        self._group_change(action, members, write, "split", sorted(out), [r.sha256 for r in rest])
        return action

    def merge_groups(self, a: int, b: int) -> str:
        """Group ``b`` joins group ``a``; a's keeper stays the keeper."""
        if a == b:
            raise CurateError("pick two different groups to merge")
        ma, mb = self._members(a), self._members(b)
        keeper = next((r for r in ma if r.dup_keeper), ma[0])
        explain = "\n".join([ma[0].dup_explain or "", mb[0].dup_explain or ""])
        action = f"merge group {b} into group {a} (keeper {keeper.path})"
        self._group_change(
            action,
            ma + mb,
            lambda m: self._write_group(
                m, a, keeper, ma + mb, f"groups {a} and {b} merged in curate review", explain
            ),
            "merge",
            [r.sha256 for r in ma],
            [r.sha256 for r in mb],
        )
        return action

    # -- rejects and thresholds ------------------------------------------------------------------------
    def decide(self, paths: list[str], decision: str | None) -> str:
        """keep / reject / None (forget) for files, one transaction."""
        if not paths:
            raise CurateError("no files selected")
        if isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
            raise CurateError("paths must be a list of files")
        known = self.reader.file_index()
        unknown = [p for p in paths if p not in known]
        if unknown:
            raise CurateError(f"{unknown[0]} is not an image of this dataset; reload the page")
        words = {"keep": "keep anyway", "reject": "reject by hand", None: "forget the decision on"}[decision]
        action = f"{words} {paths[0]}" + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")
        with self.writer() as m, m.transaction():
            before = self._snapshot(m, decisions=paths)
            m.set_decisions(paths, decision, "rejected in curate review" if decision == "reject" else None)
            self._journal(m, action, before)
        return action

    def filter_config(self) -> FilterConfig:
        """The filter options in effect: config, then thresholds applied here, then the recorded rejects."""
        from ..export.report import thresholds_in_effect

        raw = self.reader.get_meta(FILTER_META)
        cfg = override(self.config.filter, **(json.loads(raw) if raw else {}))
        thr = thresholds_in_effect(self.rejected(), cfg)
        return override(cfg, **{k: type(getattr(cfg, k))(v) for k, v in thr.items() if k in THRESHOLDS})

    def _filter_with(self, thresholds: dict[str, Any]) -> FilterConfig:
        bad = [k for k in thresholds if k not in THRESHOLDS]
        if bad:
            raise CurateError(f"unknown threshold {bad[0]}; choose from {', '.join(THRESHOLDS)}")
        cfg = self.filter_config()
        vals = {k: type(getattr(cfg, k))(float(v)) for k, v in thresholds.items() if v not in (None, "")}
        return override(cfg, **vals)

    def filter_preview(self, thresholds: dict[str, Any]) -> dict[str, Any]:
        """How many images these thresholds would reject (stored scores only), and the change."""
        from ..stages.filter import reasons_for

        cfg = self._filter_with(thresholds)
        raw = self.reader.rejected_paths(raw=True)
        now = {p for p, items in raw.items() if any(s == "filter" for s, _, _ in items)}
        by_reason: Counter[str] = Counter()
        would = cur = newly = freed = 0
        for rec in self.records():
            if rec.error or not rec.paths:
                continue
            found = reasons_for(rec, cfg)
            was = rec.paths[0] in now
            would += bool(found)
            cur += was
            newly += bool(found) and not was
            freed += was and not found
            by_reason.update({r for r, _ in found})
        return {
            "reject": would, "current": cur, "newly": newly, "freed": freed,
            "by_reason": dict(by_reason.most_common()), "thresholds": {k: getattr(cfg, k) for k in THRESHOLDS},
        }  # fmt: skip

    def filter_apply(self, thresholds: dict[str, Any]) -> str:
        """What `curate filter --min-sharpness ...` does: the filter stage's rejects for these thresholds."""
        from ..stages.filter import filter_images

        now = self.filter_config()
        cfg = self._filter_with(thresholds)
        with self.writer() as m, m.transaction():
            before = self._snapshot(m, stages=("filter",), meta=(FILTER_META,))
            res = filter_images(m, cfg)
            m.set_meta(FILTER_META, json.dumps({k: getattr(cfg, k) for k in THRESHOLDS}))
            changed = ", ".join(
                f"{k} {getattr(cfg, k):g}" for k in THRESHOLDS if getattr(cfg, k) != getattr(now, k)
            )
            action = (
                f"filter with {changed or 'the same thresholds'}: {res.rejected} of {res.checked} rejected"
            )
            self._journal(m, action, before)
        return action

    # -- captions ------------------------------------------------------------------------------------------
    def caption(self, rec: ImageRecord) -> str:
        """The caption export writes for this image."""
        from ..export.common import make_caption

        return make_caption(rec, self.trigger())

    def parts(self, rec: ImageRecord) -> list[str]:
        return [p.strip() for p in self.caption(rec).split(",") if p.strip()]

    def tag_scores(self) -> dict[str, dict[str, float]]:
        """sha -> {readable tag: score} from the tagger's score cache (empty when nothing was tagged)."""

        def make():
            from ..stages.captions import readable
            from ..stages.tag import load_scores

            model = self.reader.get_meta("tag.model")
            if not model:
                return {}
            return {
                sha: {readable(t).lower(): v for t, v in s.items()}
                for sha, s in load_scores(self.reader, model).items()
            }

        return self._cached("tag_scores", make)

    def tag_frequency(self) -> list[tuple[str, int]]:
        trig = self.trigger()

        def make():
            c = Counter(p for r in self.kept() for p in set(self.parts(r)) if p != trig)
            return c.most_common()

        return self._cached("tag_freq", make)

    def set_texts(self, texts: dict[str, str], action: str) -> str:
        """Write people's captions for several images: journal first, then files, one refresh."""
        from ..stages.captions import TABLES
        from ..stages.user_captions import caption_target, set_captions, sources

        if not texts:
            return f"{action}: no caption changed"
        with self.writer() as m:
            m.ensure_table(TABLES)
            srcs = sources(m)
            before = self._snapshot(m)
            before["captions"] = self._caption_snapshot(m, [caption_target(m, p, srcs) for p in texts])
            with m.transaction():  # journaled before the files change: undo of a half-done write is harmless
                self._journal(m, action, before)
            set_captions(m, texts)
        n = len(texts)
        return f"{action}: {n} caption{'s' if n != 1 else ''} written"

    def _text(self, parts: list[str]) -> str:
        trig = self.trigger()
        parts = [p.strip() for p in parts if p.strip()]
        parts = list(dict.fromkeys(parts))
        if trig and trig in parts:
            parts = [trig, *(p for p in parts if p != trig)]
        return ", ".join(parts)

    def edit_caption(self, path: str, *, parts: list[str] | None = None, text: str | None = None) -> str:
        sha = self.sha_of_path(path)
        if parts is not None and (isinstance(parts, str) or not all(isinstance(x, str) for x in parts)):
            raise CurateError("parts must be a list of tags")
        if parts is None and not isinstance(text, str):
            raise CurateError("the caption text must be a string")
        from ..export.common import one_line

        new = self._text(parts) if parts is not None else one_line(text)
        if not new:
            raise CurateError("a caption cannot be empty; leave at least one tag or word")
        if new == self.caption(self.record(sha)):
            return f"caption of {path} unchanged"
        return self.set_texts({path: new}, f"edit caption of {path}")

    def bulk(self, op: str, tag: str, new: str = "", paths: list[str] | None = None) -> str:
        """remove / replace / prepend a tag over ``paths`` (default: every kept image), one transaction."""
        from ..stages.captions import _key as key  # the matching form blacklist and replace use

        tag = tag.strip()
        if not tag:
            raise CurateError("type the tag to change")
        if op == "replace" and not new.strip():
            raise CurateError("type the new tag to replace it with (or use remove)")
        if op not in ("remove", "replace", "prepend"):
            raise CurateError(f"unknown bulk edit {op!r}; choose remove, replace or prepend")
        trig = self.trigger()
        if op in ("remove", "replace") and trig and key(tag) == key(trig):
            raise CurateError(f"{trig!r} is the trigger word; it stays first in every caption")
        recs = self.kept()
        if paths:
            wanted = set(paths)
            recs = [r for r in recs if wanted & set(r.paths)]
        texts: dict[str, str] = {}
        for r in recs:
            parts = self.parts(r)
            if op == "prepend":
                if any(key(p) == key(tag) for p in parts):
                    continue
                head = [parts[0]] if trig and parts and parts[0] == trig else []
                out = [*head, tag, *parts[len(head) :]]
            else:
                if not any(key(p) == key(tag) for p in parts):
                    continue
                out = [p if key(p) != key(tag) else (new.strip() if op == "replace" else "") for p in parts]
            text = self._text(out)
            if text and text != self.caption(r):
                texts[r.path] = text
        scope = f"{len(paths)} selected" if paths else "all kept images"
        words = {"remove": f"remove {tag!r}", "replace": f"replace {tag!r} by {new.strip()!r}",
                 "prepend": f"prepend {tag!r}"}[op]  # fmt: skip
        return self.set_texts(texts, f"{words} over {scope}")

    # -- split ---------------------------------------------------------------------------------------------
    def move(self, sha: str, side: str) -> str:
        """Move an image to train or val, with every image it must not be separated from."""
        from ..stages.split import MOVES_KEY, leak_groups

        if side not in ("train", "val"):
            raise CurateError(f"side must be train or val, got {side!r}")
        kept = self.kept()
        k = next((n for n, r in enumerate(kept) if r.sha256 == sha), None)
        if k is None:
            raise CurateError("only kept images are in the split; keep the image first")
        if kept[k].split is None:
            raise CurateError(f"{kept[k].path} is not split yet; run `curate split {self.root}` first")
        labels = leak_groups(kept)
        group = [r for r, g in zip(kept, labels, strict=True) if g == labels[k]]
        with self.writer() as m, m.transaction():
            before = self._snapshot(m, [r.sha256 for r in group], meta=(MOVES_KEY,))
            m.conn.executemany("UPDATE images SET split=? WHERE sha256=?", [(side, r.sha256) for r in group])
            moves = json.loads(m.get_meta(MOVES_KEY) or "{}")  # replayed by every `curate split`
            for r in group:
                moves.pop(r.sha256, None)
            moves[sha] = side
            m.set_meta(MOVES_KEY, json.dumps(moves))
            action = f"move {kept[k].path} to {side}"
            if len(group) > 1:
                action += f" with {len(group) - 1} near-duplicate(s) (no leak across the split)"
            self._journal(m, action, before)
        return action

    # -- buckets -------------------------------------------------------------------------------------------
    def crop_box(self, rec: ImageRecord) -> tuple[float, float, float, float] | None:
        """(left, top, width, height) as fractions of the image: the centre crop of its bucket."""
        from ..stages.bucket import place, resized_size, stored_settings

        if not rec.bucket or not rec.width or not rec.height:
            return None
        settings = self._cached("bucket_settings", lambda: stored_settings(self.reader))
        if settings is not None and settings.no_upscale:
            size = place(rec.width, rec.height, settings).resized
        else:
            size = resized_size(rec.width, rec.height, rec.bucket)
        fw, fh = min(1.0, rec.bucket[0] / size[0]), min(1.0, rec.bucket[1] / size[1])
        return ((1 - fw) / 2, (1 - fh) / 2, fw, fh)

    def settings_text(self) -> str:
        from ..stages.bucket import stored_settings

        s = stored_settings(self.reader)
        return "" if s is None else ", ".join(f"{k} {v}" for k, v in asdict(s).items())
