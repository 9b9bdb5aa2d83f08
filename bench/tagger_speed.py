"""Tagger and captioner throughput: curate's pipelines vs the one-image-at-a-time loops of common scripts.

WD14 part: a random-weight torchvision ConvNeXt exported to ONNX with the WD14 layout (NHWC float32 0-255 BGR
input at 448x448, 10861-wide sigmoid head), once with a dynamic batch dim and once fixed to batch 1.
  baseline  = for each image: open, preprocess, session.run on a batch of 1 (kohya / webui style loop)
  curate    = stages.tag.tag_images (threaded decode ahead of batched runs), dynamic and fixed-batch models
BLIP part (torch): a random-init BLIP of real size (large: ViT-L/16 384 + BERT-base decoder).
  baseline  = one image per generate() call (fp32, the common script; and the same dtype as curate)
  curate    = stages.caption.caption_images, batched, bf16/fp16 on GPU
Every case prints one JSON line and appends it to --out. Generation length is pinned (min = max length)
so random weights cannot make one side stop early.

    python bench/tagger_speed.py --arch convnext_base --images 256 --blip large     # GPU machine
    python bench/tagger_speed.py --arch convnext_tiny --images 16 --blip small      # quick CPU figure
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_TAGS = 10861
CACHE = Path(os.path.expanduser("~/.cache/curate/bench"))


def emit(out: Path, rec: dict) -> None:
    rec = {**rec, "loadavg_1m": round(os.getloadavg()[0], 2)}  # other work on the machine skews timings
    line = json.dumps(rec)
    print(line, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as fh:
        fh.write(line + "\n")


def machine() -> dict:
    import onnxruntime as ort
    import torch

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def export_tagger(arch: str, size: int, fixed: bool) -> Path:
    """Random-weight ConvNeXt with the WD14 input/output layout, as a folder with model.onnx + csv."""
    import torch
    import torchvision

    folder = CACHE / f"{arch}-{size}-{'b1' if fixed else 'dyn'}"
    if (folder / "model.onnx").exists():
        return folder
    net = getattr(torchvision.models, arch)(weights=None)
    net.classifier[2] = torch.nn.Linear(net.classifier[2].in_features, N_TAGS)

    class WD14Layout(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor([0.406, 0.456, 0.485]).view(1, 3, 1, 1) * 255)
            self.register_buffer("std", torch.tensor([0.225, 0.224, 0.229]).view(1, 3, 1, 1) * 255)

        def forward(self, x):  # NHWC BGR 0-255 -> sigmoid scores
            x = x.permute(0, 3, 1, 2)
            return torch.sigmoid(self.net(((x - self.mean) / self.std).flip(1)))

    folder.mkdir(parents=True, exist_ok=True)
    kw = {} if fixed else {"dynamic_axes": {"input_1": {0: "batch"}, "predictions_sigmoid": {0: "batch"}}}
    torch.onnx.export(
        WD14Layout().eval(),
        (torch.zeros(1, size, size, 3),),
        str(folder / "model.tmp"),
        input_names=["input_1"],
        output_names=["predictions_sigmoid"],
        opset_version=17,
        dynamo=False,
        **kw,
    )
    with open(folder / "selected_tags.csv", "w") as fh:
        fh.write("tag_id,name,category,count\n")
        for i in range(N_TAGS):
            cat = 9 if i < 4 else (4 if i > N_TAGS - 2000 else 0)
            fh.write(f"{i},tag_{i},{cat},{N_TAGS - i}\n")
    (folder / "model.tmp").replace(folder / "model.onnx")
    return folder


def make_images(root: Path, n: int, seed: int = 0) -> list[Path]:
    """Photo-sized JPEGs (mixed 4:3, 3:4 and 16:9 around 1 MP), smooth random content."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shapes = [(1024, 768), (768, 1024), (1280, 720), (960, 960)]
    paths = []
    for i in range(n):
        w, h = shapes[i % len(shapes)]
        small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        p = root / f"im{i:04d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


def bench_tagger(args, out: Path, root: Path, paths: list[Path], info: dict) -> None:
    import onnxruntime as ort
    from PIL import Image

    from curate import Dataset
    from curate.models import wd14
    from curate.stages.tag import TagConfig, tag_images

    dyn = export_tagger(args.arch, args.size, fixed=False)
    fixed = export_tagger(args.arch, args.size, fixed=True)
    n = len(paths)
    base = {"bench": "tagger", "arch": args.arch, "size": args.size, "images": n, "n_tags": N_TAGS, **info}

    # Baseline: the common loop, one image per run, default session options.
    providers = [
        p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()
    ]
    sess = ort.InferenceSession(str(dyn / "model.onnx"), providers=providers)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: np.zeros((1, args.size, args.size, 3), np.float32)})  # warm-up
    t0 = time.perf_counter()
    for p in paths:
        x = wd14.preprocess(Image.open(p).convert("RGB"), args.size)[None]
        sess.run(None, {name: x})
    t_base = time.perf_counter() - t0
    emit(out, {**base, "case": "baseline_batch1_loop", "providers": sess.get_providers(), "seconds": round(t_base, 3),
               "img_per_s": round(n / t_base, 2)})  # fmt: skip
    del sess

    with Dataset.open(root) as ds:
        ds.scan()
        variants = [("curate_dynamic_batch", dyn, True), ("curate_fixed_b1_rewritten", fixed, True),
                    ("curate_fixed_b1_threads", fixed, False)]  # fmt: skip
        for case, folder, allow_rewrite in variants:
            wd14._CACHE.clear()
            saved = wd14._dynamic_copy
            if not allow_rewrite:
                wd14._dynamic_copy = lambda p: None
            try:
                tagger = wd14.load_tagger(str(folder), "auto")
                tagger.predict(np.zeros((min(args.batch, 4), args.size, args.size, 3), np.float32))  # warm-up
                cfg = TagConfig(model=str(folder), batch_size=args.batch, force=True)
                t0 = time.perf_counter()
                run = tag_images(ds.manifest, cfg)
                dt = time.perf_counter() - t0
            finally:
                wd14._dynamic_copy = saved
            emit(out, {**base, "case": case, "batch": args.batch, "dynamic": tagger.dynamic,
                       "providers": tagger.session.get_providers(), "tagged": run.inferred, "seconds": round(dt, 3),
                       "img_per_s": round(n / dt, 2), "speedup_vs_baseline": round(t_base / dt, 2)})  # fmt: skip
    wd14._CACHE.clear()


BLIP_SIZES = {
    # Salesforce/blip-image-captioning-large: ViT-L/16 at 384, BERT-base text decoder
    "large": ({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
               "image_size": 384, "patch_size": 16}, {"encoder_hidden_size": 1024}),
    "base": ({"image_size": 384, "patch_size": 16}, {"encoder_hidden_size": 768}),
    "small": ({"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 6,
               "image_size": 224, "patch_size": 16},
              {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 6,
               "encoder_hidden_size": 384}),
}  # fmt: skip


def build_blip(kind: str) -> Path:
    """A random-init BLIP of the given size saved with a full-size (dummy-word) BERT vocab."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = CACHE / f"blip-{kind}"
    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    vocab = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        + [f"w{i}" for i in range(30522 - 5)]
        + ["[DEC]", "[ENC]"]
    )
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    vision, text = BLIP_SIZES[kind]
    text = {"vocab_size": len(vocab), "bos_token_id": 30522, "sep_token_id": 3, "pad_token_id": 0, **text}
    cfg = BlipConfig(vision_config=vision, text_config=text)
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(folder, safe_serialization=True)
    size = vision["image_size"]
    BlipProcessor(BlipImageProcessor(size={"height": size, "width": size}), tok).save_pretrained(folder)
    return folder


def bench_blip(args, out: Path, root: Path, paths: list[Path], info: dict) -> None:
    import torch

    from curate import Dataset
    from curate.io import open_rgb
    from curate.models.blip import generate_captions, load_blip
    from curate.stages.caption import BlipConfig, caption_images

    folder = build_blip(args.blip)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = min(len(paths), args.blip_images)
    gen = {"num_beams": args.beams, "min_length": args.tokens, "max_length": args.tokens}
    base = {"bench": "blip", "size": args.blip, "images": n, "device": device, **gen, **info}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dtypes = ["fp32", "auto"] if device == "cuda" else ["fp32"]
    t_first = None
    for dt_name in dtypes:
        proc, net, dtype = load_blip(str(folder), device, dt_name)
        generate_captions(proc, net, [open_rgb(paths[0])], dtype=dtype, **gen)  # warm-up
        sync()
        t0 = time.perf_counter()
        for p in paths[:n]:
            generate_captions(proc, net, [open_rgb(p, max_side=768)], dtype=dtype, **gen)
        sync()
        dt = time.perf_counter() - t0
        t_first = t_first or dt
        emit(out, {**base, "case": f"baseline_unbatched_{dt_name}", "dtype": str(dtype), "seconds": round(dt, 3),
                   "img_per_s": round(n / dt, 2)})  # fmt: skip
        del net
        torch.cuda.empty_cache() if device == "cuda" else None
    from curate.models import blip as blip_mod

    blip_mod._CACHE.clear()
    with Dataset.open(root) as ds:
        ds.scan()
        recs = ds.kept()[:n]
        for bs in args.blip_batch:
            cfg = BlipConfig(model=str(folder), device=device, batch_size=bs, force=True, **gen)
            caption_images(ds.manifest, cfg, records=recs[: min(bs, n)])  # warm-up at this shape
            sync()
            t0 = time.perf_counter()
            run = caption_images(ds.manifest, cfg, records=recs)
            sync()
            dt = time.perf_counter() - t0
            emit(out, {**base, "case": f"curate_batched_{bs}", "dtype": cfg.dtype, "captioned": run.generated,
                       "seconds": round(dt, 3), "img_per_s": round(n / dt, 2),
                       "speedup_vs_unbatched_fp32": round(t_first / dt, 2)})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="convnext_base", help="torchvision convnext_tiny/small/base/large")
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--blip", default="large", choices=[*BLIP_SIZES, "none"])
    ap.add_argument("--blip-images", type=int, default=64)
    ap.add_argument("--blip-batch", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--beams", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=30, help="caption length (min = max)")
    ap.add_argument("--skip-tagger", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tagger_speed.jsonl"))
    args = ap.parse_args()
    out = Path(args.out)
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        root.mkdir()
        paths = make_images(root, args.images)
        if not args.skip_tagger:
            bench_tagger(args, out, root, paths, info)
        if args.blip != "none":
            bench_blip(args, out, root, paths, info)


if __name__ == "__main__":
    main()
