"""Scan throughput: curate's scan against imagededup's PHash encoder and a plain PIL decode loop.

    python bench/scan_speed.py                 # 2,000 JPEGs in /tmp/curate-bench, 2 rounds
    python bench/scan_speed.py --n 200 --rounds 2 --no-write   # quick look

The image set is generated once (seeded, deterministic, not timed) and reused while its parameters
match. Every measurement runs in a fresh child process, so no case inherits another's imports or
warm state; cases are interleaved round by round and the page cache is warmed (every file read)
before each round, so disk speed is not measured. One JSON line per case; the summary (machine info,
per-case best and median, ratios against the named baselines) goes to bench/results/scan_speed.json.

Baselines, all on the same files and the same cores:
  raw_decode_pool  ``Image.open(p).convert("RGB")`` over a process pool of ``--workers`` (all cores):
                   the fair "raw decode" baseline, since curate's scan also uses every core.
  raw_decode_1p    the same loop in one process (reported for reference).
  imagededup_phash ``PHash().encode_images(image_dir=...)`` (its default: all cores).
Reference points, no goal: curate_scan_draft256 (scan with ScanConfig(draft_size=256), what a smaller
draft would buy; score_drift says how much stored numbers would move) and raw_draft8_pool (JPEG decode
at libjpeg's smallest 1/8 scale over the pool: the ceiling for any scanner that reads the pixels).
Goals: curate >= 5x imagededup_phash, curate >= 0.7x raw_decode_pool.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import emit, machine_info, run_json_child, summarize, write_results  # noqa: E402

GEN_VERSION = 1  # bump when the generator changes, so an old set is regenerated
MIN_SIDE, MAX_SIDE = 256, 3000
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
GREY_PHOTOS = ("camera", "coins", "moon")
TEXTURES = ("grass", "gravel", "brick")

# -- data ------------------------------------------------------------------------------------------


def _image_size(rng) -> tuple[int, int]:
    """Short side uniform in [256, 3000]; long side uniform in [short, min(3000, 2.5 * short)]."""
    short = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    long_ = int(rng.integers(short, min(MAX_SIDE, int(2.5 * short)) + 1))
    return (long_, short) if rng.random() < 0.6 else (short, long_)  # 60 % landscape


_SOURCES: dict[str, Any] = {}


def _sources() -> dict[str, Any]:
    """scikit-image's bundled public-domain sample photos and textures, loaded once per process."""
    if not _SOURCES:
        import numpy as np
        from PIL import Image
        from skimage import data

        for name in PHOTOS:
            _SOURCES[name] = Image.fromarray(getattr(data, name)()).convert("RGB")
        for name in GREY_PHOTOS:
            _SOURCES[name] = Image.fromarray(getattr(data, name)()).convert("RGB")
        for name in TEXTURES:
            _SOURCES["tex:" + name] = Image.fromarray(np.asarray(getattr(data, name)(), np.uint8))
    return _SOURCES


def _tile(tile, size: tuple[int, int], rng):
    """Cover ``size`` with copies of ``tile`` starting at a random phase."""
    from PIL import Image

    out = Image.new(tile.mode, size)
    tw, th = tile.size
    ox, oy = int(rng.integers(0, tw)), int(rng.integers(0, th))
    for y in range(-oy, size[1], th):
        for x in range(-ox, size[0], tw):
            out.paste(tile, (x, y))
    return out


def _smooth_noise(size: tuple[int, int], rng):
    """Multi-octave value noise: small random grids upsampled bicubically and averaged."""
    import numpy as np
    from PIL import Image

    w, h = size
    acc = None
    weights = (0.5, 0.3, 0.2)
    for cells, wt in zip((3, 12, 48), weights, strict=True):
        gw, gh = (cells, max(2, round(cells * h / w))) if w >= h else (max(2, round(cells * w / h)), cells)
        grid = rng.integers(0, 256, (gh, gw, 3), dtype=np.uint8)
        layer = Image.fromarray(grid).resize(size, Image.Resampling.BICUBIC)
        acc = layer if acc is None else Image.blend(acc, layer, wt / (wt + 0.5))
    return acc


def _draw_shapes(img, rng, count: int) -> None:
    from PIL import ImageDraw

    w, h = img.size
    draw = ImageDraw.Draw(img)
    for _ in range(count):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1 = x0 + int(rng.integers(w // 20 + 1, w // 2 + 2))
        y1 = y0 + int(rng.integers(h // 20 + 1, h // 2 + 2))
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == 2:
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, max(3, w // 60))))


def make_image(index: int, seed: int):
    """One deterministic natural-looking test image and its JPEG save options."""
    import numpy as np
    from PIL import Image, ImageChops, ImageFilter

    rng = np.random.default_rng([seed, index])
    size = _image_size(rng)
    src = _sources()
    if rng.random() < 0.4:  # a sample photo, random crop, resized to the target size
        photo = src[[*PHOTOS, *GREY_PHOTOS][int(rng.integers(0, len(PHOTOS) + len(GREY_PHOTOS)))]]
        pw, ph = photo.size
        aspect = size[0] / size[1]
        cw = min(pw, int(ph * aspect))
        ch = min(ph, int(cw / aspect))
        cx, cy = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
        img = photo.crop((cx, cy, cx + cw, cy + ch)).resize(size, Image.Resampling.BICUBIC)
        _draw_shapes(img, rng, int(rng.integers(0, 4)))
    else:  # smooth noise + gradient + shapes
        img = _smooth_noise(size, rng)
        grad = Image.linear_gradient("L").resize(size).rotate(float(rng.uniform(0, 360)))
        tint = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
        img = Image.composite(tint, img, grad.point(lambda v: v // 2))
        _draw_shapes(img, rng, int(rng.integers(4, 30)))
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 2.0))))
    # Fine detail as in real photos: a scaled texture blended in, then sensor-like grain.
    tex = src["tex:" + TEXTURES[int(rng.integers(0, len(TEXTURES)))]]
    scale = float(rng.uniform(0.5, 2.0))
    tex = tex.resize((max(16, int(tex.width * scale)), max(16, int(tex.height * scale)))).convert("RGB")
    img = Image.blend(img, _tile(tex, size, rng), float(rng.uniform(0.08, 0.3)))
    sigma = float(rng.uniform(2.0, 8.0))
    grain = np.clip(128 + rng.normal(0, sigma, (256, 256, 3)), 0, 255).astype(np.uint8)
    img = ImageChops.add(img, _tile(Image.fromarray(grain), size, rng), scale=1.0, offset=-128)
    opts = {
        "quality": int(rng.integers(75, 96)),
        "progressive": bool(rng.random() < 0.15),
        "subsampling": 0 if rng.random() < 0.2 else 2,  # 4:4:4 or 4:2:0
    }
    return img, opts


def _write_one(job: tuple[int, int, str]) -> tuple[int, int]:
    index, seed, folder = job
    img, opts = make_image(index, seed)
    path = Path(folder) / f"img_{index:05d}.jpg"
    img.save(path, "JPEG", **opts)
    return img.width * img.height, path.stat().st_size


def ensure_dataset(folder: Path, n: int, seed: int, workers: int) -> dict[str, Any]:
    """Generate ``n`` JPEGs into ``folder`` unless a set with the same parameters is already there."""
    params = {"n": n, "seed": seed, "gen_version": GEN_VERSION, "min_side": MIN_SIDE, "max_side": MAX_SIDE}
    stamp = folder / ".params.json"
    if stamp.exists():
        info = json.loads(stamp.read_text())
        if info.get("params") == params and len(list(folder.glob("img_*.jpg"))) == n:
            return info
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    with Pool(workers) as pool:
        stats = pool.map(_write_one, [(i, seed, str(folder)) for i in range(n)], chunksize=4)
    pixels = sum(p for p, _ in stats)
    nbytes = sum(b for _, b in stats)
    info = {
        "params": params,
        "files": n,
        "megapixels_total": round(pixels / 1e6, 1),
        "megapixels_mean": round(pixels / 1e6 / n, 2),
        "bytes_total": nbytes,
        "bits_per_pixel": round(8 * nbytes / pixels, 2),
        "generate_s": round(time.perf_counter() - t0, 1),
    }
    stamp.write_text(json.dumps(info, indent=2))
    return info


def warm_cache(folder: Path) -> int:
    """Read every file once so the measurements see the page cache, not the disk."""
    total = 0
    for p in sorted(folder.glob("img_*.jpg")):
        total += len(p.read_bytes())
    return total


# -- cases (each runs in a fresh child process; returns seconds and a sanity count) ------------------


def _decode(path: str) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").width


def case_curate_scan(folder: Path, workers: int, draft_size: int = 512) -> tuple[float, dict[str, Any]]:
    from curate.config import ScanConfig
    from curate.manifest import Manifest
    from curate.stages.scan import scan

    tmp = Path(tempfile.mkdtemp(prefix="curate-bench-manifest-"))
    try:
        manifest = Manifest(folder, tmp / "manifest.db")  # fresh manifest: every file is new
        t0 = time.perf_counter()
        res = scan(manifest, ScanConfig(workers=workers, draft_size=draft_size))
        dt = time.perf_counter() - t0
        n_hashed = manifest.conn.execute("SELECT COUNT(*) FROM images WHERE phash IS NOT NULL").fetchone()[0]
        manifest.close()
    finally:
        shutil.rmtree(tmp)
    return dt, {"decoded": res.decoded, "with_phash": n_hashed, "errors": res.errors}


def case_imagededup_phash(folder: Path, workers: int) -> tuple[float, dict[str, Any]]:
    import logging

    from imagededup.methods import PHash

    logging.disable(logging.WARNING)
    hasher = PHash(verbose=False)
    t0 = time.perf_counter()
    enc = hasher.encode_images(image_dir=str(folder), num_enc_workers=workers)
    dt = time.perf_counter() - t0
    return dt, {"encoded": sum(1 for v in enc.values() if v)}


def _decode_draft8(path: str) -> int:
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (im.width // 8, im.height // 8))  # libjpeg's smallest scale, 1/8
        return im.convert("RGB").width


def case_raw_draft8_pool(folder: Path, workers: int) -> tuple[float, dict[str, Any]]:
    """The floor for any scanner that reads JPEG pixels: entropy decoding at 1/8 scale, no other work."""
    paths = [str(p) for p in sorted(folder.glob("img_*.jpg"))]
    t0 = time.perf_counter()
    with Pool(workers) as pool:
        done = sum(1 for w in pool.imap_unordered(_decode_draft8, paths, chunksize=4) if w)
    return time.perf_counter() - t0, {"decoded": done}


def case_raw_decode_1p(folder: Path, workers: int) -> tuple[float, dict[str, Any]]:
    paths = [str(p) for p in sorted(folder.glob("img_*.jpg"))]
    t0 = time.perf_counter()
    done = sum(1 for p in paths if _decode(p))
    return time.perf_counter() - t0, {"decoded": done}


def case_raw_decode_pool(folder: Path, workers: int) -> tuple[float, dict[str, Any]]:
    paths = [str(p) for p in sorted(folder.glob("img_*.jpg"))]
    t0 = time.perf_counter()
    with Pool(workers) as pool:
        done = sum(1 for w in pool.imap_unordered(_decode, paths, chunksize=4) if w)
    return time.perf_counter() - t0, {"decoded": done}


def case_curate_scan_draft256(folder: Path, workers: int) -> tuple[float, dict[str, Any]]:
    """Not a default: what decoding JPEGs at a quarter of the default draft area would buy (see score_drift)."""
    return case_curate_scan(folder, workers, draft_size=256)


def score_drift(folder: Path, n: int, draft_size: int) -> dict[str, Any]:
    """How much stored scores and hashes would move if scan decoded JPEGs with a smaller draft size."""
    import numpy as np

    from curate.config import FilterConfig, ScanConfig
    from curate.stages.scan import analyse_bytes

    base_cfg, alt_cfg = ScanConfig(), ScanConfig(draft_size=draft_size)
    ph, dh, rel, absd = [], [], {}, {}
    flips = 0
    fc = FilterConfig()
    for p in sorted(folder.glob("img_*.jpg"))[:n]:
        data = p.read_bytes()
        a, b = analyse_bytes(data, base_cfg), analyse_bytes(data, alt_cfg)
        ph.append(bin(int(a["phash"], 16) ^ int(b["phash"], 16)).count("1"))
        dh.append(bin(int(a["dhash"], 16) ^ int(b["dhash"], 16)).count("1"))
        for k, v in a["scores"].items():
            w = b["scores"][k]
            absd.setdefault(k, []).append(abs(v - w))
            if k == "sharpness":
                rel.setdefault(k, []).append(abs(v - w) / max(abs(v), 1e-9))
        sa, sb = a["scores"]["sharpness"], b["scores"]["sharpness"]
        flips += (sa >= fc.min_sharpness) != (sb >= fc.min_sharpness)
    return {
        "images": len(ph),
        "draft_size": [base_cfg.draft_size, draft_size],
        "phash_bits_changed": {"mean": round(float(np.mean(ph)), 2), "max": int(np.max(ph))},
        "dhash_bits_changed": {"mean": round(float(np.mean(dh)), 2), "max": int(np.max(dh))},
        "sharpness_rel_change": {
            "median": round(float(np.median(rel["sharpness"])), 4),
            "max": round(float(np.max(rel["sharpness"])), 4),
        },
        "max_abs_change": {k: round(float(np.max(v)), 4) for k, v in absd.items()},
        "min_sharpness_filter_flips": int(flips),
    }


CASES = {
    "curate_scan": case_curate_scan,
    "curate_scan_draft256": case_curate_scan_draft256,
    "imagededup_phash": case_imagededup_phash,
    "raw_decode_pool": case_raw_decode_pool,
    "raw_decode_1p": case_raw_decode_1p,
    "raw_draft8_pool": case_raw_draft8_pool,
}


def run_child(case: str, folder: Path, workers: int, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", case, "--data", str(folder), "--workers", str(workers)]
    return run_json_child(cmd, timeout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/curate-bench/images"))
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--rounds", type=int, default=2, help="measurements per case (best and median kept)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="cores for every pooled case")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    ap.add_argument(
        "--drift", type=int, default=300, help="images for the draft-256 score-drift check; 0 skips"
    )
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results/scan_speed.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        dt, check = CASES[args.child](args.data, args.workers)
        print(json.dumps({"seconds": dt, **check}), flush=True)
        return

    data = ensure_dataset(args.data, args.n, args.seed, args.workers)
    emit({"case": "dataset", "path": str(args.data), **data})
    cases = [c for c in args.cases.split(",") if c]
    times: dict[str, list[float]] = {c: [] for c in cases}
    checks: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for rnd in range(args.rounds):
        for case in cases:
            if case in errors:
                continue
            warm_cache(args.data)
            res = run_child(case, args.data, args.workers, args.timeout)
            if "error" in res:
                errors[case] = res["error"]
                emit({"case": case, "round": rnd, "error": res["error"]})
                continue
            times[case].append(res.pop("seconds"))
            checks[case] = res
            emit({"case": case, "round": rnd, "seconds": round(times[case][-1], 3), **res})

    n = data["files"]
    summary: dict[str, Any] = {}
    for case in cases:
        if times[case]:
            summary[case] = {**summarize(times[case], n), "check": checks[case]}
        else:
            summary[case] = {"error": errors.get(case, "not run")}
        emit({"case": case, "images": n, **summary[case]})

    def ratio(a: str, b: str, key: str) -> float | None:
        if "error" in summary.get(a, {"error": 1}) or "error" in summary.get(b, {"error": 1}):
            return None
        return round(summary[a][key] / summary[b][key], 3)

    ratios = {}
    bases = (
        ("imagededup_phash", 5.0),
        ("raw_decode_pool", 0.7),
        ("raw_decode_1p", None),
        ("raw_draft8_pool", None),
    )
    for ours in ("curate_scan", "curate_scan_draft256"):
        for base, goal in bases:
            if ours not in summary or base not in summary:
                continue
            r_best = ratio(ours, base, "best_per_s")
            r_med = ratio(ours, base, "median_per_s")
            entry: dict[str, Any] = {"best": r_best, "median": r_med}
            if goal is not None and ours == "curate_scan":
                entry["goal"] = goal
                entry["met"] = None if r_med is None else bool(r_med >= goal)
            ratios[f"{ours}/{base}"] = entry
    emit({"case": "ratios", **ratios})
    drift = score_drift(args.data, args.drift, 256) if args.drift else None
    if drift:
        emit({"case": "score_drift_draft256", **drift})
    if not args.no_write:
        out = write_results(
            "scan_speed.json",
            {
                "benchmark": "scan_speed",
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "machine": machine_info(),
                "dataset": data,
                "workers": args.workers,
                "rounds": args.rounds,
                "notes": (
                    "images/s over the whole set, each measurement in a fresh process after a page-cache "
                    "warm-up; pool start-up is inside every pooled timing. The '>= 70 % of raw decode' goal is "
                    "judged against raw_decode_pool (same cores as curate's scan). Goals judged on the median."
                ),
                "cases": summary,
                "ratios": ratios,
                "score_drift_draft256": drift,
            },
        )
        emit({"case": "written", "path": str(out)})


if __name__ == "__main__":
    main()
