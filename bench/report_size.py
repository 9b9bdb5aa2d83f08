"""Time `curate report` on N small synthetic images (cold thumbnails, then warm) and print one JSON line."""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from curate.dataset import Dataset


def main(n: int = 2000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        root.mkdir()
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(root / f"{i:05d}.png")
        with Dataset.open(root) as ds:
            ds.scan()
            ds.filter(min_side=64)
            t0 = time.perf_counter()
            out = ds.report()
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            ds.report()
            warm = time.perf_counter() - t0
            kept = len(ds.kept())
        print(json.dumps({"case": "report", "images": n, "kept": kept, "cold_s": round(cold, 2), "warm_s": round(warm, 2),
                          "html_bytes": out.stat().st_size, "machine": platform.processor() or platform.machine(),
                          "note": "2-core shared dev box, other jobs running"}))  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
