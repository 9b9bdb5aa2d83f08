"""Planted near-duplicate benchmark: precision / recall / F1 per transform for curate's pHash, dHash,
hash, CLIP and both, beside imagededup's methods on the same images.

Originals: public-domain scikit-image sample photos (+ Grace Hopper from matplotlib, public domain,
and scikit-learn's two sample photos, CC BY). Each original gets one copy per transform; a method's
predicted duplicate pairs are all pairs inside its groups (connected components, as dedupe removes
them), scored against the true pairs. Per transform the set is originals + that transform's copies;
"all" puts every copy in one set (families of 8, 28 true pairs each).

    python bench/planted_eval.py                                   # hash methods + imagededup
    python bench/planted_eval.py --clip-model /models/ViT-B-32     # + CLIP and both (folder or name)
    python bench/planted_eval.py --clip-model ViT-L-14 --clip-pretrained openai --device cuda

Writes bench/results/planted_eval.json (or --out) and prints one JSON line per (transform, method).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRANSFORMS = ["resize", "jpeg", "crop", "hflip", "color", "rotate", "text"]


def originals() -> dict[str, Image.Image]:
    import skimage.data as d

    out = {}
    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
             "retina", "camera", "moon", "page", "text", "coins", "brick", "grass", "gravel", "clock", "cell"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in names:
            a = getattr(d, n)()
            out[n] = Image.fromarray(a).convert("RGB")
        out["motorcycle"] = Image.fromarray(d.stereo_motorcycle()[0]).convert("RGB")
    import matplotlib

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if hopper.exists():
        out["grace_hopper"] = Image.open(hopper).convert("RGB")
    with contextlib.suppress(Exception):
        from sklearn.datasets import load_sample_images

        for name, a in zip(("china", "flower"), load_sample_images().images, strict=True):
            out[name] = Image.fromarray(a).convert("RGB")
    return out


def transform(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    if kind == "resize":
        s = rng.uniform(0.4, 0.7)
        return img.resize((max(16, round(w * s)), max(16, round(h * s))), Image.Resampling.LANCZOS)
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(25, 50)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "crop":
        f = rng.uniform(0.70, 0.95)
        cw, ch = round(w * f), round(h * f)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return img.crop((x0, y0, x0 + cw, y0 + ch))
    if kind == "hflip":
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if kind == "color":
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.75, 1.25))
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.integers(-12, 13))) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")
    if kind == "rotate":
        angle = float(rng.uniform(3, 10) * rng.choice([-1, 1]))
        r = img.rotate(angle, Image.Resampling.BICUBIC, expand=False)
        m = int(min(w, h) * np.sin(np.radians(abs(angle))))  # crop the black corners away
        return r.crop((m, m, w - m, h - m))
    if kind == "text":
        img = img.copy()
        draw = ImageDraw.Draw(img)
        size = max(12, h // 8)
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1
            font = ImageFont.load_default()
        for k in range(2):
            y = int(h * (0.2 + 0.5 * k))
            draw.text((w // 10, y), "SAMPLE  © stock", fill=(255, 255, 255), font=font, stroke_width=2,
                      stroke_fill=(0, 0, 0))  # fmt: skip
        return img
    raise ValueError(kind)


def write_set(folder: Path, origs: dict[str, Image.Image], kinds: list[str], seed: int) -> dict[str, str]:
    """Write originals + copies; return file name -> family (original name)."""
    folder.mkdir(parents=True)
    family = {}
    rng = np.random.default_rng(seed)
    for name, img in origs.items():
        img.save(folder / f"{name}.png")
        family[f"{name}.png"] = name
        for k in kinds:
            t = transform(img, k, rng)
            fn = f"{name}__{k}.jpg" if k == "jpeg" else f"{name}__{k}.png"
            if k == "jpeg":
                # keep the recompressed bytes as they are
                buf = io.BytesIO()
                t.save(buf, "JPEG", quality=95)
                (folder / fn).write_bytes(buf.getvalue())
            else:
                t.save(folder / fn)
            family[fn] = name
    return family


def true_pairs(family: dict[str, str]) -> set[tuple[str, str]]:
    by: dict[str, list[str]] = {}
    for f, fam in family.items():
        by.setdefault(fam, []).append(f)
    return {tuple(sorted(p)) for files in by.values() for p in combinations(files, 2)}  # type: ignore[misc]


def group_pairs(groups: list[list[str]]) -> set[tuple[str, str]]:
    return {tuple(sorted(p)) for g in groups for p in combinations(g, 2)}  # type: ignore[misc]


def components(names: list[str], edges: set[tuple[str, str]]) -> list[list[str]]:
    from curate.stages.dedupe import connected_groups

    ix = {n: k for k, n in enumerate(names)}
    i = np.array([ix[a] for a, _ in edges], np.int64)
    j = np.array([ix[b] for _, b in edges], np.int64)
    return [[names[m] for m in g] for g in connected_groups(len(names), i, j)]


def score(pred: set, truth: set) -> dict[str, float]:
    tp = len(pred & truth)
    p = tp / len(pred) if pred else 1.0
    r = tp / len(truth) if truth else 1.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f1, 4), "tp": tp,
            "fp": len(pred) - tp, "fn": len(truth) - tp}  # fmt: skip


def run_curate(folder: Path, method: str, clip: dict | None) -> list[list[str]]:
    from curate import Dataset

    with Dataset.open(folder) as ds:
        ds.scan()
        res = ds.dedupe(method=method, clip=clip)
        return [[m for m in g.members] for g in res.groups if g.method != "exact"]


def run_imagededup(folder: Path, method: str) -> set[tuple[str, str]]:
    from imagededup import methods

    enc = getattr(methods, method)()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if method == "CNN":
            dups = enc.find_duplicates(image_dir=str(folder))  # default min_similarity_threshold=0.9
        else:
            dups = enc.find_duplicates(image_dir=str(folder))  # default max_distance_threshold=10
    return {tuple(sorted((a, b))) for a, bs in dups.items() for b in bs}  # type: ignore[misc]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip-model", default=None, help="CLIP folder, hf-hub: id or open_clip name")
    ap.add_argument("--clip-pretrained", default=None)
    ap.add_argument("--clip-threshold", type=float, default=0.95)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "planted_eval.json"))
    args = ap.parse_args()

    origs = originals()
    methods = ["phash", "dhash", "hash"]
    clip = None
    if args.clip_model:
        clip = {"model": args.clip_model, "pretrained": args.clip_pretrained, "threshold": args.clip_threshold,
                "device": args.device}  # fmt: skip
        methods += ["clip", "both"]
    idd = []
    idd_errors = {}
    try:
        import imagededup

        idd = ["PHash", "DHash", "WHash", "AHash", "CNN"]
        idd_version = imagededup.__version__
    except ImportError as exc:
        idd_version = None
        idd_errors["import"] = str(exc)
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="planted-"))
    try:
        for case in [*TRANSFORMS, "all"]:
            kinds = TRANSFORMS if case == "all" else [case]
            folder = tmp / case
            family = write_set(folder, origs, kinds, args.seed + TRANSFORMS.index(kinds[0]) * (case != "all"))
            truth = true_pairs(family)
            names = sorted(family)
            for m in methods:
                t0 = time.perf_counter()
                groups = run_curate(folder, m, clip if m in ("clip", "both") else None)
                row = {"case": case, "method": f"curate:{m}", **score(group_pairs(groups), truth),
                       "images": len(names), "true_pairs": len(truth), "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
                print(json.dumps(row), flush=True)
                results.append(row)
            for m in idd:
                if m in idd_errors:
                    continue
                t0 = time.perf_counter()
                try:
                    edges = run_imagededup(folder, m)
                except Exception as exc:  # e.g. CNN weights cannot be downloaded offline
                    idd_errors[m] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                    print(json.dumps({"method": f"imagededup:{m}", "error": idd_errors[m]}), flush=True)
                    continue
                pred = group_pairs(components(names, edges))
                row = {"case": case, "method": f"imagededup:{m}", **score(pred, truth), "images": len(names),
                       "true_pairs": len(truth), "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
                print(json.dumps(row), flush=True)
                results.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import torch

    doc = {
        "originals": sorted(origs),
        "transforms": TRANSFORMS,
        "scoring": "pairs inside predicted groups (connected components) vs true pairs; per transform: "
        "originals + that transform's copies; all: every copy together",
        "curate_defaults": {
            "phash_threshold": 8,
            "dhash_threshold": 12,
            "clip_threshold": args.clip_threshold,
        },
        "imagededup": {
            "version": idd_version,
            "defaults": "hashing max_distance_threshold=10, CNN min_similarity_threshold=0.9",
            "errors": idd_errors,
        },  # fmt: skip
        "clip": clip or "not run: needs CLIP weights; rerun with --clip-model PATH where weights exist",
        "env": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "results": results,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
