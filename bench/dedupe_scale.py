"""Timed scan + `dedupe --method auto` on N photo-like images, and the candidate search's cost against N.

The images are mosaics of random crops of the bundled real photos (curate.eval.source_photos), each tile at
its own scale and hue, at several sizes (512-1600 px long side, JPEG and PNG); one in five is followed by a
scraper copy (mirror, crop, letterbox, caption bar, overlay, recompress, rotation, flip+crop, border).
Distinct mosaics that share a tile are realistic hard negatives.

    python bench/dedupe_scale.py --n 5000 --curve 1000 2000 5000 --replicate 10000 20000 50000

The candidate-search curve times multi-crop pHash + ORB vote candidates on the first N images of the scanned
set, then on 10k-50k images made by replicating the 5k set's features with a per-replica XOR mask (distances
inside a replica unchanged, across replicas random), and fits time = a * N^b.
Writes bench/results/dedupe_scale_5k.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench._common import RESULTS, machine_info  # noqa: E402

KINDS = ["mirror", "crop25", "letterbox", "meme", "overlay", "recompress", "rotate", "flip_crop", "border"]
SIDES = [512, 768, 1024, 1280, 1600]
ASPECTS = [(4, 3), (3, 2), (1, 1), (16, 9), (3, 4)]


def mosaic(photos: list[np.ndarray], rng: np.random.Generator) -> Image.Image:
    """A distinct photo-like image: a grid of random crops of real photos, each at its own scale and colour."""
    side = int(rng.choice(SIDES))
    aw, ah = ASPECTS[int(rng.integers(len(ASPECTS)))]
    w, h = (side, side * ah // aw) if aw >= ah else (side * aw // ah, side)
    cols, rows = int(rng.integers(2, 4)), int(rng.integers(1, 3))
    out = np.zeros((h, w, 3), np.uint8)
    xs = np.linspace(0, w, cols + 1).astype(int)
    ys = np.linspace(0, h, rows + 1).astype(int)
    for y0, y1 in zip(ys[:-1], ys[1:], strict=True):
        for x0, x1 in zip(xs[:-1], xs[1:], strict=True):
            src = photos[int(rng.integers(len(photos)))]
            sh, sw = src.shape[:2]
            f = rng.uniform(0.25, 0.8)
            cw, ch = max(16, int(sw * f)), max(16, int(sh * f))
            cx, cy = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
            tile = np.asarray(Image.fromarray(src[cy : cy + ch, cx : cx + cw]).resize((x1 - x0, y1 - y0)))
            tile = tile[..., rng.permutation(3)] * rng.uniform(0.7, 1.15, 3)  # its own colours
            out[y0:y1, x0:x1] = np.clip(tile[:, ::-1] if rng.random() < 0.5 else tile, 0, 255)
    return Image.fromarray(out)


_PHOTOS: list[np.ndarray] = []


def _make(job: tuple[str, int, int, int]) -> tuple[str, str] | None:
    """Write image k (and its scraper copy when it has one); returns (copy, original) or None."""
    from curate.eval import source_photos, transform

    root, k, seed, with_copy = job
    if not _PHOTOS:
        _PHOTOS.extend(np.asarray(Image.open(p).convert("RGB")) for _, p in sorted(source_photos().items()))
    rng = np.random.default_rng((seed, k))
    img = mosaic(_PHOTOS, rng)
    ext = ".png" if k % 20 == 3 else ".jpg"
    name = f"{k // 1000:03d}/{k:06d}{ext}"
    (Path(root) / name).parent.mkdir(parents=True, exist_ok=True)
    kw = {"compress_level": 1} if ext == ".png" else {"quality": int(rng.integers(80, 96))}
    img.save(Path(root) / name, **kw)
    if not with_copy:
        return None
    kind = KINDS[(k // 5) % len(KINDS)]
    cname = f"{k // 1000:03d}/{k:06d}_{kind}.jpg"
    transform(img, kind, seed=k).save(Path(root) / cname, quality=30 if kind == "recompress" else 85)
    return cname, name


def build(root: Path, n: int, seed: int = 0, workers: int = 2) -> dict[str, str]:
    """Write n images under root (one in five originals followed by a copy); returns copy -> original."""
    from multiprocessing import Pool

    root.mkdir(parents=True, exist_ok=True)
    jobs, made, k = [], 0, 0
    while made < n:
        with_copy = made + 1 < n and k % 4 == 3  # 1 copy per 5 images
        jobs.append((str(root), k, seed, with_copy))
        made += 1 + with_copy
        k += 1
    with Pool(workers) as pool:
        return dict(x for x in pool.imap_unordered(_make, jobs, chunksize=16) if x)


def _cpu() -> float:
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _rss() -> dict[str, float]:
    return {
        "max_rss_mib_main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "max_rss_mib_workers": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def candidate_time(codes: np.ndarray, descs: list, mdescs: list) -> dict:
    from curate.stages.local_match import multicrop_candidates, vote_candidates

    t, c = time.perf_counter(), time.process_time()
    mc = multicrop_candidates(codes)
    t1 = time.perf_counter()
    votes, kind = vote_candidates(descs, mdescs)
    t2, c2 = time.perf_counter(), time.process_time()
    return {
        "images": len(codes),
        "multicrop_seconds": round(t1 - t, 2),
        "votes_seconds": round(t2 - t1, 2),
        "seconds": round(t2 - t, 2),
        "cpu_seconds": round(c2 - c, 2),
        "pairs_multicrop": len(mc),
        "pairs_votes": len(votes),
        "index": kind,
        "max_rss_mib": _rss()["max_rss_mib_main"],
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def fit(points: list[dict], key: str = "cpu_seconds") -> dict:
    n = np.array([p["images"] for p in points], float)
    t = np.array([max(p[key], 1e-3) for p in points], float)
    b, log_a = np.polyfit(np.log(n), np.log(t), 1)
    return {
        "exponent": round(float(b), 3),
        "a": float(np.exp(log_a)),
        "predicted_50k_seconds": round(float(np.exp(log_a) * 50_000**b), 1),
        "on": key,
    }


def timed(
    root: Path, out: dict, planted: dict[str, str], scan: bool = True, groups_out: Path | None = None
) -> tuple[list, dict]:
    """Scan + dedupe auto on the set, timed; fills ``out``; returns the records and their light features."""
    from curate import Dataset
    from curate.stages import features as F

    with Dataset.open(root) as ds:
        if scan:
            t, c = time.perf_counter(), _cpu()
            ds.scan()
            out["scan"] = {"seconds": round(time.perf_counter() - t, 1), "cpu_seconds": round(_cpu() - c, 1)}
            out["scan"].update(_rss())
            out["uptime_after_scan"] = _uptime()
        t, c = time.perf_counter(), _cpu()
        res = ds.dedupe(method="auto")
        out["dedupe"] = {
            "seconds": round(time.perf_counter() - t, 1),
            "cpu_seconds": round(_cpu() - c, 1),
            "stats": res.stats,
        }
        out["dedupe"].update(_rss())
        out["uptime_after_dedupe"] = _uptime()
        group_of = {p: k for k, g in enumerate(res.groups) for p in g.members}
        found = sum(1 for c_, o in planted.items() if c_ in group_of and group_of.get(o) == group_of[c_])
        per_kind: dict[str, list[int]] = {}
        for c_, o in planted.items():
            kind = Path(c_).stem.split("_", 1)[1]
            per_kind.setdefault(kind, [0, 0])
            per_kind[kind][1] += 1
            per_kind[kind][0] += int(c_ in group_of and group_of.get(o) == group_of[c_])
        false_groups = sum(1 for g in res.groups if len({planted.get(p, p) for p in g.members}) > 1)
        digest = hashlib.sha256(json.dumps([[g.keeper, g.members] for g in res.groups]).encode()).hexdigest()
        if groups_out is not None:  # keeper and members of every group, to compare two runs
            groups_out.write_text(json.dumps([[g.keeper, g.members] for g in res.groups]) + "\n")
        out["quality"] = {
            "copies_found": found,
            "recall": round(found / max(1, len(planted)), 4),
            "recall_per_kind": {k: round(a / b, 3) for k, (a, b) in sorted(per_kind.items())},
            "groups": len(res.groups),
            "groups_joining_distinct_images": false_groups,
            "groups_digest": digest[:16],
        }
        records = sorted(ds.manifest.images(), key=lambda r: r.path)
        light = F.load_light(ds.manifest, [r.sha256 for r in records])
    return records, light


def run(args) -> dict:
    from curate.stages import features as F

    root = Path(args.root or tempfile.mkdtemp()) / "scale"
    t = time.perf_counter()
    if not (root.parent / "planted.json").exists():
        planted = build(root, args.n)
        (root.parent / "planted.json").write_text(json.dumps(planted))
    planted = json.loads((root.parent / "planted.json").read_text())
    build_s = time.perf_counter() - t
    if args.build_only:
        return {"build_seconds": round(build_s, 1)}
    out: dict = {"images": args.n, "planted_copies": len(planted), "build_seconds": round(build_s, 1)}
    out["uptime_before"] = _uptime()
    if args.curve_only:  # features of an already scanned set, read only (a timed run may hold the lock)
        from curate.manifest import Manifest

        man = Manifest(root, root / ".curate" / "manifest.db", create=False, write=False)
        records = sorted(man.images(), key=lambda r: r.path)
        light = F.load_light(man, [r.sha256 for r in records])
        man.close()
    else:
        records, light = timed(root, out, planted, scan=not args.no_scan, groups_out=args.groups_out)
    recs = [r for r in records if r.sha256 in light]
    codes = np.stack([light[r.sha256].codes for r in recs])
    descs = [light[r.sha256].desc for r in recs]
    mdescs = [light[r.sha256].mdesc for r in recs]
    curve = []
    for n in args.curve:
        n = min(n, len(recs))
        curve.append(candidate_time(codes[:n], descs[:n], mdescs[:n]))
        print("candidates", curve[-1], flush=True)
    out["candidate_curve"] = curve
    rep = []
    rng = np.random.default_rng(1)
    for n in args.replicate:
        reps = -(-n // len(recs))
        cs, ds_, ms = [], [], []
        for r in range(reps):
            cmask = np.uint64(0) if r == 0 else np.uint64(int(rng.integers(0, 2**63)))
            dmask = np.zeros(32, np.uint8) if r == 0 else rng.integers(0, 256, 32, dtype=np.uint8)
            cs.append(codes ^ cmask)
            ds_ += [d ^ dmask for d in descs]
            ms += [m ^ dmask for m in mdescs]
        cs_ = np.concatenate(cs)[:n]
        rep.append(candidate_time(cs_, ds_[:n], ms[:n]))
        print("replicated", rep[-1], flush=True)
    out["candidate_curve_replicated"] = rep
    pts = curve + rep
    if len(pts) >= 2:
        out["candidate_fit"] = fit(pts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--root", help="reuse a built/scanned set here")
    ap.add_argument("--curve", type=int, nargs="*", default=[1000, 2000, 5000])
    ap.add_argument("--replicate", type=int, nargs="*", default=[10_000, 20_000, 50_000])
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--no-scan", action="store_true", help="time only the dedupe of a scanned set")
    ap.add_argument("--curve-only", action="store_true", help="skip the timed dedupe")
    ap.add_argument("--groups-out", type=Path, help="write every group's keeper and members here (JSON)")
    ap.add_argument("--out", type=Path, default=RESULTS / "dedupe_scale_5k.json")
    args = ap.parse_args()
    res = {"machine": machine_info(), "scale": run(args)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["scale"], indent=1))


if __name__ == "__main__":
    main()
