"""Scan throughput, local process pool vs --engine ray, on the same synthetic folder (one JSON line per case)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def main(n: int = 200) -> None:
    import ray

    from curate import Dataset

    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    src = tmp / "src"
    src.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(
            src / f"{i}.jpg", quality=90
        )
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    out = []
    for engine in ("local", "ray"):
        d = tmp / engine
        shutil.copytree(src, d)
        t0 = time.perf_counter()
        with Dataset.open(d) as ds:
            res = ds.scan(engine=engine)
        dt = time.perf_counter() - t0
        row = {
            "case": engine,
            "images": res.decoded,
            "seconds": round(dt, 2),
            "img_per_s": round(res.decoded / dt, 1),
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "note": "ray excludes ray.init (started once before)",
        }
        print(json.dumps(row))
        out.append(row)
    ray.shutdown()
    shutil.rmtree(tmp)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
