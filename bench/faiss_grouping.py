"""FAISS grouping of N random 512-d embeddings with planted near-duplicates: exact vs IVF, time and recall.

Baseline (named, same run): exact inner-product range search on a flat index (no misses).
Prints one JSON line per case and writes them to bench/results/faiss_grouping.json.

    python bench/faiss_grouping.py --n 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.stages.dedupe import connected_groups  # noqa: E402
from curate.stages.similarity import approx_pairs, exact_pairs, ivf_blas_pairs, sampled_recall  # noqa: E402


def planted(n: int, dim: int, n_src: int, seed: int = 0) -> np.ndarray:
    """Random unit vectors; the last n_src*2 rows are 1-2 noisy copies of sources (cos ~0.90-0.99)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n - 2 * n_src, n_src, replace=False)
    for c in range(2):
        noise = rng.normal(size=(n_src, dim)).astype(np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        a = rng.uniform(0.1, 0.45, size=(n_src, 1)).astype(np.float32)  # angle-ish mix
        y = x[src] + a * noise
        x[n - (c + 1) * n_src : n - c * n_src] = y / np.linalg.norm(y, axis=1, keepdims=True)
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "faiss_grouping.json"))
    args = ap.parse_args()
    import faiss

    n_src = args.n // 20
    x = planted(args.n, args.dim, n_src)
    env = {"faiss": faiss.__version__, "threads": faiss.omp_get_max_threads(), "cpus": os.cpu_count(),
           "machine": platform.processor() or platform.machine()}  # fmt: skip
    lines = []

    def emit(d):
        d = {**d, **env, "n": args.n, "dim": args.dim, "threshold": args.threshold}
        print(json.dumps(d), flush=True)
        lines.append(d)

    t0 = time.perf_counter()
    i, j, _ = exact_pairs(x, args.threshold)
    t_exact = time.perf_counter() - t0
    t1 = time.perf_counter()
    groups = connected_groups(args.n, i, j)
    t_groups = time.perf_counter() - t1
    truth = set(zip(i.tolist(), j.tolist(), strict=True))
    emit({"case": "exact-flat (baseline)", "seconds": round(t_exact, 2), "pairs": len(truth), "recall": 1.0,
          "groups": len(groups), "union_find_s": round(t_groups, 3)})  # fmt: skip
    root = int(np.sqrt(args.n))
    cases = [("faiss IndexIVFFlat", root, 4), ("faiss IndexIVFFlat", root, 8)]
    cases += [("curate ivf (faiss k-means + per-cell BLAS)", nl, npb)
              for nl, npb in [(root, 4), (root, 8), (root, 16), (2 * root, 8), (2 * root, 16)]]  # fmt: skip
    for name, nlist, nprobe in cases:
        t0 = time.perf_counter()
        if name.startswith("faiss"):
            ai, aj, _, _ = approx_pairs(x, args.threshold, nlist=nlist, nprobe=nprobe)
        else:
            ai, aj, _, _ = ivf_blas_pairs(x, args.threshold, nlist=nlist, nprobe=nprobe)
        secs = time.perf_counter() - t0
        found = set(zip(ai.tolist(), aj.tolist(), strict=True))
        est, n_sample = sampled_recall(x, args.threshold, ai, aj)
        g = connected_groups(args.n, ai, aj)
        emit({"case": f"{name} nlist={nlist} nprobe={nprobe}", "seconds": round(secs, 2), "pairs": len(found),
              "recall": round(len(found & truth) / max(1, len(truth)), 4), "false_pairs": len(found - truth),
              "sampled_recall_estimate": est, "sample_pairs": n_sample, "groups": len(g),
              "groups_exact": len(groups), "speedup_vs_exact": round(t_exact / secs, 1)})  # fmt: skip
    Path(args.out).write_text(json.dumps(lines, indent=1) + "\n")


if __name__ == "__main__":
    main()
