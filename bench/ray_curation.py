"""Dedupe on Ray vs the local process pool, on the same planted set (one JSON line per case).

Times the two steps `curate dedupe --engine ray` moves onto Ray tasks: candidate-pair verification (ORB matching
+ RANSAC + NCC) and the per-image features dedupe computes when the scan did not store them. Candidate search
(FAISS) and grouping run on the driver in both cases and are reported for scale. ray.init is timed separately
and left out of the Ray figures (a cluster is started once, not per command).

    python bench/ray_curation.py [--repeat 3] [--out bench/results/ray_dedupe_2core.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine_info, summarize, write_results  # noqa: E402


def _drop_features(root: Path) -> None:
    from curate import Dataset

    with Dataset.open(root) as ds, ds.manifest.transaction():
        ds.manifest.conn.execute("DELETE FROM dedupe_features")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-side", type=int, default=640)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import ray

    from curate import Dataset
    from curate.engine.ray_engine import task_mapper
    from curate.eval import build_set
    from curate.stages.dedupe import dedupe

    tmp = Path(tempfile.mkdtemp())
    src = tmp / "src"
    build_set(src, max_side=args.max_side)
    with Dataset.open(src) as ds:
        ds.scan()
        n_images = ds.summary().get("images")
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t0
    emit({"case": "ray.init", "seconds": round(init_s, 2)})
    engines = {"local": None, "ray": task_mapper()}
    times: dict[str, list[float]] = {}
    other: dict[str, dict] = {}
    for r in range(args.repeat):  # engines interleaved, so load from other work on the box hits both alike
        for step in ("verify", "features"):
            for engine, mapper in engines.items():
                case = f"{step}-{engine}"
                d = tmp / f"{case}-{r}"
                shutil.copytree(src, d, symlinks=True)
                if step == "features":
                    _drop_features(d)
                with Dataset.open(d) as ds:
                    res = dedupe(ds.manifest, ds.config.dedupe, mapper=mapper)
                st = res.stats
                times.setdefault(case, []).append(st[f"seconds_{step}"])
                other[case] = {
                    "pairs_verified": st["pairs_verified"],
                    "pairs_accepted": st["pairs_accepted"],
                    "features_computed": st.get("features_computed", 0),
                    "groups": len(res.groups),
                    "seconds_candidates_driver": st["seconds_candidates"],
                    "seconds_group_driver": st["seconds_group"],
                }
                shutil.rmtree(d)
    cases = []
    for case, ts in times.items():
        step, engine = case.split("-")
        o = other[case]
        n = o["pairs_verified"] if step == "verify" else o["features_computed"]
        row = {"case": case, "step": step, "engine": engine, "items": n, "images": n_images,
               **summarize(ts, n), **o}  # fmt: skip
        emit(row)
        cases.append(row)
    ray.shutdown()
    shutil.rmtree(tmp)
    by = {c["case"]: c for c in cases}
    for step in ("verify", "features"):
        loc, ray_ = by[f"{step}-local"], by[f"{step}-ray"]
        assert loc["pairs_accepted"] == ray_["pairs_accepted"] and loc["groups"] == ray_["groups"]
    summary = {
        f"{s}_ray_over_local": round(by[f"{s}-ray"]["median_s"] / by[f"{s}-local"]["median_s"], 2)
        for s in ("verify", "features")
    }
    emit(summary)
    if args.out:
        write_results(
            Path(args.out).name,
            {"machine": machine_info(), "ray": ray.__version__, "ray_init_s": round(init_s, 2),
             "note": "same planted set and results on both engines (asserted); Ray figures exclude ray.init; "
                     "local = process pool on every core (the default engine)",
             "cases": cases, "summary": summary},
        )  # fmt: skip


if __name__ == "__main__":
    main()
