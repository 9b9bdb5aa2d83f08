"""Time the star grouping of `dedupe --method auto` alone, on the first N images of a scanned set.

Candidates and verification run once per N and their accepted pairs are saved beside the manifest copy
(JSON), so the grouping can be re-timed and profiled quickly:

    python bench/dedupe_grouping.py --root /tmp/s5k/scale --db /tmp/copy/manifest.db --n 1000 2000
    python bench/dedupe_grouping.py ... --n 1000 --profile      # cProfile of the grouping, top 25

Prints one JSON line per N: grouping seconds, keeper checks, groups, and a digest of the groups.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def accepted_pairs(man, records, cfg, cache_path: Path) -> list:
    """Accepted pairs (a, b, evidence) of auto's steps 1-3, computed once and kept in cache_path."""
    if cache_path.exists():
        return [(a, b, e) for a, b, e in json.loads(cache_path.read_text())]
    import numpy as np

    from curate.stages import features as F
    from curate.stages.dedupe import hex_to_u64, near_pairs
    from curate.stages.dedupe_auto import verify_many
    from curate.stages.local_match import multicrop_candidates, vote_candidates

    light = F.load_light(man, [r.sha256 for r in records])
    idx = [k for k, r in enumerate(records) if r.sha256 in light]
    ph = hex_to_u64([r.phash or "0" for r in records])
    ii, jj, dd = near_pairs(ph, cfg.phash_threshold)
    acc = {(int(a), int(b)): {"phash": int(d)} for a, b, d in zip(ii, jj, dd, strict=True)}
    cand: dict = {}
    codes = np.stack([light[records[k].sha256].codes for k in idx])
    for (a, b), _ in multicrop_candidates(codes).items():
        cand[(idx[a], idx[b])] = "multi-crop pHash"
    votes, _ = vote_candidates(
        [light[records[k].sha256].desc for k in idx], [light[records[k].sha256].mdesc for k in idx]
    )
    for (a, b), _ in votes.items():
        key = (idx[a], idx[b])
        cand[key] = "multi-crop pHash + ORB votes" if key in cand else "ORB votes"
    pending = sorted(k for k in cand if k not in acc)
    shas = [(records[a].sha256, records[b].sha256) for a, b in pending]
    for (a, b), ev in zip(pending, verify_many(man, shas, cfg), strict=True):
        if ev is not None:
            acc[(a, b)] = {**ev, "via": cand[(a, b)]}
    out = [(a, b, info) for (a, b), info in sorted(acc.items())]
    cache_path.write_text(json.dumps(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--db", required=True)
    ap.add_argument("--n", type=int, nargs="+", default=[1000])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--workers", type=int, default=2, help="keeper checks on this many workers (0: serial, as before)"
    )
    args = ap.parse_args()
    from curate.config import DedupeConfig
    from curate.manifest import Manifest
    from curate.stages import features as F
    from curate.stages.dedupe_auto import star_groups

    man = Manifest(args.root, args.db, create=False, write=False)
    cfg = DedupeConfig(method="auto")
    every = sorted(man.images(), key=lambda r: r.path)
    for n in args.n:
        records = every[:n]
        pairs = accepted_pairs(man, records, cfg, Path(args.db).with_name(f"accepted_{n}.json"))
        light = F.load_light(man, [r.sha256 for r in records])
        stats: dict = {}
        kw = dict(
            verify=True,
            signals={s: lt.signals for s, lt in light.items()},
            cache=F.FeatureCache(man),
            stats=stats,
            min_inliers=cfg.min_inliers,
            min_ncc=cfg.min_ncc,
            thorough=cfg.thorough,
        )
        check = None
        if args.workers:
            from curate.stages.dedupe_auto import PairChecker

            check = PairChecker(man, cfg, workers=args.workers)
        if check is not None:
            kw["check"] = check
        t, c = time.perf_counter(), time.process_time()
        c_kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            groups = prof.runcall(star_groups, man, records, pairs, "auto", frozenset(), **kw)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        else:
            groups = star_groups(man, records, pairs, "auto", frozenset(), **kw)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        if check is not None:
            check.__exit__()
        k2 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_workers = k2.ru_utime + k2.ru_stime - c_kids.ru_utime - c_kids.ru_stime
        planted_file = Path(args.root).parent / "planted.json"
        recall = mixed = None
        if planted_file.exists():
            have = {r.path for r in records}
            planted = {
                c_: o for c_, o in json.loads(planted_file.read_text()).items() if c_ in have and o in have
            }
            group_of = {p: k for k, g in enumerate(groups) for p in g.members}
            found = sum(1 for c_, o in planted.items() if c_ in group_of and group_of.get(o) == group_of[c_])
            recall = round(found / max(1, len(planted)), 4)
            mixed = sum(1 for g in groups if len({planted.get(p, p) for p in g.members}) > 1)
        digest = hashlib.sha256(json.dumps([[g.keeper, g.members] for g in groups]).encode()).hexdigest()[:16]
        sizes = sorted((len(g.members) for g in groups), reverse=True)
        print(
            json.dumps(
                {
                    "images": n,
                    "accepted_pairs": len(pairs),
                    "seconds_group": round(wall, 2),
                    "cpu_seconds_main": round(cpu, 2),
                    "cpu_seconds_workers": round(cpu_workers, 2),
                    "groups": len(groups),
                    "largest": sizes[:5],
                    "groups_digest": digest,
                    "planted_recall": recall,
                    "groups_joining_distinct_images": mixed,
                    "workers": args.workers,
                    **stats,
                    "load": os.getloadavg()[0],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
