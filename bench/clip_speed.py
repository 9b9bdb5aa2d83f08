"""End-to-end CLIP embedding speed (file read + JPEG decode + preprocessing + ViT) on 512-1024 px JPEGs.

Random-init open_clip ViT-B-32 (same cost as the trained one), saved as a local folder and loaded through
curate's real loader. Cases, measured in the same run on the same files:
  - curate cpu-decode: encode_paths (DataLoader workers, JPEG draft decode, model's resize+crop -> uint8,
    pinned memory, normalise on GPU, bf16)
  - curate gpu-decode: encode_paths with workers that only read bytes; nvJPEG batched decode and
    antialiased resize + centre crop on the GPU in a background thread, overlapping the model
  - baseline: the usual open_clip recipe: DataLoader workers, PIL full decode + open_clip's preprocess
    transform (float tensors), same batch size, same model/dtype
  - decode-only (curate's loader without the model) and model-only (random uint8 batches on the device)
  - agreement: cosine between curate-pipeline and baseline embeddings of the same images

    python bench/clip_speed.py --n 12000 --workers 16 --batch-size 512   # ~2-3 min on one H100
Prints one JSON line per case and appends them to bench/results/clip_speed.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _make_jpeg(args: tuple[str, int]) -> None:
    path, seed = args
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(512, 1025, size=2))
    # Photo-like content: smooth low-frequency colour field + mid-frequency detail + mild noise.
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC
    )
    mid = Image.fromarray(rng.integers(0, 256, (h // 16, w // 16), dtype=np.uint8)).resize(
        (w, h), Image.Resampling.BILINEAR
    )
    arr = np.asarray(low, np.float32) * 0.8 + np.asarray(mid, np.float32)[..., None] * 0.2
    arr += rng.normal(0, 6, arr.shape).astype(np.float32)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)


def make_jpegs(folder: Path, n: int, workers: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"{k:06d}.jpg") for k in range(n)]
    todo = [(p, k) for k, p in enumerate(paths) if not os.path.exists(p)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_make_jpeg, todo, chunksize=64))
    return paths


class _Baseline:
    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, k):
        return self.preprocess(Image.open(self.paths[k]).convert("RGB"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--gpu-decode", choices=["auto", "on"], default="auto",
                    help="on: run the byte-worker decode path even on a CPU model (smoke test)")  # fmt: skip
    ap.add_argument("--cpu-share", type=float, nargs="*", default=[0.2, 0.35],
                    help="extra gpu-decode cases where the workers decode this share of the JPEGs")  # fmt: skip
    ap.add_argument("--dir", default=None, help="where to write the JPEGs (default: a temp folder)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "clip_speed.jsonl"))
    args = ap.parse_args()

    import open_clip
    import torch
    from torch.utils.data import DataLoader

    from curate.models.clip import load_clip, save_local_model
    from curate.stages.embed import encode_paths

    root = Path(args.dir or tempfile.mkdtemp(prefix="clipspeed-"))
    t0 = time.perf_counter()
    paths = make_jpegs(root / "jpegs", args.n, args.workers)
    gen_s = time.perf_counter() - t0
    mb = sum(os.path.getsize(p) for p in paths) / 1e6

    torch.manual_seed(0)
    cfg = open_clip.get_model_config(args.model)
    net = open_clip.create_model(args.model, pretrained=None)
    save_local_model(net, cfg, root / "model", name=f"{args.model}-random")
    del net
    cm = load_clip(str(root / "model"), None, args.device)
    dev = cm.device
    env = {
        "device": torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "batch_size": args.batch_size,
        "model": args.model,
        "dtype": str(cm.dtype),
        "n": args.n,
        "jpeg_mb": round(mb, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def emit(d):
        d = {**d, **env}
        print(json.dumps(d), flush=True)
        with out.open("a") as fh:
            fh.write(json.dumps(d) + "\n")

    emit({"case": "generate-jpegs", "seconds": round(gen_s, 1)})
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)

    # model-only upper bound
    x = torch.randint(0, 256, (args.batch_size, 3, cm.image_size, cm.image_size), dtype=torch.uint8)
    if dev.startswith("cuda"):
        x = x.pin_memory()
    for _ in range(3):
        cm.encode(x)
    sync()
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        cm.encode(x)
    sync()
    emit(
        {
            "case": "model-only (uint8 batch -> embeddings)",
            "img_s": round(reps * args.batch_size / (time.perf_counter() - t0)),
        }
    )

    # decode-only: curate's loader, no model (CPU: workers decode + crop; GPU: workers read bytes, nvJPEG)
    from curate.stages.embed import _resolve_gpu_decode, crop_batches

    gpu_dev = _resolve_gpu_decode(None if args.gpu_decode == "auto" else True, [cm])
    modes = [("cpu-decode", None, 0.0)]
    if gpu_dev:  # gpu-decode alone, and with a share of the JPEGs decoded by the (mostly idle) workers
        modes += [("gpu-decode", gpu_dev, 0.0)] + [
            (f"gpu-decode cpu-share {s}", gpu_dev, s) for s in args.cpu_share
        ]
    for label, ddev, share in modes[:2]:
        sync()
        t0 = time.perf_counter()
        n = 0
        for idx, _ok, _crops in crop_batches(paths, [cm.preprocess_spec], batch_size=args.batch_size,
                                            workers=args.workers, decode_device=ddev, pin=dev != "cpu", cpu_share=share):  # fmt: skip
            n += len(idx)
        sync()
        emit({"case": f"decode-only {label} (curate loader)", "img_s": round(n / (time.perf_counter() - t0))})

    # curate end to end, twice per decode path (the first includes worker start-up)
    embs = {}
    for label, ddev, share in modes:
        for rep in range(2 if share == 0 else 1):
            sync()
            t0 = time.perf_counter()
            ok, (emb,) = encode_paths(paths, [cm], batch_size=args.batch_size, workers=args.workers,
                                      gpu_decode=ddev is not None, cpu_share=share)  # fmt: skip
            sync()
            secs = time.perf_counter() - t0
            emit({"case": f"curate end-to-end {label} (run {rep + 1})", "img_s": round(args.n / secs),
                  "seconds": round(secs, 2), "ok": int(ok.sum())})  # fmt: skip
        embs.setdefault(label.split(" cpu-share")[0], emb)

    # baseline: open_clip's own transform on full decodes
    preprocess = open_clip.image_transform(cm.image_size, is_train=False, mean=cm.mean, std=cm.std,
                                           interpolation=cm.interpolation, resize_mode=cm.resize_mode)  # fmt: skip
    loader = DataLoader(_Baseline(paths, preprocess), batch_size=args.batch_size, num_workers=args.workers,
                        pin_memory=True, prefetch_factor=4)  # fmt: skip
    sync()
    t0 = time.perf_counter()
    base = []
    with torch.inference_mode():
        for b in loader:
            e = cm.model.encode_image(b.to(dev, non_blocking=True).to(cm.dtype))
            base.append(torch.nn.functional.normalize(e.float(), dim=-1).cpu())
    sync()
    secs = time.perf_counter() - t0
    base_emb = torch.cat(base).numpy()
    emit(
        {
            "case": "baseline open_clip transform + DataLoader",
            "img_s": round(args.n / secs),
            "seconds": round(secs, 2),
        }
    )
    for label, emb in embs.items():
        cos = (emb * base_emb).sum(1)
        emit({"case": f"agreement curate {label} vs baseline embeddings", "cos_min": round(float(cos.min()), 4),
              "cos_mean": round(float(cos.mean()), 5)})  # fmt: skip
    if len(embs) == 2:
        cos = (embs["cpu-decode"] * embs["gpu-decode"]).sum(1)
        emit({"case": "agreement curate gpu-decode vs cpu-decode", "cos_min": round(float(cos.min()), 4),
              "cos_mean": round(float(cos.mean()), 5)})  # fmt: skip


if __name__ == "__main__":
    main()
