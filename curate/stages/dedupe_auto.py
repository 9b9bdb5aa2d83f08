"""`--method auto`: near duplicates as scrapers make them, verified with local features.

1. Direct accept: 64-bit pHash distance <= ``phash_threshold`` (8).
2. Candidates: multi-crop pHash and ORB descriptor voting (see :mod:`.local_match`), plus CLIP pairs
   for ``--method both``; at most a few partners per image.
3. Each candidate pair is verified: RANSAC homography on the stored grey copies + tile-median NCC, with most of
   the overlap's tiles agreeing (a shared part of two frames is not a duplicate).
4. Groups are stars, never chains: in each connected component the keeper is chosen first
   (:mod:`.keeper`), and a member joins only with a verified link to that keeper (checked on the spot when
   the component linked it only through others). Members left out form groups of their own the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..config import DedupeConfig
from ..manifest import ImageRecord, Manifest
from . import features as F
from .dedupe import DupGroup, hex_to_u64, near_pairs
from .keeper import Copy, choose, flip

Pair = tuple[int, int, dict[str, Any]]
SMALL_COMPONENT = 24  # up to this size, every pair of a component is measured for the keeper rules


def _edge_words(e: dict[str, Any]) -> str:
    """Why a link was made, in words."""
    if "inliers" in e:
        words = f"{e['inliers']} RANSAC inliers, tile NCC {e['ncc']:.2f}"
        if not e["inliers"]:
            words = f"low texture: whole-frame NCC {e['ncc']:.2f}"
        if e.get("mirror"):
            words += ", mirrored"
        if "phash" in e:
            words += f", pHash distance {e['phash']}"
        if "clip" in e:
            words += f", CLIP similarity {e['clip']}"
        if e.get("via"):
            words += f" (candidate from {e['via']})"
        return words
    parts = []
    if "phash" in e:
        parts.append(f"pHash distance {e['phash']}")
    if "dhash" in e:
        parts.append(f"dHash distance {e['dhash']}")
    if "clip" in e:
        parts.append(f"CLIP similarity {e['clip']}")
    return ", ".join(parts) or "linked"


def describe_copy(c: Copy) -> str:
    r, s = c.rec, c.signals
    bits = [f"{r.width}x{r.height}", f"{r.size / 1024:.0f} KiB"]
    if s.get("jpeg_q") is not None:
        bits.append(f"JPEG q{s['jpeg_q']:.0f}")
    if s.get("border"):
        bits.append(f"border {s['border']:.0%}")
    if s.get("colour") is not None and s["colour"] < 3:
        bits.append("grey")
    return ", ".join(bits)


def star_groups(
    manifest: Manifest,
    records: list[ImageRecord],
    pairs: list[Pair],
    method: str,
    demote: frozenset[str],
    *,
    verify: bool,
    signals: dict[str, dict[str, Any]] | None = None,
    cache: F.FeatureCache | None = None,
    stats: dict[str, Any] | None = None,
    min_inliers: int = 10,
    min_ncc: float = 0.5,
    thorough: bool = False,
    check: Callable[[list[tuple[str, str]]], list[dict[str, Any] | None]] | None = None,
) -> list[DupGroup]:
    """Groups where every member has a (verified) link to the group's keeper.

    ``check(sha_pairs)`` verifies a batch of pairs (evidence or None each), e.g. on the worker pool
    (:class:`PairChecker`); without it the keeper checks run here, one at a time. In a component larger
    than ``SMALL_COMPONENT`` only members within two verified links of the keeper are checked against it
    (the others cannot join this star; they form stars of their own), so the work per component is
    bounded by its keeper's neighbourhood instead of its size.
    """
    from .dedupe import connected_groups

    if not pairs:
        return []
    if signals is None:
        signals = {s: lt.signals for s, lt in F.load_light(manifest, [r.sha256 for r in records]).items()}
    link: dict[tuple[int, int], dict[str, Any]] = {}
    for a, b, info in pairs:
        link[(min(a, b), max(a, b))] = info
    copies = [Copy(r, signals.get(r.sha256, {}), r.path in demote) for r in records]
    index_of = {id(c): n for n, c in enumerate(copies)}
    rejected_links = 0
    batch_checked: set[tuple[int, int]] = set()  # checked in a batch, not yet counted by linked()

    measured: dict[tuple[int, int], dict[str, Any] | None] = {}
    small_comp: set[int] = set()  # members of components small enough to measure every pair

    def evidence(x: Copy, y: Copy) -> dict[str, Any] | None:
        """Geometric evidence of a pair for the keeper rules (measured on demand, never a new link)."""
        a, b = index_of[id(x)], index_of[id(y)]
        key = (min(a, b), max(a, b))
        ev = link.get(key)
        if ev is None or "inliers" not in ev:
            if key in measured:
                ev = measured[key]
            elif verify and cache is not None and ev is not None and a in small_comp and b in small_comp:
                from .local_match import verify as verify_pair

                fa, fb = cache.get(records[key[0]].sha256), cache.get(records[key[1]].sha256)
                v = (
                    verify_pair(fa, fb, min_inliers, min_ncc, thorough)
                    if fa is not None and fb is not None
                    else None
                )
                ev = measured[key] = v.evidence() if v is not None and v.ok else None
            else:
                ev = None
        if ev is None or "inliers" not in ev:
            return None
        return ev if a < b else flip(ev)

    def linked(a: int, b: int) -> dict[str, Any] | None:
        nonlocal rejected_links
        key = (min(a, b), max(a, b))
        if key in link:
            if key in batch_checked:
                batch_checked.discard(key)
                if link[key] is None:
                    rejected_links += 1
            return link[key]
        if not verify or cache is None:
            return None
        fa, fb = cache.get(records[key[0]].sha256), cache.get(records[key[1]].sha256)
        if fa is None or fb is None:
            return None
        from .local_match import verify as verify_pair

        v = verify_pair(fa, fb, min_inliers, min_ncc, thorough)
        if stats is not None:
            stats["keeper_checks"] = stats.get("keeper_checks", 0) + 1
        if v.ok:
            link[key] = {**v.evidence(), "via": "check against the keeper"}
            adj.setdefault(a, set()).add(b)
            adj.setdefault(b, set()).add(a)
            return link[key]
        rejected_links += 1
        link[key] = None  # type: ignore[assignment]
        return None

    adj: dict[int, set[int]] = {}
    for a, b in link:
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    i = np.array([a for a, _ in link], np.int64)
    j = np.array([b for _, b in link], np.int64)
    groups: list[DupGroup] = []
    todo = connected_groups(len(records), i, j)
    while todo:
        comp = todo.pop()
        small_comp.clear()
        if len(comp) <= SMALL_COMPONENT:
            small_comp.update(comp)
        keeper, _ = choose([copies[m] for m in comp], evidence, explain=False)  # _make_group explains
        k = next(m for m in comp if copies[m] is keeper)
        reach = _near_keeper(k, comp, adj) if len(comp) > SMALL_COMPONENT else None
        if check is not None and verify and cache is not None:
            batch_checked |= _check_batch(k, comp, reach, link, records, check, stats, adj)
        members, edges, rest = [k], [], []
        for m in comp:
            if m == k:
                continue
            info = linked(k, m) if reach is None or m in reach else None
            if info is None:
                rest.append(m)
            else:
                members.append(m)
                a, b = (k, m) if k < m else (m, k)
                edges.append({"a": records[a].path, "b": records[b].path, **info})
        if len(members) > 1:
            groups.append(_make_group(copies, members, edges, method, evidence))  # members[0] is the keeper
        if len(rest) > 1:
            sub = {m: n for n, m in enumerate(rest)}
            # the verified links among the members left over, through their own adjacency (a scan of every
            # link per component made the grouping quadratic in the number of links)
            kept = [(a, b) for a in rest for b in adj.get(a, ()) if a < b and b in sub and link.get((a, b))]
            si = [sub[a] for a, _ in kept]
            sj = [sub[b] for _, b in kept]
            for g in connected_groups(len(rest), np.array(si, np.int64), np.array(sj, np.int64)):
                todo.append([rest[x] for x in g])
    if stats is not None:
        stats["not_linked_to_keeper"] = rejected_links
    groups.sort(key=lambda g: g.keeper)
    return groups


def _near_keeper(k: int, comp: list[int], adj: dict[int, set[int]]) -> set[int]:
    """Members of the component within two links of the keeper (links made so far)."""
    inside = set(comp)
    near = {m for m in adj.get(k, ()) if m in inside}
    for m in list(near):
        near |= {x for x in adj.get(m, ()) if x in inside}
    near.discard(k)
    return near


def _check_batch(
    k: int,
    comp: list[int],
    reach: set[int] | None,
    link: dict[tuple[int, int], dict[str, Any] | None],
    records: list[ImageRecord],
    check: Callable[[list[tuple[str, str]]], list[dict[str, Any] | None]],
    stats: dict[str, Any] | None,
    adj: dict[int, set[int]],
) -> set[tuple[int, int]]:
    """Verify, in one batch, every pair (keeper, member) the star needs and no link decided yet."""
    keys = [
        (min(k, m), max(k, m))
        for m in comp
        if m != k and (reach is None or m in reach) and (min(k, m), max(k, m)) not in link
    ]
    if not keys:
        return set()
    res = check([(records[a].sha256, records[b].sha256) for a, b in keys])
    for key, ev in zip(keys, res, strict=True):
        link[key] = {**ev, "via": "check against the keeper"} if ev is not None else None
        if ev is not None:
            adj.setdefault(key[0], set()).add(key[1])
            adj.setdefault(key[1], set()).add(key[0])
    if stats is not None:
        stats["keeper_checks"] = stats.get("keeper_checks", 0) + len(keys)
    return set(keys)


def _make_group(copies: list[Copy], members: list[int], edges: list[dict], method: str, evidence) -> DupGroup:
    cs = [copies[m] for m in members]
    keeper, why = choose(cs, evidence, keeper=cs[0])  # the star's centre: every member is linked to it
    ordered = [keeper] + [c for c in cs if c is not keeper]
    explain = [f"kept {keeper.rec.path} ({describe_copy(keeper)})"]
    for c in ordered[1:]:
        explain.append(f"dropped {c.rec.path} ({describe_copy(c)}): keeper wins on rule: {why[c.rec.path]}")
    for e in edges:
        explain.append(f"  {e['a']} ~ {e['b']}: {_edge_words(e)}")
    return DupGroup(0, keeper.rec.path, [c.rec.path for c in ordered], method, explain, edges)


_W: dict[str, Any] = {}


def _init_verifier(root: str, db: str, min_inliers: int, min_ncc: float, thorough: bool = False) -> None:
    _W["cache"] = F.FeatureCache(Manifest(root, db, create=False, write=False))
    _W["args"] = (min_inliers, min_ncc, thorough)


def _verify_chunk(pairs: list[tuple[str, str]]) -> list[dict[str, Any] | None]:
    """Worker: verify pairs of content hashes; evidence of the accepted ones, None for the others."""
    from .local_match import verify

    cache: F.FeatureCache = _W["cache"]
    out: list[dict[str, Any] | None] = []
    for sa, sb in pairs:
        fa, fb = cache.get(sa), cache.get(sb)
        v = verify(fa, fb, *_W["args"]) if fa is not None and fb is not None else None
        out.append(v.evidence() if v is not None and v.ok else None)
    return out


def verify_rows(
    rows: dict[str, dict[str, bytes]],
    pairs: list[tuple[str, str]],
    min_inliers: int,
    min_ncc: float,
    thorough: bool,
) -> list[dict[str, Any] | None]:
    """Task: verify pairs whose feature rows travel with them (no manifest on the worker); evidence or None."""
    from .local_match import verify

    feats = {sha: F.decode_row(row) for sha, row in rows.items()}
    out: list[dict[str, Any] | None] = []
    for sa, sb in pairs:
        fa, fb = feats.get(sa), feats.get(sb)
        v = verify(fa, fb, min_inliers, min_ncc, thorough) if fa is not None and fb is not None else None
        out.append(v.evidence() if v is not None and v.ok else None)
    return out


def _shipped(manifest: Manifest, chunks: list[list[tuple[str, str]]], cfg: DedupeConfig):
    """(rows, pairs, options) per chunk, each chunk with the feature rows of its own images only."""
    for pairs in chunks:
        shas = sorted({s for pair in pairs for s in pair})
        rows = F.raw_rows(manifest, shas)
        yield rows, pairs, cfg.min_inliers, cfg.min_ncc, cfg.thorough


def verify_many(
    manifest: Manifest,
    pairs: list[tuple[str, str]],
    cfg: DedupeConfig,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 0,
    chunk: int = 64,
    mapper: Callable[..., Any] | None = None,
):
    """Verify candidate pairs (in order), on every core when there are many; yields evidence or None.

    ``mapper(fn, calls)`` runs the chunks elsewhere (curate.engine.ray_engine.task_mapper): each call
    carries its pairs' feature rows, read here, so workers need no access to the manifest.
    """
    import os

    workers = workers or os.cpu_count() or 1
    if progress and pairs:
        progress(0, len(pairs))
    chunk = getattr(mapper, "chunk", chunk)
    chunks = [pairs[k : k + chunk] for k in range(0, len(pairs), chunk)]
    args = (str(manifest.root), str(manifest.path), cfg.min_inliers, cfg.min_ncc, cfg.thorough)
    done = 0
    if mapper is not None:
        for res in mapper(verify_rows, _shipped(manifest, chunks, cfg)):
            yield from res
            done += len(res)
            if progress:
                progress(done, len(pairs))
        return
    if workers <= 1 or len(pairs) < 4 * chunk:
        _init_verifier(*args)
        results = map(_verify_chunk, chunks)
        pool = None
    else:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, initializer=_init_verifier, initargs=args)
        results = pool.map(_verify_chunk, chunks)
    try:
        for res in results:
            yield from res
            done += len(res)
            if progress:
                progress(done, len(pairs))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        _W.clear()


class PairChecker:
    """Keeper checks in batches on a worker pool started on first need (``with PairChecker(...) as c``).

    Batches smaller than ``min_batch`` pairs, or with one worker, run here."""

    def __init__(
        self, manifest: Manifest, cfg: DedupeConfig, workers: int = 0, chunk: int = 16, min_batch: int = 4
    ):
        import os

        self.args = (str(manifest.root), str(manifest.path), cfg.min_inliers, cfg.min_ncc, cfg.thorough)
        self.workers = workers or os.cpu_count() or 1
        self.chunk, self.min_batch = chunk, min_batch
        self.pool = None

    def __enter__(self) -> PairChecker:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        _W.clear()

    def __call__(self, pairs: list[tuple[str, str]]) -> list[dict[str, Any] | None]:
        # a check costs 5-50 ms: small batches are worth spreading once the pool runs
        size = max(1, min(self.chunk, -(-len(pairs) // (2 * self.workers))))
        chunks = [pairs[k : k + size] for k in range(0, len(pairs), size)]
        if self.workers <= 1 or len(pairs) < self.min_batch:
            if "cache" not in _W:
                _init_verifier(*self.args)
            return [ev for c in chunks for ev in _verify_chunk(c)]
        if self.pool is None:
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.workers, initializer=_init_verifier, initargs=self.args)
        return [ev for res in self.pool.map(_verify_chunk, chunks) for ev in res]


def auto_groups(
    manifest: Manifest,
    records: list[ImageRecord],
    cfg: DedupeConfig,
    demote: frozenset[str],
    *,
    extra_pairs: Callable[[list[ImageRecord]], list[Pair]] | None = None,
    progress: Callable[[int, int], None] | None = None,
    mapper: Callable[..., Any] | None = None,
) -> tuple[list[DupGroup], dict[str, Any]]:
    """The verified pipeline; returns the groups and what it did (counts and seconds per step).

    ``mapper`` runs the per-image features still missing and the pair verification elsewhere (Ray);
    candidate generation and grouping stay here.
    """
    from .local_match import multicrop_candidates, vote_candidates

    t0 = time.perf_counter()
    stats: dict[str, Any] = {"images": len(records)}
    if not F.have_cv2():
        from ..errors import CurateError

        raise CurateError(
            "--method auto needs OpenCV: pip install opencv-python-headless (or use --method hash)"
        )
    lacking = set(F.missing(manifest, [r.sha256 for r in records]))
    todo = {r.sha256: r.path for r in records if r.sha256 in lacking}
    if todo:
        stats["features_computed"] = F.backfill(manifest, todo, progress=progress, mapper=mapper)
    stats["seconds_features"] = round(time.perf_counter() - t0, 3)
    t = time.perf_counter()
    light = F.load_light(manifest, [r.sha256 for r in records])
    idx = [k for k, r in enumerate(records) if r.sha256 in light]
    # 1. direct accept by global pHash
    ph = hex_to_u64([r.phash or "0" for r in records])
    ii, jj, dd = near_pairs(ph, cfg.phash_threshold)
    accepted: dict[tuple[int, int], dict[str, Any]] = {
        (int(a), int(b)): {"phash": int(d)} for a, b, d in zip(ii, jj, dd, strict=True)
    }
    stats["direct_phash"] = len(accepted)
    # 2. candidates
    cand: dict[tuple[int, int], str] = {}
    if len(idx) > 1:
        codes = np.stack([light[records[k].sha256].codes for k in idx])
        for (a, b), _d in multicrop_candidates(codes).items():
            cand[(idx[a], idx[b])] = "multi-crop pHash"
        stats["candidates_multicrop"] = len(cand)
        votes, kind = vote_candidates(
            [light[records[k].sha256].desc for k in idx], [light[records[k].sha256].mdesc for k in idx]
        )
        for (a, b), _v in votes.items():
            key = (idx[a], idx[b])
            cand[key] = "multi-crop pHash + ORB votes" if key in cand else "ORB votes"
        stats["candidates_votes"] = len(votes)
        stats["vote_index"] = kind
    extra_info: dict[tuple[int, int], dict[str, Any]] = {}
    if extra_pairs is not None:
        for a, b, info in extra_pairs(records):
            key = (min(a, b), max(a, b))
            cand[key] = cand[key] + " + CLIP" if key in cand else "CLIP"
            extra_info[key] = info
            if key in accepted:
                accepted[key].update(info)
        stats["candidates_clip"] = len(extra_info)
    stats["seconds_candidates"] = round(time.perf_counter() - t, 3)
    # 3. verify
    t = time.perf_counter()
    cache = F.FeatureCache(manifest)
    pending = sorted(k for k in cand if k not in accepted)
    stats["pairs_verified"] = len(pending)
    ok = 0
    sha_pairs = [(records[a].sha256, records[b].sha256) for a, b in pending]
    for (a, b), ev in zip(
        pending, verify_many(manifest, sha_pairs, cfg, progress, mapper=mapper), strict=True
    ):
        if ev is not None:
            accepted[(a, b)] = {**ev, **extra_info.get((a, b), {}), "via": cand[(a, b)]}
            ok += 1
    stats["pairs_accepted"] = ok
    stats["seconds_verify"] = round(time.perf_counter() - t, 3)
    # 4. star groups around the keeper
    t = time.perf_counter()
    pairs = [(a, b, info) for (a, b), info in sorted(accepted.items())]
    with PairChecker(manifest, cfg) as check:
        groups = star_groups(
            manifest,
            records,
            pairs,
            cfg.method,
            demote,
            verify=True,
            signals={s: lt.signals for s, lt in light.items()},
            cache=cache,
            stats=stats,
            min_inliers=cfg.min_inliers,
            min_ncc=cfg.min_ncc,
            thorough=cfg.thorough,
            check=check if mapper is None else None,
        )
    stats["seconds_group"] = round(time.perf_counter() - t, 3)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return groups, stats
