"""`curate tag` end to end on the GPU (the command a user runs) vs the reference batch-1 onnxruntime loop.

For each WD v3 shape (random weights, real timm architecture, built in code as bench/tagger_speed.py does):
  baseline     per image: PIL open, reference preprocessing, onnxruntime session.run on a batch of 1
  model_only   the torch tagger on a uint8 batch already on the GPU (no decode, no copies): the ceiling
  decode_only  the nvJPEG feed of `curate tag` alone (file reads, nvJPEG, placement), no model
  cli          `python -m curate tag DS --model F --force --json [flags]` in a fresh process: its own
               images_per_second (tagging, model load left out) and the wall time of the whole command
  library      stages.tag.tag_images in this process, model loaded and warm (the steady state)
One JSON line per case, appended to --out as it is measured.

    python bench/tag_cli_speed.py --images 2048 --shapes vit swinv2 --out $OUT/tag.jsonl   # GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tagger_speed import V3_SHAPES, build_v3, emit, machine, make_square_jpegs  # noqa: E402


def baseline(folder: Path, paths: list[Path], k: int) -> float:
    """Seconds per image of the reference loop (providers present, default session options)."""
    import onnxruntime as ort
    from PIL import Image

    from curate.models import wd14

    avail = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=providers)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: wd14.preprocess(Image.open(paths[0]).convert("RGB"), 448)[None]})
    t0 = time.perf_counter()
    for p in paths[:k]:
        sess.run(None, {name: wd14.preprocess(Image.open(p).convert("RGB"), 448)[None]})
    return (time.perf_counter() - t0) / k, sess.get_providers()


def model_only(tagger, batch: int, images: int = 1024) -> float:
    import torch

    x = torch.randint(0, 255, (batch, 448, 448, 3), dtype=torch.uint8, device=tagger.torch_device)
    for _ in range(2):
        tagger.predict(x)
    iters = max(3, images // batch)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prev = None
    for _ in range(iters):
        h = tagger.submit(x)
        if prev is not None:
            prev.result()
        prev = h
    prev.result()
    return batch * iters / (time.perf_counter() - t0)


def decode_only(tagger, recs, root: Path, batch: int) -> float:
    import torch

    from curate.stages.tag import _GpuFeed

    def once() -> float:
        t0 = time.perf_counter()
        feed = _GpuFeed(tagger, recs, root, batch, min(16, os.cpu_count() or 1))
        n = 0
        try:
            for r, _x, _, ev in feed:
                ev.synchronize()
                n += len(r)
        finally:
            feed.close()
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)

    once()  # nvJPEG start-up
    return once()


def cli(root: Path, folder: Path, flags: list[str], timeout: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "curate",
        "tag",
        str(root),
        "--model",
        str(folder),
        "--force",
        "--json",
        *flags,
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        return {"error": (res.stderr or res.stdout)[-400:], "wall_s": round(wall, 2)}
    run = json.loads(res.stdout)["run"]
    keep = ("inferred", "seconds", "load_seconds", "images_per_second", "runtime", "why", "batch_size", "decode",
            "decode_why", "gpu_decoded", "notices")  # fmt: skip
    return {"flags": " ".join(flags) or "(defaults)", **{k: run.get(k) for k in keep}, "failed": len(run["failed"]),
            "wall_s": round(wall, 2), "wall_img_per_s": round(run["inferred"] / wall, 1)}  # fmt: skip


def only_cli(args, out: Path, info: dict, root: Path, recs, paths) -> None:
    """CLI runs only (a second call): the scores of each run against the shape's first run, same files."""
    from curate import Dataset
    from curate.stages.tag import load_scores, model_key

    base_ips = {}
    if args.baseline_from:
        for line in Path(args.baseline_from).read_text().splitlines():
            d = json.loads(line)
            if d.get("case") == "baseline_onnxruntime_batch1_loop":
                base_ips[d["shape"]] = d["img_per_s"]
    folders: dict[str, Path] = {}
    first: dict[str, dict] = {}
    for item in args.only.split(";"):
        name, _, flags = item.partition(":")
        base = {"bench": "tag_cli", "shape": name, "arch": V3_SHAPES[name][0], "gpu": info["gpu"],
                "images": len(recs)}  # fmt: skip
        if name not in folders:
            folders[name] = build_v3(name, root.parent, onnx=not base_ips)[0]
            if name not in base_ips:
                t_base, providers = baseline(folders[name], paths, args.baseline_images)
                base_ips[name] = round(1 / t_base, 2)
                emit(out, {**base, "case": "baseline_onnxruntime_batch1_loop", "providers": providers,
                           "images": args.baseline_images, "img_per_s": base_ips[name]})  # fmt: skip
        r = cli(root, folders[name], flags.split(), timeout=240)
        with Dataset.open(root) as ds:
            scores = load_scores(ds.manifest, model_key(str(folders[name])))
        ref = first.setdefault(name, scores)
        worst = max(abs(p - ref[k].get(t, 0.0)) for k, sc in scores.items() for t, p in sc.items())
        ips = r.get("images_per_second") or 0
        emit(out, {**base, "case": "curate_tag_cli", **r, "baseline_img_per_s": base_ips[name],
                   "speedup_vs_baseline": round(ips / base_ips[name], 1),
                   "speedup_wall_vs_baseline": round(r.get("wall_img_per_s", 0) / base_ips[name], 1),
                   "worst_score_diff_vs_first_run": round(worst, 4)})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--shapes", nargs="+", default=["vit", "swinv2"], choices=sorted(V3_SHAPES))
    ap.add_argument("--baseline-images", type=int, default=16)
    ap.add_argument(
        "--cli", nargs="*", default=None, help="extra flag sets for the first shape, ';'-separated"
    )
    ap.add_argument(
        "--compile", action="store_true", help="also time torch.compile (first shape, at the end)"
    )
    ap.add_argument(
        "--baseline-from", help="JSONL of an earlier run: take its baseline figures, skip the loop"
    )
    ap.add_argument("--only", help="just these CLI runs, e.g. 'vit:;vit:--compile;swinv2:--compile'")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tag_cli_speed.jsonl"))
    args = ap.parse_args()
    out = Path(args.out)
    info = machine()
    import torch

    from curate import Dataset
    from curate.models import wd14
    from curate.models.wd_torch import TorchTagger
    from curate.stages.tag import TagConfig, tag_images

    tmp = Path(tempfile.mkdtemp(prefix="tagcli-"))
    root = tmp / "ds"
    root.mkdir()
    t0 = time.perf_counter()
    paths = make_square_jpegs(root, args.images, workers=os.cpu_count() or 4)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    with Dataset.open(root) as ds:
        ds.scan()
        recs = ds.kept()
    emit(out, {"bench": "tag_cli_setup", "images": len(recs), "side": 448, "quality": 90,
               "write_s": round(t_write, 2), "scan_s": round(time.perf_counter() - t0, 2), **info})  # fmt: skip
    if args.only:
        only_cli(args, out, info, root, recs, paths)
        return
    first_sets = [["--dtype", "bf16"], ["--batch-size", "256"], ["--decode", "cpu"]]
    compiled_folder = None
    for si, name in enumerate(args.shapes):
        base = {"bench": "tag_cli", "shape": name, "arch": V3_SHAPES[name][0], "gpu": info["gpu"],
                "images": len(recs)}  # fmt: skip
        folder, t_export = build_v3(name, tmp)
        t_base, providers = baseline(folder, paths, args.baseline_images)
        emit(out, {**base, "case": "baseline_onnxruntime_batch1_loop", "providers": providers,
                   "images": args.baseline_images, "img_per_s": round(1 / t_base, 2)})  # fmt: skip
        files = wd14.locate(str(folder))
        for dtype in ("auto", "bf16"):
            tg = TorchTagger(files, device="cuda", dtype=dtype)
            for bs in (tg.default_batch, 256):
                ips = model_only(tg, bs)
                emit(out, {**base, "case": "model_only_on_device", "dtype": tg.dtype, "batch": bs,
                           "img_per_s": round(ips, 1), "speedup_vs_baseline": round(ips * t_base, 1)})  # fmt: skip
            if dtype == "auto":
                ips = decode_only(tg, recs, root, tg.default_batch)
                emit(out, {**base, "case": "decode_only_nvjpeg_feed", "batch": tg.default_batch,
                           "img_per_s": round(ips, 1)})  # fmt: skip
            del tg
            torch.cuda.empty_cache()
        sets = [[]] + (first_sets if si == 0 else [["--dtype", "bf16"]])
        if si == 0 and args.cli:
            sets += [s.split() for s in args.cli]
        for flags in sets:
            r = cli(root, folder, flags, timeout=120)
            ips = r.get("images_per_second") or 0
            emit(out, {**base, "case": "curate_tag_cli", **r, "speedup_vs_baseline": round(ips * t_base, 1),
                       "speedup_wall_vs_baseline": round(r.get("wall_img_per_s", 0) * t_base, 1)})  # fmt: skip
        wd14._CACHE.clear()
        with Dataset.open(root) as ds:
            cfg = TagConfig(model=str(folder), device="cuda", force=True)
            tag_images(ds.manifest, cfg, records=recs[:512])  # load + warm-up
            for rep in range(2):
                t0 = time.perf_counter()
                run = tag_images(ds.manifest, cfg, records=recs)
                dt = time.perf_counter() - t0
                emit(out, {**base, "case": "library_tag_images_warm", "repeat": rep, "runtime": run.runtime,
                           "batch": run.batch_size, "decode": run.decode, "seconds": round(dt, 3),
                           "img_per_s": round(len(recs) / dt, 1), "speedup_vs_baseline": round(len(recs) / dt * t_base, 1),
                           "failed": len(run.failed)})  # fmt: skip
        wd14._CACHE.clear()
        torch.cuda.empty_cache()
        if si == 0:
            compiled_folder, compiled_base, compiled_t = folder, base, t_base
    if args.compile and compiled_folder is not None:
        base, t_base = compiled_base, compiled_t
        files = wd14.locate(str(compiled_folder))
        for dtype in ("auto", "bf16"):
            tg = TorchTagger(files, device="cuda", dtype=dtype, compile=True)
            x = torch.zeros((tg.default_batch, 448, 448, 3), dtype=torch.uint8, device="cuda")
            t0 = time.perf_counter()
            tg.predict(x)
            t_compile = time.perf_counter() - t0
            ips = model_only(tg, tg.default_batch)
            emit(out, {**base, "case": "model_only_on_device_compiled", "dtype": tg.dtype, "batch": tg.default_batch,
                       "compile_s": round(t_compile, 1), "img_per_s": round(ips, 1),
                       "speedup_vs_baseline": round(ips * t_base, 1)})  # fmt: skip
            del tg
            torch.cuda.empty_cache()
        r = cli(root, compiled_folder, ["--compile"], timeout=240)
        ips = r.get("images_per_second") or 0
        emit(out, {**base, "case": "curate_tag_cli", **r, "speedup_vs_baseline": round(ips * t_base, 1),
                   "speedup_wall_vs_baseline": round(r.get("wall_img_per_s", 0) * t_base, 1)})  # fmt: skip


if __name__ == "__main__":
    main()
