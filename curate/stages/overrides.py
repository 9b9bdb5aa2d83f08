"""Duplicate-group choices made by hand (keeper, split, merge), kept in the manifest and applied by every dedupe.

`curate review` records each choice in the ``dedupe_overrides`` table, by content hash, in the same
transaction as the change itself; ``curate dedupe --keeper / --same / --not-duplicate`` records the same
kinds (source ``cli``, :func:`record_cli`). Every ``curate dedupe`` groups automatically, whatever the method, then
replays the overrides oldest first on the groups:

- ``split`` (a, b): no image of a shares a group with an image of b. The links between the two sides are
  cut; if other links still connect them, every image goes to the side it is nearest to (breadth-first
  over the links) and the links that cross are cut.
- ``merge`` (a, b): the groups holding a and b become one group (a's keeper stays its keeper).
- ``keeper`` (a = [chosen], b = the rest of its group then): the chosen image is the keeper of whatever
  group it is in now; the latest choice wins within a group.

An override whose images are gone (deleted, unreadable) is ignored and counted; nothing is deleted.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import CurateError
from ..manifest import Manifest

TABLE = """
CREATE TABLE IF NOT EXISTS dedupe_overrides (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    kind    TEXT NOT NULL CHECK (kind IN ('keeper', 'split', 'merge')),
    a       TEXT NOT NULL,        -- JSON list of sha256: keeper: [the chosen image]; split: the side taken
    b       TEXT NOT NULL,        --   out; merge: group a. b: keeper: the rest of its group; split: the
    at      REAL NOT NULL,        --   images left; merge: the group that joined a.
    source  TEXT NOT NULL CHECK (source IN ('review', 'cli'))
);
"""
KINDS = ("keeper", "split", "merge")
BY_HAND = "keeper chosen by hand"


@dataclass
class Override:
    id: int
    kind: str
    a: list[str]
    b: list[str]
    at: float
    source: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def add(m: Manifest, kind: str, a: Iterable[str], b: Iterable[str], source: str = "cli") -> int:
    """Record one override (joins the caller's transaction; ``m.ensure_table(TABLE)`` first); returns its id."""
    if kind not in KINDS:
        raise CurateError(f"unknown override {kind!r}; choose {', '.join(KINDS)}")
    cur = m.conn.execute(
        "INSERT INTO dedupe_overrides(kind, a, b, at, source) VALUES (?,?,?,?,?)",
        (kind, json.dumps(sorted(set(a))), json.dumps(sorted(set(b))), time.time(), source),
    )
    return int(cur.lastrowid)


def _has_table(m: Manifest) -> bool:
    q = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='dedupe_overrides'"
    return m.conn.execute(q).fetchone() is not None


def load(m: Manifest) -> list[Override]:
    """Every override, oldest first (none when the table was never made: a read-only manifest is fine)."""
    if not _has_table(m):
        return []
    rows = m.conn.execute("SELECT id, kind, a, b, at, source FROM dedupe_overrides ORDER BY at, id")
    return [Override(i, k, json.loads(a), json.loads(b), at, s) for i, k, a, b, at, s in rows]


def clear(m: Manifest) -> int:
    """Forget every override; returns how many there were."""
    if not _has_table(m):
        return 0
    with m.transaction():
        return m.conn.execute("DELETE FROM dedupe_overrides").rowcount


def record_cli(
    m: Manifest, *, keepers: list[str] = (), same: list[str] = (), apart: list[str] = ()
) -> list[dict[str, Any]]:
    """Record choices typed on the command line (``curate dedupe --keeper / --same / --not-duplicate``) as
    overrides with source ``cli``, in one transaction, exactly as the review page records its own.

    ``same``: the files are copies of one image (their groups merge; the first one's keeper stays).
    ``apart``: no two of the files are duplicates (one split per pair). ``keepers``: each file becomes the
    keeper of its group (the group it has now, or the one ``same`` makes). Returns what was recorded."""
    from .user_captions import resolve_image

    records = {r.sha256: r for r in m.images(include_errors=True)}
    by_path = {p: r for r in records.values() for p in r.paths}

    def sha_of(flag: str, path: str) -> str:
        rel = resolve_image(m, path)
        rec = by_path.get(rel)
        if rec is None or rec.error:
            why = f"unreadable ({rec.error})" if rec is not None else "not a current image"
            raise CurateError(f"{flag} {path}: {rel} is {why}; pick an image `curate status` counts")
        return rec.sha256

    def group_of(sha: str) -> set[str]:
        g = records[sha].dup_group
        return {s for s, r in records.items() if g is not None and r.dup_group == g}

    def distinct(flag: str, paths: list[str]) -> list[str]:
        shas = [sha_of(flag, p) for p in paths]
        if len(set(shas)) < 2:
            raise CurateError(
                f"{flag} needs two or more different images (e.g. {flag} a.png {flag} b.png); "
                + ("the files given have identical bytes" if len(shas) > 1 else f"got {len(shas)}")
            )
        return list(dict.fromkeys(shas))

    plan: list[tuple[str, list[str], list[str], str]] = []
    joined: set[str] = set()
    same_shas: list[str] = []
    if same:
        same_shas = distinct("--same", list(same))
        joined = set().union(*(group_of(s) | {s} for s in same_shas))
        plan.append(("merge", same_shas[:1], same_shas[1:], " = ".join(same)))
    if apart:
        shas = distinct("--not-duplicate", list(apart))
        if len(set(shas) & set(same_shas)) >= 2:
            raise CurateError("--same and --not-duplicate name the same two images; keep one of them")
        name = {sha_of("--not-duplicate", p): p for p in reversed(list(apart))}
        for i, x in enumerate(shas):
            plan += [("split", [x], [y], f"{name[x]} != {name[y]}") for y in shas[i + 1 :]]
    for path in keepers:
        sha = sha_of("--keeper", path)
        rest = (group_of(sha) | (joined if sha in joined else set())) - {sha}
        if not rest:
            raise CurateError(
                f"--keeper {path}: it is in no duplicate group; run `curate dedupe` first, or name its copies "
                f"with --same {path} --same OTHER"
            )
        plan.append(("keeper", [sha], sorted(rest), path))
    m.ensure_table(TABLE)
    out = []
    with m.transaction():
        for kind, a, b, what in plan:
            out.append({"id": add(m, kind, a, b, source="cli"), "kind": kind, "files": what})
    return out


# -- applying them -------------------------------------------------------------------------------------------
@dataclass
class Group:
    """A group while overrides are replayed: images by content hash, links between them."""

    shas: list[str]
    keeper: str
    links: dict[frozenset[str], tuple[str, dict | None]] = field(default_factory=dict)  # pair -> (line, edge)
    method: str = "hand"
    source: Any = None  # the automatic DupGroup while untouched
    notes: list[str] = field(default_factory=list)  # what was done by hand
    hand_keeper: bool = False


def _components(nodes: list[str], links: Iterable[frozenset[str]]) -> list[list[str]]:
    adj: dict[str, set[str]] = {n: set() for n in nodes}
    for pair in links:
        a, b = tuple(pair)
        if a in adj and b in adj:
            adj[a].add(b)
            adj[b].add(a)
    seen: set[str] = set()
    out = []
    for n in nodes:
        if n in seen:
            continue
        comp, todo = [], [n]
        seen.add(n)
        while todo:
            x = todo.pop()
            comp.append(x)
            for y in adj[x] - seen:
                seen.add(y)
                todo.append(y)
        out.append([s for s in nodes if s in set(comp)])
    return out


def split_group(g: Group, a: set[str], b: set[str]) -> list[Group]:
    """Cut ``g`` so that no part holds images of both ``a`` and ``b``."""

    def crosses(pair: frozenset[str]) -> bool:
        x, y = tuple(pair)
        return (x in a and y in b) or (x in b and y in a)

    links = {p: v for p, v in g.links.items() if not crosses(p)}
    comps = _components(g.shas, links)
    if any(set(c) & a and set(c) & b for c in comps):
        # Still connected through other images: each image joins the side it is nearest to.
        adj: dict[str, set[str]] = {n: set() for n in g.shas}
        for pair in links:
            x, y = tuple(pair)
            adj[x].add(y)
            adj[y].add(x)
        side = {n: "a" for n in g.shas if n in a} | {n: "b" for n in g.shas if n in b}
        todo = deque(n for n in g.shas if n in side)
        while todo:
            x = todo.popleft()
            for y in sorted(adj[x]):
                if y not in side:
                    side[y] = side[x]
                    todo.append(y)
        links = {p: v for p, v in links.items() if len({side.get(n) for n in p}) == 1}
        comps = _components(g.shas, links)
    out = []
    for c in comps:
        members = set(c)
        part = Group(
            c, g.keeper if g.keeper in members else "", {p: v for p, v in links.items() if p <= members}
        )
        part.method = g.method
        part.notes = [*g.notes, "group split by hand"]
        part.hand_keeper = g.hand_keeper and g.keeper in members
        out.append(part)
    return out


def apply(
    groups: list[Group],
    overrides: list[Override],
    present: set[str],
    best: Callable[[list[str]], str],
) -> tuple[list[Group], dict[str, Any]]:
    """Replay ``overrides`` on ``groups``; ``best(shas)`` picks a keeper for a part that lost its own.

    Returns the groups (parts of one image included: the caller drops or keeps them) and what was done:
    ``{"applied": [...], "ignored": n, "ignored_ids": [...]}``."""
    applied: list[dict[str, Any]] = []
    ignored: list[int] = []
    hand_keepers: dict[str, list[Override]] = {}
    for ov in overrides:
        a = [s for s in ov.a if s in present]
        b = [s for s in ov.b if s in present]
        if not a or not b:
            ignored.append(ov.id)
            continue
        sa, sb = set(a), set(b)
        what = ""
        if ov.kind == "split":
            out, n = [], 0
            for g in groups:
                have = set(g.shas)
                if have & sa and have & sb:
                    out += split_group(g, sa, sb)
                    n += 1
                else:
                    out.append(g)
            groups = out
            what = f"split {n} group(s)" if n else "already apart"
        elif ov.kind == "merge":
            touching = [g for g in groups if set(g.shas) & (sa | sb)]
            if len(touching) == 1 and (sa | sb) <= set(touching[0].shas):
                what = "already together"
            else:
                home = max(
                    (g for g in touching if set(g.shas) & sa),
                    key=lambda g: len(set(g.shas) & sa),
                    default=None,
                )
                shas: list[str] = []
                links: dict[frozenset[str], tuple[str, dict | None]] = {}
                notes: list[str] = []
                for g in touching:
                    shas += [s for s in g.shas if s not in shas]
                    links.update(g.links)
                    notes += [n for n in g.notes if n not in notes]
                loose = [s for s in [*a, *b] if s not in shas]
                shas += loose
                keeper = home.keeper if home is not None and home.keeper else best(shas)
                for s in shas:  # a hand link from the keeper to every part that was not linked to it
                    if s != keeper and not any(s in p for p in links):
                        links[frozenset((keeper, s))] = ("", None)
                other = next((g.keeper for g in touching if g is not home and g.keeper), None)
                if other and other != keeper:
                    links.setdefault(frozenset((keeper, other)), ("", None))
                method = home.method if home is not None else "hand"
                merged = Group(shas, keeper, links, method, notes=[*notes, "groups merged by hand"])
                merged.hand_keeper = bool(home and home.hand_keeper)
                groups = [g for g in groups if g not in touching] + [merged]
                what = f"merged {len(touching)} group(s)" + (f" and {len(loose)} image(s)" if loose else "")
        else:
            hand_keepers.setdefault(a[0], []).append(ov)
            what = "keeper"
        applied.append({**ov.as_dict(), "result": what})
    # Keepers last: the latest hand choice among a group's images wins over the ranking rule.
    won: dict[int, str] = {}
    for g in groups:
        have = set(g.shas)
        # Still in the group it was chosen in: it shares a group with one of the images it was chosen over.
        chosen = [o for s in g.shas for o in hand_keepers.get(s, []) if have & set(o.b)]
        if chosen:
            latest = max(chosen, key=lambda o: (o.at, o.id))
            won.update({o.id: "superseded by a later choice" for o in chosen})
            won[latest.id] = "keeper"
            if g.keeper != latest.a[0] or not g.hand_keeper:
                g.keeper, g.hand_keeper = latest.a[0], True
                g.source = None
    for item in applied:
        if item["kind"] == "keeper":
            item["result"] = won.get(item["id"], "not in its group now")
    for g in groups:
        if not g.keeper or g.keeper not in g.shas:
            g.keeper = best(g.shas)
        g.shas = [g.keeper, *(s for s in g.shas if s != g.keeper)]
    return groups, {"applied": applied, "ignored": len(ignored), "ignored_ids": ignored}


def apply_to_groups(
    m: Manifest,
    groups: list,
    everything: list,
    demote: frozenset[str],
    policy: tuple[str, ...],
) -> tuple[list, dict[str, Any]]:
    """The dedupe stage's step: replay the manifest's overrides on its ``DupGroup`` list (paths, keeper
    first); untouched groups come back as they were, the others rebuilt with their hand notes."""
    from .dedupe import KEY_FUNCS, DupGroup, describe, exact_groups, rank_key

    overrides = load(m)
    if not overrides:
        return groups, {}
    root = m.root
    by_sha = {r.sha256: r for r in everything}
    sha_of = {p: r.sha256 for r in everything for p in r.paths}
    present = {r.sha256 for r in everything if not r.error and r.paths}
    # A part that lost its keeper keeps its best copy by the configured order (the rules of
    # --keep original need pair evidence that is not at hand here: more pixels, then the larger file).
    key = rank_key([p for p in policy if p in KEY_FUNCS] or ["pixels", "filesize"], demote)

    def best(shas: list[str]) -> str:
        return max(shas, key=lambda s: key(by_sha[s]))

    work = []
    for g in groups:
        shas = list(dict.fromkeys(sha_of[p] for p in g.members))
        lines = {}
        for ln in g.explain:
            if ln.startswith("  ") and " ~ " in ln and ": " in ln:
                x, y = ln.strip().split(": ", 1)[0].split(" ~ ", 1)
                if x in sha_of and y in sha_of:
                    lines[frozenset((sha_of[x], sha_of[y]))] = ln
        links: dict[frozenset[str], tuple[str, dict | None]] = {}
        for e in g.edges:
            pair = frozenset((sha_of[e["a"]], sha_of[e["b"]]))
            if len(pair) == 2:
                links[pair] = (lines.get(pair, ""), e)
        work.append(Group(shas, sha_of[g.keeper], links, g.method, source=g))
    work, report = apply(work, overrides, present, best)
    out = []
    for g in work:
        if g.source is not None:
            out.append(g.source)
            continue
        keeper = by_sha[g.keeper]
        if len(g.shas) == 1:
            out += exact_groups([keeper], root)  # one image left: a group only of its identical copies
            continue
        kp = keeper.paths[0]
        note = "; ".join(dict.fromkeys(g.notes))
        head = f"kept {kp} ({describe(keeper)})"
        explain = [f"{head}: {BY_HAND}" if g.hand_keeper else (f"{head}: {note}" if note else head)]
        explain += [
            f"dropped {q}: identical bytes to {kp} (SHA-256 {keeper.sha256[:12]})" for q in keeper.paths[1:]
        ]
        why = BY_HAND if g.hand_keeper else note
        members = list(keeper.paths)
        for s in g.shas[1:]:
            r = by_sha[s]
            members += r.paths
            explain += [f"dropped {p} ({describe(r)}): duplicate of {kp}; {why}" for p in r.paths]
        edges = []
        for pair, (line, edge) in g.links.items():
            if edge is not None:
                edges.append(edge)
            if line:
                explain.append(line)
            elif edge is None:
                x, y = sorted(by_sha[s].paths[0] for s in pair)
                explain.append(f"  {x} ~ {y}: joined by hand (groups merged)")
        hand = [BY_HAND] if g.hand_keeper else []
        hand += [n for n in dict.fromkeys(g.notes)]
        out.append(DupGroup(0, kp, members, g.method, explain, edges, hand))
    out.sort(key=lambda d: d.method == "exact")  # stable: the near groups first, as dedupe lists them
    return out, report
