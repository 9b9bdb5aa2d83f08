"""Tagger and captioner throughput: curate's pipelines vs the one-image-at-a-time loops of common scripts.

WD14 part: a random-weight torchvision ConvNeXt exported to ONNX with the WD14 layout (NHWC float32 0-255 BGR
input at 448x448, 10861-wide sigmoid head), once with a dynamic batch dim and once fixed to batch 1.
  baseline  = for each image: open, preprocess, session.run on a batch of 1 (kohya / webui style loop)
  curate    = stages.tag.tag_images (threaded decode ahead of batched runs), dynamic and fixed-batch models
BLIP part (torch): a random-init BLIP of real size (large: ViT-L/16 384 + BERT-base decoder).
  baseline  = one image per generate() call (fp32, the common script; and the same dtype as curate)
  curate    = stages.caption.caption_images, batched, bf16/fp16 on GPU
WD v3 part (--v3 vit swinv2): a timm model of the v3 shape (random weights; vit_base_patch16 / swinv2_base at
448 with the v3 model_args, 10861 classes) saved as model.safetensors + config.json, and the same weights
exported to model.onnx with the v3 ONNX layout (NHWC BGR 0-255, sigmoid inside).
  baseline  = for each image: open, preprocess, onnxruntime session.run on a batch of 1 (providers present)
  torch     = the torch backend on a synthetic uint8 batch (model + copies only), and stages.tag.tag_images
              end to end from --images JPEG files at 448x448 (decode threads, batches, score writes)
Every case prints one JSON line and appends it to --out. Generation length is pinned (min = max length)
so random weights cannot make one side stop early.

    python bench/tagger_speed.py --arch convnext_base --images 256 --blip large     # GPU machine
    python bench/tagger_speed.py --arch convnext_tiny --images 16 --blip small      # quick CPU figure
    python bench/tagger_speed.py --v3 vit swinv2 --images 3000 --skip-tagger --blip none   # GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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


V3_SHAPES = {
    # SmilingWolf/wd-*-tagger-v3 config.json shapes (timm architecture + model_args)
    "vit": ("vit_base_patch16_224",
            {"img_size": 448, "class_token": False, "global_pool": "avg", "fc_norm": False, "act_layer": "gelu_tanh"}),
    "swinv2": ("swinv2_base_window8_256", {"img_size": 448, "window_size": 14, "act_layer": "gelu_tanh"}),
    "convnext": ("convnext_base", {}),
    # not a v3 shape: a one-block ViT at 448 for CPU dry runs of the GPU scripts
    "tiny": ("vit_base_patch16_224",
             {"img_size": 448, "patch_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2, "class_token": False,
              "global_pool": "avg", "fc_norm": False, "act_layer": "gelu_tanh"}),
}  # fmt: skip


def build_v3(name: str, root: Path, onnx: bool = True) -> tuple[Path, float]:
    """A v3-shaped timm tagger folder with random weights: safetensors + config.json + csv + model.onnx."""
    import timm
    import torch
    from safetensors.torch import save_file

    from tests.tiny_wd14 import export_v3_onnx

    arch, model_args = V3_SHAPES[name]
    folder = root / f"wd-{name}-v3-random"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, num_classes=N_TAGS, **model_args).eval()
    with torch.no_grad():  # about 100 tags above the 0.05 floor per image, like a trained tagger's output
        bias = torch.full((N_TAGS,), -6.0)
        bias[torch.randperm(N_TAGS)[:100]] = 0.0
        net.get_classifier().bias.copy_(bias)
    cfg = {"architecture": arch, "num_classes": N_TAGS, "model_args": model_args,
           "pretrained_cfg": {"input_size": [3, 448, 448], "interpolation": "bicubic", "crop_pct": 1.0,
                              "crop_mode": "center", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                              "num_classes": N_TAGS}}  # fmt: skip
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    with open(folder / "selected_tags.csv", "w") as fh:
        fh.write("tag_id,name,category,count\n")
        for i in range(N_TAGS):
            cat = 9 if i < 4 else (4 if i > N_TAGS - 2000 else 0)
            fh.write(f"{i},tag_{i},{cat},{N_TAGS - i}\n")
    t0 = time.perf_counter()
    if onnx:
        export_v3_onnx(net, cfg, folder / "model.onnx")
    return folder, time.perf_counter() - t0


def make_square_jpegs(root: Path, n: int, side: int = 448, workers: int = 16) -> list[Path]:
    """``n`` JPEGs of side x side (quality 90, smooth random content), written by a thread pool."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def one(i: int) -> Path:
        rng = np.random.default_rng(i)
        small = rng.integers(0, 255, (side // 16, side // 16, 3), dtype=np.uint8)
        p = root / f"sq{i:05d}.jpg"
        Image.fromarray(small).resize((side, side), Image.BILINEAR).save(p, quality=90)
        return p

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))


def bench_v3(args, out: Path, info: dict) -> None:
    import onnxruntime as ort
    import torch
    from PIL import Image

    from curate import Dataset
    from curate.io import open_rgb
    from curate.models import wd14
    from curate.models.wd_torch import TorchTagger
    from curate.stages.tag import TagConfig, load_scores, model_key, tag_images

    tmp = Path(tempfile.mkdtemp(prefix="v3bench-"))
    root = tmp / "ds"
    root.mkdir()
    t0 = time.perf_counter()
    paths = make_square_jpegs(root, args.images, workers=os.cpu_count() or 4)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    with Dataset.open(root) as ds:
        ds.scan()
        recs = ds.kept()
    emit(out, {"bench": "v3_setup", "images": len(recs), "side": 448, "write_s": round(t_write, 2),
               "scan_s": round(time.perf_counter() - t0, 2), **info})  # fmt: skip

    # Decoding + preprocessing alone (the threads tag_images uses), to show the end-to-end ceiling.
    from concurrent.futures import ThreadPoolExecutor

    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda p: wd14.preprocess_u8(open_rgb(p), 448), paths))
        dt = time.perf_counter() - t0
    emit(
        out,
        {
            "bench": "v3_decode_only",
            "workers": workers,
            "images": len(paths),
            "img_per_s": round(len(paths) / dt, 1),
        },
    )

    for name in args.v3:
        base = {"bench": "wd_v3", "shape": name, "arch": V3_SHAPES[name][0], "n_tags": N_TAGS, "size": 448,
                "gpu": info.get("gpu"), "torch": info.get("torch")}  # fmt: skip
        try:
            folder, t_export = build_v3(name, tmp)
        except Exception as exc:  # record and go on to the next shape
            emit(out, {**base, "case": "build_failed", "error": str(exc)[:300]})
            continue
        # Baseline: the reference loop, one image per session.run, default session options.
        avail = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
        sess = ort.InferenceSession(str(folder / "model.onnx"), providers=providers)
        iname = sess.get_inputs()[0].name
        sess.run(None, {iname: wd14.preprocess(Image.open(paths[0]).convert("RGB"), 448)[None]})  # warm-up
        k = min(args.baseline_images, len(paths))
        t0 = time.perf_counter()
        for p in paths[:k]:
            sess.run(None, {iname: wd14.preprocess(Image.open(p).convert("RGB"), 448)[None]})
        t_base = (time.perf_counter() - t0) / k
        emit(out, {**base, "case": "baseline_onnxruntime_batch1_loop", "providers": sess.get_providers(),
                   "images": k, "img_per_s": round(1 / t_base, 2), "onnx_export_s": round(t_export, 1)})  # fmt: skip
        del sess

        # Model only: synthetic uint8 batches through the torch backend (H2D, normalise, forward, D2H).
        cuda = args.v3_device.startswith("cuda")
        files = wd14.locate(str(folder))
        x = np.random.default_rng(0).integers(0, 255, (max(args.v3_batches), 448, 448, 3), dtype=np.uint8)
        auto_batch = 0
        for dtype in args.v3_dtypes:
            tagger = TorchTagger(files, device=args.v3_device, dtype=dtype)
            auto_batch = auto_batch or tagger.default_batch
            for bs in args.v3_batches:
                xb = tagger.collate(list(x[:bs]))  # pinned, as tag_images hands batches over
                for _ in range(2):
                    tagger.predict(xb)
                iters = max(3, int(args.v3_model_images / bs))
                t0 = time.perf_counter()
                prev = None
                for _ in range(iters):
                    h = tagger.submit(xb)
                    if prev is not None:
                        prev.result()
                    prev = h
                prev.result()
                dt = time.perf_counter() - t0
                emit(out, {**base, "case": "torch_model_only", "batch": bs, "dtype": tagger.dtype,
                           "img_per_s": round(bs * iters / dt, 1), "speedup_vs_baseline": round(bs * iters / dt * t_base, 1),
                           "max_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None})  # fmt: skip
            del tagger
            torch.cuda.empty_cache() if cuda else None

        # End to end with nvJPEG: file bytes read on threads, decoded + padded/resized on the GPU, model, D2H.
        if cuda:
            try:
                from concurrent.futures import ThreadPoolExecutor as _TPE

                from curate.models.wd_torch import gpu_batch

                gt = TorchTagger(files, device=args.v3_device, dtype="auto")
                bs = max(args.v3_batches)

                def read(ps):
                    return [torch.frombuffer(bytearray(Path(q).read_bytes()), dtype=torch.uint8) for q in ps]

                chunks = [paths[i : i + bs] for i in range(0, len(paths), bs)]
                for rep in range(max(1, args.v3_repeats) + 1):  # first pass warms nvJPEG + the kernels
                    with _TPE(4) as rp:
                        t0 = time.perf_counter()
                        prev = None
                        n_ok = 0
                        for datas in rp.map(read, chunks):
                            xb, ok = gpu_batch(gt, datas)
                            n_ok += sum(ok)
                            h = gt.submit(xb)
                            if prev is not None:
                                prev.result()
                            prev = h
                        prev.result()
                        dt = time.perf_counter() - t0
                    if rep:
                        emit(out, {**base, "case": "nvjpeg_gpu_preprocess_end_to_end", "repeat": rep - 1, "batch": bs,
                                   "images": len(paths), "ok": n_ok, "dtype": gt.dtype, "seconds": round(dt, 3),
                                   "img_per_s": round(len(paths) / dt, 1),
                                   "speedup_vs_baseline": round(len(paths) / dt * t_base, 1)})  # fmt: skip
                del gt
            except Exception as exc:
                emit(out, {**base, "case": "nvjpeg_failed", "error": str(exc)[:300]})

        # End to end: curate's stage from the JPEG files (decoding, batches on the GPU, score writes).
        wd14._CACHE.clear()
        with Dataset.open(root) as ds:
            for dtype, decode in args.v3_e2e:
                cfg = TagConfig(model=str(folder), device=args.v3_device, backend="auto" if cuda else "torch",
                                dtype=dtype, decode=decode, force=True)  # fmt: skip
                tag_images(ds.manifest, cfg, records=recs[: 2 * auto_batch])  # load + warm-up
                for rep in range(args.v3_repeats):
                    t0 = time.perf_counter()
                    run = tag_images(ds.manifest, cfg, records=recs)
                    dt = time.perf_counter() - t0
                    stored = load_scores(ds.manifest, model_key(str(folder)))
                    per_image = sum(len(v) for v in stored.values()) / max(1, len(stored))
                    emit(out, {**base, "case": "curate_tag_end_to_end", "repeat": rep, "images": len(recs),
                               "backend": run.backend, "runtime": run.runtime, "why": run.why, "batch": run.batch_size,
                               "decode": run.decode, "tags_stored_per_image": round(per_image, 1),
                               "seconds": round(dt, 3), "img_per_s": round(len(recs) / dt, 1),
                               "speedup_vs_baseline": round(len(recs) / dt * t_base, 1), "failed": len(run.failed)})  # fmt: skip
        wd14._CACHE.clear()
        torch.cuda.empty_cache() if cuda else None
        shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


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
    ap.add_argument(
        "--v3", nargs="*", default=[], choices=sorted(V3_SHAPES), help="WD v3 shapes to bench (GPU)"
    )
    ap.add_argument(
        "--baseline-images", type=int, default=32, help="images through the batch-1 onnxruntime loop"
    )
    ap.add_argument("--v3-batches", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--v3-model-images", type=int, default=1024, help="images per model-only timing")
    ap.add_argument("--v3-repeats", type=int, default=2)
    ap.add_argument("--v3-device", default="cuda", help="cuda (the figures) or cpu (a smoke run)")
    ap.add_argument(
        "--v3-dtypes", nargs="+", default=["auto", "bf16"], help="torch tagger dtypes, model-only"
    )
    ap.add_argument("--v3-e2e", nargs="+", default=[("auto", "auto"), ("bf16", "auto"), ("auto", "threads")],
                    type=lambda v: tuple(v.split(":")), help="dtype:decode pairs end to end")  # fmt: skip
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tagger_speed.jsonl"))
    args = ap.parse_args()
    out = Path(args.out)
    info = machine()
    if args.v3:
        bench_v3(args, out, info)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        root.mkdir()
        if args.skip_tagger and args.blip == "none":
            return
        paths = make_images(root, args.images)
        if not args.skip_tagger:
            bench_tagger(args, out, root, paths, info)
        if args.blip != "none":
            bench_blip(args, out, root, paths, info)


if __name__ == "__main__":
    main()
