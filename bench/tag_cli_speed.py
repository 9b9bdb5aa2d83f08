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
import re
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


def cli(root: Path, folder: Path, flags: list[str], timeout: float, log: Path | None = None) -> dict:
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
    import resource

    t0 = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        if log is not None:
            log.write_text(str(exc.stderr or ""))
        return {"flags": " ".join(flags) or "(defaults)", "error": f"timed out after {timeout:.0f} s",
                "wall_s": round(time.perf_counter() - t0, 2)}  # fmt: skip
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(
        resource.RUSAGE_CHILDREN
    )  # the CLI and the processes it waited for (compile workers)
    cpu_s = round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 1)
    if log is not None:  # stderr: TORCH_LOGS output (recompiles, graph breaks) when the caller set it
        log.write_text(res.stderr)
    if res.returncode != 0:
        return {"flags": " ".join(flags) or "(defaults)", "error": (res.stderr or res.stdout)[-400:],
                "wall_s": round(wall, 2)}  # fmt: skip
    run = json.loads(res.stdout)["run"]
    keep = ("inferred", "seconds", "load_seconds", "images_per_second", "runtime", "why", "batch_size", "decode",
            "decode_why", "gpu_decoded", "waits", "notices")  # fmt: skip
    m = re.search(r"compiled in ([0-9.]+) s", run.get("runtime") or "")
    return {"flags": " ".join(flags) or "(defaults)", **{k: run.get(k) for k in keep}, "failed": len(run["failed"]),
            "compile_s": float(m.group(1)) if m else 0.0, "wall_s": round(wall, 2), "cpu_s": cpu_s,
            "wall_img_per_s": round(run["inferred"] / wall, 1)}  # fmt: skip


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
    results: list[dict] = []
    logs = Path(args.logs) if args.logs else None
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    for n_case, item in enumerate(args.only.split(";")):
        item, _, limit = item.partition("@")  # "vit:--compile@120": that case's own time limit
        name, _, flags = item.partition(":")
        base = {"bench": "tag_cli", "shape": name, "arch": V3_SHAPES[name][0], "gpu": info["gpu"],
                "images": len(recs)}  # fmt: skip
        left = args.budget - (time.perf_counter() - args.t0) if args.budget else float("inf")
        timeout = min(float(limit or args.case_timeout), left - 5)
        if timeout < 20:
            emit(out, {**base, "case": "curate_tag_cli", "flags": flags or "(defaults)",
                       "skipped": f"{left:.0f} s of the --budget left"})  # fmt: skip
            continue
        if name not in folders:
            folders[name] = build_v3(name, root.parent, onnx=name not in base_ips)[0]
            if name not in base_ips:
                t_base, providers = baseline(folders[name], paths, args.baseline_images)
                base_ips[name] = round(1 / t_base, 2)
                emit(out, {**base, "case": "baseline_onnxruntime_batch1_loop", "providers": providers,
                           "images": args.baseline_images, "img_per_s": base_ips[name]})  # fmt: skip
        slug = re.sub(r"[^a-z0-9]+", "_", f"{name} {flags}".lower()).strip("_")
        log = logs / f"{n_case:02d}_{slug}.txt" if logs is not None else None
        r = cli(root, folders[name], flags.split(), timeout=timeout, log=log)
        worst = None
        if "error" not in r:
            with Dataset.open(root) as ds:
                scores = load_scores(ds.manifest, model_key(str(folders[name])))
            ref = first.setdefault(name, scores)
            worst = round(
                max(abs(p - ref[k].get(t, 0.0)) for k, sc in scores.items() for t, p in sc.items()), 4
            )
        ips = r.get("images_per_second") or 0
        row = {**base, "case": "curate_tag_cli", **r, "baseline_img_per_s": base_ips.get(name),
               "speedup_vs_baseline": round(ips / base_ips[name], 1) if base_ips.get(name) else None,
               "worst_score_diff_vs_first_run": worst}  # fmt: skip
        emit(out, row)
        results.append(row)
    for row in summary(results):
        emit(out, row)


def summary(rows: list[dict]) -> list[dict]:
    """Per shape: each flag set against the shape's first (default) run, and where compiling pays off: the
    images after which ``--compile``'s compile time is won back (compile_s / (1/eager - 1/compiled))."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        ok = [r for r in rows if r["shape"] == shape and r.get("images_per_second")]
        if not ok:
            continue
        ref = ok[0]
        cases = {}
        for r in ok:
            d = {"img_per_s": r["images_per_second"], "vs_first": round(r["images_per_second"] / ref["images_per_second"], 3),
                 "compile_s": r.get("compile_s", 0.0), "waits": r.get("waits"), "notices": r.get("notices")}  # fmt: skip
            same = " ".join(f for f in r["flags"].split() if f != "--compile") or "(defaults)"
            eager = next((e for e in ok if e["flags"] == same), None)  # the first run with those flags
            if "--compile" in r["flags"] and eager is not None:
                d["vs_eager"] = round(r["images_per_second"] / eager["images_per_second"], 3)
                gain = 1 / eager["images_per_second"] - 1 / r["images_per_second"]
                d["break_even_images"] = round(r.get("compile_s", 0.0) / gain) if gain > 0 else None
            key, k = r["flags"], 2
            while key in cases:  # the same flags again (a second --compile: inductor's cache is warm)
                key, k = f"{r['flags']} (run {k})", k + 1
            cases[key] = d
        out.append({"bench": "tag_cli_summary", "shape": shape, "first": ref["flags"], "cases": cases})
    return out


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
    ap.add_argument("--budget", type=float, default=0, help="seconds for the whole bench (0: no limit)")
    ap.add_argument(
        "--case-timeout", type=float, default=240, help="seconds per --only run (or NAME:FLAGS@S)"
    )
    ap.add_argument("--logs", help="folder for each --only run's stderr (set TORCH_LOGS to fill it)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tag_cli_speed.jsonl"))
    args = ap.parse_args()
    args.t0 = time.perf_counter()  # --budget counts from here: writing and scanning the images included
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
