"""Hash dedupe: exact copies (same SHA-256) and perceptual near-duplicates (64-bit pHash / dHash).

Near-duplicate search is multi-index hashing: the 64-bit code is cut into four 16-bit blocks, and two
codes within Hamming distance t agree within t // 4 bits on at least one block (pigeonhole). So each
block is bucketed once and probed with every mask of at most t // 4 bits; candidates are verified with
XOR + popcount. No Python loop over pairs. Groups are connected components of the pair graph
(union-find), and each group keeps its best copy by a configurable policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from ..config import DedupeConfig
from ..manifest import ImageRecord, Manifest

_BLOCK_BITS = 16
_N_BLOCKS = 64 // _BLOCK_BITS
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Bit count of each uint64."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _POPCOUNT8[x.view(np.uint8)].reshape(*x.shape, 8).sum(-1)


def hex_to_u64(hexes: Sequence[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hexes], dtype=np.uint64)


def _masks(bits: int, radius: int) -> np.ndarray:
    out = [0]
    for r in range(1, radius + 1):
        for combo in combinations(range(bits), r):
            out.append(sum(1 << b for b in combo))
    return np.array(out, dtype=np.int64)


def near_pairs(codes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) with Hamming distance <= threshold. Returns (i, j, distance)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint64)
    n = len(codes)
    empty = np.zeros(0, np.int64)
    if n < 2 or threshold < 0:
        return empty, empty, empty
    if n <= 4096 or threshold >= 4 * _N_BLOCKS:
        return _pairs_bruteforce(codes, threshold)
    radius = threshold // _N_BLOCKS
    masks = _masks(_BLOCK_BITS, radius)
    found_i, found_j = [], []
    idx = np.arange(n, dtype=np.int64)
    for b in range(_N_BLOCKS):
        vals = ((codes >> np.uint64(b * _BLOCK_BITS)) & np.uint64(0xFFFF)).astype(np.int64)
        order = np.argsort(vals, kind="stable")
        counts = np.bincount(vals, minlength=1 << _BLOCK_BITS)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for m in masks:
            q = vals ^ m
            c = counts[q]
            total = int(c.sum())
            if total == 0:
                continue
            i_rep = np.repeat(idx, c)
            offs = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(c) - c, c)
            j = order[np.repeat(starts[q], c) + offs]
            sel = i_rep < j
            i_rep, j = i_rep[sel], j[sel]
            d = popcount64(codes[i_rep] ^ codes[j])
            ok = d <= threshold
            if ok.any():
                found_i.append(i_rep[ok])
                found_j.append(j[ok])
    if not found_i:
        return empty, empty, empty
    keys = np.unique(np.concatenate(found_i) * n + np.concatenate(found_j))
    i, j = keys // n, keys % n
    return i, j, popcount64(codes[i] ^ codes[j]).astype(np.int64)


def _pairs_bruteforce(codes: np.ndarray, threshold: int, block: int = 1024):
    n = len(codes)
    out_i, out_j, out_d = [], [], []
    for s in range(0, n, block):
        a = codes[s : s + block]
        d = popcount64(a[:, None] ^ codes[None, :])
        ii, jj = np.nonzero(d <= threshold)
        ii = ii + s
        sel = ii < jj
        out_i.append(ii[sel])
        out_j.append(jj[sel])
        out_d.append(d[ii[sel] - s, jj[sel]])
    return (
        np.concatenate(out_i).astype(np.int64),
        np.concatenate(out_j).astype(np.int64),
        np.concatenate(out_d).astype(np.int64),
    )


def connected_groups(n: int, i: np.ndarray, j: np.ndarray) -> list[list[int]]:
    """Union-find over pairs: lists of member indices for every component with 2+ members."""
    if n == 0 or len(i) == 0:
        return []
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    return [g.tolist() for g in np.split(order, bounds) if len(g) > 1]


# -- keep-best ---------------------------------------------------------------------------------------
KEY_FUNCS = {
    "pixels": lambda r: r.pixels,
    "sharpness": lambda r: r.scores.get("sharpness", 0.0),
    "filesize": lambda r: r.size,
    "png": lambda r: 1 if (r.format or "").upper() in ("PNG", "WEBP", "TIFF", "BMP") else 0,
}
_KEY_WORDS = {"pixels": "more pixels", "sharpness": "sharper", "filesize": "larger file", "png": "lossless"}


def rank_key(policy: Sequence[str], demote: frozenset[str] = frozenset()):
    """Sort key, larger is better: images rejected by another stage only win if nothing else is left."""
    unknown = [p for p in policy if p not in KEY_FUNCS]
    if unknown:
        from ..errors import CurateError

        raise CurateError(f"unknown keep policy {unknown}; choose from {', '.join(KEY_FUNCS)}")
    return lambda r: (r.path not in demote, *(KEY_FUNCS[p](r) for p in policy), r.path)


def why_better(
    keeper: ImageRecord, other: ImageRecord, policy: Sequence[str], demote: frozenset[str] = frozenset()
) -> str:
    if other.path in demote and keeper.path not in demote:
        return "not rejected by another check"
    for p in policy:
        a, b = KEY_FUNCS[p](keeper), KEY_FUNCS[p](other)
        if a != b:
            return _KEY_WORDS[p]
    return "tie; first by path"


@dataclass
class DupGroup:
    """One group of duplicates: the copy kept, the others, and why."""

    id: int
    keeper: str
    members: list[str]  # paths, keeper first
    method: str
    explain: list[str] = field(default_factory=list)
    edges: list[dict[str, Any]] = field(default_factory=list)  # pairs with their distances/similarity
    by_hand: list[str] = field(default_factory=list)  # what a person changed (stages/overrides.py)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def describe(r: ImageRecord) -> str:
    return f"{r.width}x{r.height}, sharpness {r.scores.get('sharpness', 0):.0f}, {r.size / 1024:.0f} KiB"


MAX_EXPLAIN_EDGES = 20


def _edge_text(edge: dict[str, Any]) -> str:
    """'CLIP similarity 0.973, pHash distance 3' for one pair."""
    words = {"clip": "CLIP similarity", "phash": "pHash distance", "dhash": "dHash distance"}
    return ", ".join(f"{words.get(k, k)} {v}" for k, v in edge.items() if k not in ("a", "b"))


def _group_method(edges: list[dict[str, Any]], method: str) -> str:
    """For --method both: which signal linked the group ("hash", "clip" or "both")."""
    if method != "both":
        return method
    clip = any("clip" in e for e in edges)
    hashed = any("phash" in e or "dhash" in e for e in edges)
    return "both" if clip and hashed else "clip" if clip else "hash"


def merge_pairs(pairs: list[tuple[int, int, dict[str, Any]]]) -> list[tuple[int, int, dict[str, Any]]]:
    """One entry per (i, j) with the info of every method that found it (hash + CLIP)."""
    merged: dict[tuple[int, int], dict[str, Any]] = {}
    for a, b, info in pairs:
        key = (a, b) if a < b else (b, a)
        merged.setdefault(key, {}).update(info)
    return [(a, b, info) for (a, b), info in sorted(merged.items())]


def build_groups(
    records: list[ImageRecord],
    pairs: list[tuple[int, int, dict[str, Any]]],
    policy: Sequence[str],
    method: str,
    start_id: int = 1,
    demote: frozenset[str] = frozenset(),
) -> list[DupGroup]:
    """Turn pairs of record indices into groups with a keeper chosen by ``policy``.

    Paths in ``demote`` (rejected by another stage) stay in their group but are kept only as a last resort.
    """
    if not pairs:
        return []
    i = np.array([p[0] for p in pairs], np.int64)
    j = np.array([p[1] for p in pairs], np.int64)
    key = rank_key(policy, demote)
    edges_by_node: dict[int, list[int]] = {}
    for k, (a, _b, _) in enumerate(pairs):
        edges_by_node.setdefault(a, []).append(k)
    groups = []
    for gid, members in enumerate(connected_groups(len(records), i, j), start=start_id):
        recs = sorted((records[m] for m in members), key=key, reverse=True)
        keeper = recs[0]
        member_set = set(members)
        edges = []
        for m in members:
            for k in edges_by_node.get(m, []):
                a, b, info = pairs[k]
                if b in member_set:
                    edges.append({"a": records[a].path, "b": records[b].path, **info})
        explain = [f"kept {keeper.path} ({describe(keeper)})"]
        for r in recs[1:]:
            explain.append(
                f"dropped {r.path} ({describe(r)}): keeper is {why_better(keeper, r, policy, demote)}"
            )
        explain += [f"  {e['a']} ~ {e['b']}: {_edge_text(e)}" for e in edges[:MAX_EXPLAIN_EDGES]]
        if len(edges) > MAX_EXPLAIN_EDGES:
            explain.append(f"  ... and {len(edges) - MAX_EXPLAIN_EDGES} more pairs")
        groups.append(
            DupGroup(gid, keeper.path, [r.path for r in recs], _group_method(edges, method), explain, edges)
        )
    return groups


def hash_pairs(records: list[ImageRecord], cfg: DedupeConfig) -> list[tuple[int, int, dict[str, Any]]]:
    """Near-duplicate pairs by perceptual hash, per ``cfg.method`` (phash, dhash or hash = both agree)."""
    if not records:
        return []
    ph = hex_to_u64([r.phash or "0" for r in records])
    dh = hex_to_u64([r.dhash or "0" for r in records])
    if cfg.method == "dhash":
        i, j, d = near_pairs(dh, cfg.dhash_threshold)
        return [(int(a), int(b), {"dhash": int(x)}) for a, b, x in zip(i, j, d, strict=True)]
    i, j, d = near_pairs(ph, cfg.phash_threshold)
    dd = popcount64(dh[i] ^ dh[j]).astype(np.int64) if len(i) else np.zeros(0, np.int64)
    if cfg.method in ("hash", "both", "both-unverified"):
        ok = dd <= cfg.dhash_threshold
        i, j, d, dd = i[ok], j[ok], d[ok], dd[ok]
    return [
        (int(a), int(b), {"phash": int(x), "dhash": int(y)}) for a, b, x, y in zip(i, j, d, dd, strict=True)
    ]


def preferred_paths(root, paths: Sequence[str]) -> list[str]:
    """Paths of the same bytes, best first: a real file before a symlink, then the shortest path."""
    import os

    return sorted(paths, key=lambda p: (os.path.islink(os.path.join(root, p)), len(p), p))


def exact_groups(records: list[ImageRecord], root=None) -> list[DupGroup]:
    """Identical bytes at several paths: keep a real file over a symlink, then the shortest path."""
    groups = []
    for rec in records:
        if len(rec.paths) > 1:
            paths = preferred_paths(root, rec.paths) if root is not None else list(rec.paths)
            keeper = paths[0]
            explain = [f"kept {keeper}" + (" (a real file; the others include symlinks)" if root else "")] + [
                f"dropped {p}: identical bytes (SHA-256 {rec.sha256[:12]})" for p in paths[1:]
            ]
            groups.append(DupGroup(0, keeper, paths, "exact", explain))
    return groups


@dataclass
class DedupeResult:
    groups: list[DupGroup]
    rejected: int
    clip: dict[str, Any] = field(default_factory=dict)  # CLIP search stats: index, seconds, recall
    stats: dict[str, Any] = field(default_factory=dict)  # auto: candidates, verified pairs, timings
    overrides: dict[str, Any] = field(default_factory=dict)  # hand choices replayed: applied, ignored

    def as_dict(self) -> dict[str, Any]:
        out = {"groups": [g.as_dict() for g in self.groups], "rejected": self.rejected}
        if self.overrides:
            out["overrides"] = self.overrides
        if self.clip:
            out["clip"] = self.clip
        if self.stats:
            out["stats"] = self.stats
        return out


def _with_exact_copies(
    near: list[DupGroup], records: list[ImageRecord], root
) -> tuple[list[DupGroup], list[DupGroup]]:
    """Fold identical-bytes copies into the near groups (so each group is listed once); the rest stand alone."""
    by_path = {r.path: r for r in records}
    in_near: set[str] = set()
    for g in near:
        members: list[str] = []
        extra: list[str] = []
        for p in g.members:
            rec = by_path[p]
            in_near.add(rec.sha256)
            paths = preferred_paths(root, rec.paths)
            if p == g.keeper:
                g.keeper = paths[0]
                members = [*paths, *members]
            else:
                members += paths
            for q in paths[1:]:
                extra.append(f"dropped {q}: identical bytes to {paths[0]} (SHA-256 {rec.sha256[:12]})")
        g.members = members
        if extra:
            g.explain[1:1] = extra
    exact = [g for g in exact_groups([r for r in records if r.sha256 not in in_near], root)]
    return near, exact


def find_duplicates(
    manifest: Manifest,
    cfg: DedupeConfig = DedupeConfig(),
    *,
    extra_pairs=None,
    progress=None,
    stats: dict[str, Any] | None = None,
    mapper=None,
    overrides: dict[str, Any] | None = None,
) -> tuple[list[DupGroup], dict[str, tuple[str, str | None]], dict[str, dict[str, Any]]]:
    """Compute duplicate groups, the paths to reject and per-image group columns, without writing.

    The hand choices recorded in the manifest (stages/overrides.py) are replayed on the automatic groups;
    ``overrides`` receives what was applied and ignored."""
    from .overrides import apply_to_groups

    rejected_elsewhere = frozenset(
        p for p, stages in manifest.rejected_paths().items() if any(s != "dedupe" for s, _, _ in stages)
    )
    everything = manifest.images(include_errors=True)  # read once: it is every row of the manifest
    root = manifest.root
    for r in everything:  # the representative path of each image is its preferred one
        r.paths = preferred_paths(root, r.paths)
        r.path = r.paths[0]
    # Near-duplicate search over every decodable image; rejected ones join groups but rarely win.
    records = [r for r in everything if not r.error]
    demote = frozenset(r.path for r in records if all(p in rejected_elsewhere for p in r.paths))
    if cfg.method in ("auto", "both"):
        from .features import have_cv2

        if not have_cv2():
            notice = (
                f"--method {cfg.method} needs OpenCV (pip install opencv-python-headless); "
                f"using {'hash' if cfg.method == 'auto' else 'hash + CLIP'} without verification"
            )
            if stats is not None:
                stats["notice"] = notice
            cfg = dataclasses.replace(cfg, method="hash" if cfg.method == "auto" else "both-unverified")
    if cfg.method in ("auto", "both"):
        from .dedupe_auto import auto_groups

        near, auto_stats = auto_groups(
            manifest, records, cfg, demote, extra_pairs=extra_pairs, progress=progress, mapper=mapper
        )
        if stats is not None:
            stats.update(auto_stats)
    else:
        pairs: list[tuple[int, int, dict[str, Any]]] = []
        if cfg.method in ("phash", "dhash", "hash", "both-unverified"):
            pairs += hash_pairs(records, cfg)
        if extra_pairs is not None:
            pairs += extra_pairs(records)
        pairs = merge_pairs(pairs)
        name = "both" if cfg.method == "both-unverified" else cfg.method
        if tuple(cfg.keep) == ("original",):
            from .dedupe_auto import star_groups

            near = star_groups(manifest, records, pairs, name, demote, verify=False)
            for g in near:
                g.method = _group_method(g.edges, name)
        else:
            near = build_groups(records, pairs, cfg.keep, name, demote=demote)
    near, exact = _with_exact_copies(near, everything, root)
    found, report = apply_to_groups(manifest, near + exact, everything, demote, tuple(cfg.keep))
    if overrides is not None:
        overrides.update(report)
    for k, g in enumerate(found, start=1):
        g.id = k
    by_sha = {r.sha256: r for r in everything}
    sha_of = {p: r.sha256 for r in everything for p in r.paths}
    rejects: dict[str, tuple[str, str | None]] = {}
    updates: dict[str, dict[str, Any]] = {
        r.sha256: {"dup_group": None, "dup_keeper": None, "dup_explain": None} for r in everything
    }
    keeper_sha = set()
    for g in found:
        ksha = sha_of[g.keeper]
        keeper_sha.add(ksha)
        for p in g.members:
            sha = sha_of[p]
            updates[sha] = {
                "dup_group": g.id,
                "dup_keeper": int(sha == ksha),
                "dup_explain": "\n".join(g.explain),
            }
            if p == g.keeper:
                continue
            if sha == ksha:
                rejects[p] = ("duplicate", f"exact copy of {g.keeper}")
            else:
                why = "; ".join([g.method, *g.by_hand])
                for q in by_sha[sha].paths:
                    rejects[q] = ("duplicate", f"near-duplicate of {g.keeper} ({why})")
    return found, rejects, updates


def dedupe(
    manifest: Manifest,
    cfg: DedupeConfig = DedupeConfig(),
    *,
    extra_pairs=None,
    progress=None,
    mapper=None,
) -> DedupeResult:
    """Group exact and near duplicates, store groups and keep/reject decisions in the manifest.

    ``extra_pairs(records) -> pairs`` lets other methods (CLIP) contribute pairs that are merged
    with the hash pairs before grouping. ``mapper(fn, calls)`` runs the auto pipeline's per-image features
    and pair verification elsewhere (curate.engine.ray_engine.task_mapper).
    """
    stats: dict[str, Any] = {}
    hand: dict[str, Any] = {}
    groups, rejects, updates = find_duplicates(
        manifest, cfg, extra_pairs=extra_pairs, progress=progress, stats=stats, mapper=mapper, overrides=hand
    )
    with manifest.transaction():
        manifest.update_images(updates.items())
        manifest.set_rejects("dedupe", rejects)
    clip = dict(getattr(extra_pairs, "stats", {}) or {})
    return DedupeResult(groups, len(rejects), clip, stats, hand)
