"""Near-duplicate search speed and correctness on synthetic 64-bit perceptual hashes.

    python bench/dedupe_speed.py                      # 100k hashes, 3 rounds, imagededup on 20k
    python bench/dedupe_speed.py --n 20000 --no-write # quick look

Codes are random 64-bit words with planted near-duplicate pairs at known Hamming distances 0..16.
Checked, not just timed:
  * recall of planted pairs with distance <= threshold must be 1.0, and no planted pair above it is reported;
  * every reported pair's distance is recomputed and is <= threshold;
  * the pair set equals an independent brute force (XOR + popcount of every pair) on a 5k subset,
    and on all codes with --full-check.
Two code distributions: "uniform" (every bit a fair coin) and "skewed" (each bit position has its own
probability in [0.2, 0.8]), which crowds the 16-bit blocks the multi-index search buckets on and so is
the harder case. Baseline: imagededup's ``PHash().find_duplicates(encoding_map=...)`` on the first
``--imagededup-n`` codes (its default brute_force_cython search, all cores), time-boxed in a child
process; its pairs must equal curate's on the same codes. Goal: near_pairs + connected_groups < 5 s on 100k.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import emit, machine_info, run_json_child, summarize, write_results  # noqa: E402

from curate.stages.dedupe import connected_groups, near_pairs  # noqa: E402

MAX_PLANTED_DISTANCE = 16


def make_codes(n: int, n_planted: int, seed: int, skewed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Random codes plus planted (base, copy, distance) triples; distances cycle through 0..16."""
    rng = np.random.default_rng(seed)
    if skewed:
        p = rng.uniform(0.2, 0.8, 64)
        bits = rng.random((n, 64)) < p
        codes = (bits.astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(1, dtype=np.uint64)
    else:
        codes = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    slots = rng.permutation(n)[: 2 * n_planted]
    bases, copies = slots[:n_planted], slots[n_planted:]
    dists = np.arange(n_planted) % (MAX_PLANTED_DISTANCE + 1)
    for b, c, d in zip(bases, copies, dists, strict=True):
        flip = rng.choice(64, size=int(d), replace=False)
        mask = np.uint64(sum(1 << int(k) for k in flip))
        codes[c] = codes[b] ^ mask
    planted = np.stack([np.minimum(bases, copies), np.maximum(bases, copies), dists], axis=1)
    return codes, planted


def brute_pairs(codes: np.ndarray, threshold: int, block: int = 512) -> set[tuple[int, int]]:
    """Every pair (i < j) within ``threshold``, by XOR + popcount of all pairs (independent reference)."""
    out: set[tuple[int, int]] = set()
    n = len(codes)
    for s in range(0, n, block):
        x = codes[s : s + block, None] ^ codes[None, :]
        d = np.bitwise_count(x)
        ii, jj = np.nonzero(d <= threshold)
        ii += s
        keep = ii < jj
        out.update(zip(ii[keep].tolist(), jj[keep].tolist(), strict=True))
    return out


def check(codes: np.ndarray, planted: np.ndarray, threshold: int, i, j, d, full: bool) -> dict[str, Any]:
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    true_d = np.bitwise_count(codes[i] ^ codes[j]).astype(np.int64)
    want = {(int(a), int(b)) for a, b, dist in planted if dist <= threshold}
    above = {(int(a), int(b)) for a, b, dist in planted if dist > threshold}
    out: dict[str, Any] = {
        "pairs": len(found),
        "planted_within": len(want),
        "recall_planted": round(len(want & found) / max(1, len(want)), 6),
        "planted_above_reported": len(above & found),
        "distances_correct": bool(np.array_equal(true_d, d)) and bool((d <= threshold).all()),
    }
    # 5k subset: the first 5,000 planted members plus random others, re-indexed, searched on their own.
    rng = np.random.default_rng(7)
    members = np.unique(planted[:, :2].ravel())[:2500]
    rest = np.setdiff1d(np.arange(len(codes)), members)
    sub = np.sort(np.concatenate([members, rng.choice(rest, 5000 - len(members), replace=False)]))
    si, sj, _ = near_pairs(codes[sub], threshold)
    out["subset_5k_equal_bruteforce"] = set(zip(si.tolist(), sj.tolist(), strict=True)) == brute_pairs(
        codes[sub], threshold
    )
    out["subset_5k_pairs"] = len(si)
    if full:
        t0 = time.perf_counter()
        out["full_equal_bruteforce"] = found == brute_pairs(codes, threshold)
        out["full_bruteforce_s"] = round(time.perf_counter() - t0, 1)
    return out


def imagededup_child(path: str, threshold: int, workers: int) -> None:
    """Child process: imagededup's find_duplicates on hex codes from ``path``; prints seconds and pairs."""
    import logging

    from imagededup.methods import PHash

    logging.disable(logging.WARNING)
    codes = np.load(path)
    enc = {f"{k:06d}": f"{int(c):016x}" for k, c in enumerate(codes)}
    hasher = PHash(verbose=False)
    t0 = time.perf_counter()
    dups = hasher.find_duplicates(
        encoding_map=enc, max_distance_threshold=threshold, scores=False, num_dist_workers=workers
    )
    dt = time.perf_counter() - t0
    pairs = sorted({tuple(sorted((int(a), int(b)))) for a, bs in dups.items() for b in bs})
    print(json.dumps({"seconds": dt, "pairs": pairs}), flush=True)


def run_imagededup(codes: np.ndarray, threshold: int, workers: int, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "codes.npy")
        np.save(path, codes)
        cmd = [sys.executable, __file__, "--imagededup-child", path, "--threshold", str(threshold)]
        cmd += ["--workers", str(workers)]
        return run_json_child(cmd, timeout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--planted", type=int, default=3400, help="planted pairs (distances cycle 0..16)")
    ap.add_argument("--threshold", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--imagededup-n", type=int, default=20_000, help="0 skips the imagededup baseline")
    ap.add_argument("--imagededup-timeout", type=float, default=600.0)
    ap.add_argument("--imagededup-rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--full-check", action="store_true", help="also brute-force all n codes (slow)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--imagededup-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.imagededup_child:
        imagededup_child(args.imagededup_child, args.threshold, args.workers)
        return

    cases: dict[str, Any] = {}
    for dist in ("uniform", "skewed"):
        codes, planted = make_codes(args.n, args.planted, args.seed, skewed=dist == "skewed")
        t_pairs, t_groups = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            i, j, d = near_pairs(codes, args.threshold)
            t1 = time.perf_counter()
            groups = connected_groups(len(codes), i, j)
            t2 = time.perf_counter()
            t_pairs.append(t1 - t0)
            t_groups.append(t2 - t1)
        total = [a + b for a, b in zip(t_pairs, t_groups, strict=True)]
        rec = {
            "case": f"curate_near_pairs+groups/{dist}",
            "n": args.n,
            "threshold": args.threshold,
            "near_pairs": summarize(t_pairs, args.n),
            "connected_groups": summarize(t_groups, args.n),
            "total": summarize(total, args.n),
            "groups": len(groups),
            "goal_total_s": 5.0,
            "met": bool(min(total) < 5.0 and sorted(total)[len(total) // 2] < 5.0),
            **check(codes, planted, args.threshold, i, j, d, args.full_check),
        }
        emit(rec)
        cases[rec["case"]] = rec

        m = args.imagededup_n
        if m and dist == "uniform":
            sub = codes[:m]
            times_c = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                ci, cj, _ = near_pairs(sub, args.threshold)
                times_c.append(time.perf_counter() - t0)
            ours = set(zip(ci.tolist(), cj.tolist(), strict=True))
            rec = {
                "case": f"curate_near_pairs/{dist}/{m}",
                "n": m,
                **summarize(times_c, m),
                "pairs": len(ours),
            }
            emit(rec)
            cases[rec["case"]] = rec
            times_i, res = [], {}
            for _ in range(args.imagededup_rounds):
                res = run_imagededup(sub, args.threshold, args.workers, args.imagededup_timeout)
                if "error" in res:
                    break
                times_i.append(res["seconds"])
            rec = {"case": f"imagededup_find_duplicates/{dist}/{m}", "n": m, "search_method": "default"}
            if times_i:
                theirs = {tuple(p) for p in res["pairs"]}
                rec.update(summarize(times_i, m), pairs=len(theirs), pairs_equal_curate=theirs == ours)
                rec["speedup_curate"] = round(
                    sorted(times_i)[len(times_i) // 2] / sorted(times_c)[len(times_c) // 2], 1
                )
            else:
                rec["error"] = res.get("error")
            emit(rec)
            cases[rec["case"]] = rec

    if not args.no_write:
        out = write_results(
            "dedupe_speed.json",
            {
                "benchmark": "dedupe_speed",
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "machine": machine_info(),
                "workers": args.workers,
                "rounds": args.rounds,
                "cases": cases,
            },
        )
        emit({"case": "written", "path": str(out)})


if __name__ == "__main__":
    main()
