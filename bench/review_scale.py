"""`curate review` on a large dataset: time each page and each kind of change over HTTP.

    python bench/review_scale.py [--images 10000]

The manifest is built directly (rows with random hashes, scores and sizes; 5% planted near-duplicate
pairs; a 64x64 PNG per image so thumbnails decode), then the real filter, dedupe (pHash), split and
bucket stages run on it, with a hand caption beside every image. Prints one JSON line per case:
seconds for the first request of a page (cold caches) and the next one, and for bulk changes.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TAGS = ["smile", "outdoors", "red hat", "blue sky", "watermark", "tree", "indoors", "lamp", "long hair"]


def build(root: Path, n: int, seed: int = 0) -> None:
    from curate.dataset import Dataset

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    tile = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    codes = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    dup = rng.random(n) < 0.05
    codes[1:][dup[1:]] = codes[:-1][dup[1:]] ^ np.uint64(1)  # a near-duplicate of the previous image
    with Dataset.open(root) as ds:
        m = ds.manifest
        with m.transaction():
            for k in range(n):
                rel = f"d{k // 1000:02d}/img{k:05d}.png"
                (root / rel).parent.mkdir(exist_ok=True)
                tile.save(root / rel)
                (root / rel).with_suffix(".txt").write_text(
                    ", ".join(["ohwx", *rng.choice(TAGS, 4, replace=False)]) + "\n"
                )
                sha = hashlib.sha256(f"{seed}-{k}".encode()).hexdigest()
                w, h = [(1024, 768), (768, 1024), (1024, 1024), (1216, 832)][k % 4]
                m.upsert_file(rel, sha, 100_000, k)
                m.upsert_image({
                    "sha256": sha, "size": 100_000 + k, "format": "PNG", "mode": "RGB",
                    "width": w if k % 97 else 300, "height": h if k % 97 else 300,
                    "scores": {"sharpness": float(rng.gamma(2, 150)), "brightness": float(rng.uniform(0.1, 0.9)),
                               "entropy": float(rng.uniform(3, 7.5))},
                    "phash": f"{int(codes[k]):016x}", "dhash": f"{int(codes[k]):016x}", "scanned_at": 0.0,
                })  # fmt: skip
        m.set_meta("caption.trigger", '["ohwx"]')
        from curate.stages.user_captions import refresh

        refresh(m)
        ds.filter()
        ds.dedupe(method="phash")
        ds.split(0.1)
        ds.bucket()


def request(url: str, path: str, body: dict | None = None) -> tuple[float, int, bytes]:
    u = urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    t = time.perf_counter()
    if body is None:
        c.request("GET", path + ("&" if "?" in path else "?") + u.query)
    else:
        c.request("POST", path + "?" + u.query, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    return time.perf_counter() - t, r.status, data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    args = ap.parse_args()
    from curate.review.server import running

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        t = time.perf_counter()
        build(root, args.images)
        print(
            json.dumps({"case": "build", "images": args.images, "seconds": round(time.perf_counter() - t, 2)})
        )
        t = time.perf_counter()
        with running(root) as url:
            print(json.dumps({"case": "start", "seconds": round(time.perf_counter() - t, 2)}))
            for path in ("/dups", "/dups?page=20", "/rejects", "/captions", "/captions?page=100", "/split",
                         "/buckets"):  # fmt: skip
                cold, status, body = request(url, path)
                warm, *_ = request(url, path)
                assert status == 200, (path, status, body[:300])
                print(json.dumps({"case": f"GET {path}", "cold_s": round(cold, 3), "warm_s": round(warm, 3),
                                  "kib": len(body) // 1024}))  # fmt: skip
            for name, body in (
                ("filter-preview", {"thresholds": {"min_sharpness": 120}}),
                ("filter-apply", {"thresholds": {"min_sharpness": 120}}),
                ("undo", {}),
                ("bulk", {"op": "remove", "tag": "watermark"}),
                ("undo", {}),
                ("bulk", {"op": "prepend", "tag": "best quality"}),
            ):
                s, status, data = request(url, f"/api/{name}", body)
                msg = json.loads(data)
                assert status == 200, msg
                print(json.dumps({"case": f"POST {name}", "seconds": round(s, 3),
                                  "message": msg.get("message", msg.get("reject"))}))  # fmt: skip


if __name__ == "__main__":
    main()
