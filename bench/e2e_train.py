"""`curate train` end to end, where a user sees the speed: a random-weight SD1.5 (or SDXL) pipeline at its real size
(diffusers configs, random init, nothing downloaded), N synthetic images with sentence captions in a kohya folder,
then `curate train DATA --json` in this process, timed from the call to its return. Prints one JSON line per run
(model load, latent cache, text-encoder cache, steady img/s, total wall), then the bench step's img/s
(bench/train_step.py, the same UNet shape, batch and rank, in this process) and the ratio the issue asks >= 0.9 for.

    python bench/e2e_train.py --images 200 --steps 600 [--batch 1] [--family sd15|sdxl] [--out e2e.jsonl]
    python bench/e2e_train.py --tiny        # the tiny test models on the CPU, a few seconds: checks the script runs

Run 1 encodes the latents and the text embeddings; --runs 2 trains again on the warm caches (the second line
shows 0 encoded). --workdir keeps the model and the data (e.g. for sd-scripts on the same images, ../shared/bench/kohya).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import emit  # noqa: E402  (one JSON line, also appended to --out)

COLORS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]
THINGS = ["ball", "chair", "car", "cup", "lamp", "hat", "book", "flower"]


def _clip_te(hidden: int, layers: int, heads: int, inter: int, act: str, projection: int | None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
                         projection_dim=projection or 768, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407)  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def build_model(folder: Path, family: str, device: str) -> None:
    """A diffusers folder with SD1.5's (or SDXL's) UNet, VAE and CLIP text encoder(s) at their real sizes, random."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    from bench.train_step import SD15, SDXL
    from tests.trainer_fixtures import make_tokenizer

    torch.manual_seed(0)
    sdxl = family == "sdxl"
    with torch.device(device):
        unet = UNet2DConditionModel(**(SDXL if sdxl else SD15))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=1024 if sdxl else 512, scaling_factor=0.13025 if sdxl else 0.18215)  # fmt: skip
        clip_l = _clip_te(768, 12, 12, 3072, "quick_gelu", None)
        clip_g = _clip_te(1280, 32, 20, 5120, "gelu", 1280) if sdxl else None
    tok = make_tokenizer(folder / "_tok")
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if sdxl:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=clip_g, tokenizer=tok,
                                         tokenizer_2=tok, unet=unet, scheduler=EulerDiscreteScheduler(**betas))  # fmt: skip
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip_l, tokenizer=tok, unet=unet,
                                       scheduler=DDPMScheduler(**betas), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.to("cpu", torch.float16).save_pretrained(
        folder / "model"
    )  # fp16 files, as most published checkpoints


def make_images(folder: Path, n: int, size: int) -> Path:
    """n smooth random JPEGs of size x size with one sentence caption each (distinct, no commas: no shuffle)."""
    import numpy as np
    from PIL import Image

    sub = folder / "1_sks"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        low = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        Image.fromarray(low).resize((size, size), Image.BICUBIC).save(sub / f"{i:05d}.jpg", quality=90)
        c, t = COLORS[i % len(COLORS)], THINGS[(i // len(COLORS)) % len(THINGS)]
        (sub / f"{i:05d}.txt").write_text(f"a photo of sks with a {c} {t} number {i}")
    return folder


def curate_train(args: list[str]) -> tuple[dict, float]:
    """`curate train ARGS --json` in this process: (its JSON document, wall seconds of the call)."""
    from curate.cli import app

    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        code = app([*args, "--json"], standalone_mode=False)
    wall = time.perf_counter() - t0
    if code:  # the one-line error is already on stderr
        raise SystemExit(f"curate train exited with {code}")
    return json.loads(buf.getvalue()), wall


def step_img_s_cpu(unet_dir: Path, bs: int, res: int, rank: int, steps: int = 6) -> float:
    """--tiny: the plain step (diffusion_loss + AdamW + clipping) on the CPU, median of `steps` after one warm-up."""
    import torch
    from diffusers import UNet2DConditionModel

    from trainer_bridge.lora import inject_unet, lora_parameters
    from trainer_bridge.loss import diffusion_loss
    from trainer_bridge.train import build_optimizer

    unet = UNet2DConditionModel.from_pretrained(unet_dir).requires_grad_(False)
    mods = inject_unet(unet, rank, rank, sdxl=unet.config.addition_embed_type == "text_time")
    for m in mods:
        m.lora_down.requires_grad_(True)
        m.lora_up.requires_grad_(True)
    params = lora_parameters(mods)
    opt = build_optimizer("adamw", [{"params": params, "lr": 1e-4}], 1e-4, 0.01, "cpu")
    alphas = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
    x = torch.randn(bs, 4, res // 8, res // 8)
    h = torch.randn(bs, 77, unet.config.cross_attention_dim)
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding + 6 size / crop ids
        c = unet.config
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        added = {"text_embeds": torch.randn(bs, pooled), "time_ids": torch.full((bs, 6), float(res))}
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        diffusion_loss(unet, x, h, added, alphas, gen).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return bs / sorted(times)[len(times) // 2]


def step_img_s_gpu(family: str, bs: int, rank: int, out: str | None) -> dict:
    """The bench step (bench/train_step.py, variant graph+bf16norm = the default of `curate train` under bf16:
    CUDA graphs, GroupNorm / LayerNorm in bf16): its JSON figure."""
    import torch

    from bench import train_step as B

    torch.backends.cuda.matmul.allow_tf32 = True
    name, cfg = ("sdxl-1024", B.SDXL) if family == "sdxl" else ("sd15-512", B.SD15)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        B.run_variant(name, cfg, bs, "graph+bf16norm", rank=rank)
    res = json.loads(buf.getvalue().strip().splitlines()[-1])
    emit({"case": "bench_step", **res}, out)
    return res


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="sd15", choices=["sd15", "sdxl"])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per run (max_steps)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument(
        "--runs", type=int, default=1, help="2: train again on the warm latent / text-encoder caches"
    )
    ap.add_argument(
        "--workdir", default="", help="keep the model and data here (default: a temporary folder)"
    )
    ap.add_argument(
        "--set", dest="sets", action="append", default=[], help="extra curate train --set options"
    )
    ap.add_argument("--base", default="", help="train on this diffusers folder instead of a random one")
    ap.add_argument(
        "--data", default="", help="train on this kohya folder as it is (e.g. sd-scripts' bench data) instead"
    )
    ap.add_argument("--tiny", action="store_true", help="tiny test models on the CPU: checks the script runs")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    a = ap.parse_args(argv)

    import torch

    on_gpu = torch.cuda.is_available() and not a.tiny
    tmp = None
    if a.workdir:
        work = Path(a.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="e2e_train_")
        work = Path(tmp.name)
    res = 64 if a.tiny else (1024 if a.family == "sdxl" else 512)
    n_img = min(a.images, 4) if a.tiny else a.images
    steps = min(a.steps, 4) if a.tiny else a.steps
    if a.tiny:
        a.rank = min(a.rank, 4)
    t0 = time.perf_counter()
    model = Path(a.base) if a.base else work / f"{a.family}{'-tiny' if a.tiny else ''}" / "model"
    if not (model / "model_index.json").is_file():
        if a.tiny:
            from tests.trainer_fixtures import tiny_sd15_pipeline, tiny_sdxl_pipeline

            build = tiny_sdxl_pipeline if a.family == "sdxl" else tiny_sd15_pipeline
            build(model.parent / "_tok").save_pretrained(model)
        else:
            build_model(model.parent, a.family, "cuda" if on_gpu else "cpu")
    build_s = time.perf_counter() - t0
    if a.data:
        data = Path(a.data)
        n_img = sum(1 for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
        if not n_img:
            raise SystemExit(f"--data {data}: no images there")
    else:
        data = work / f"data-{n_img}-{res}"
        if not data.is_dir():
            make_images(data, n_img, res)
    head = dict(case="setup", family=a.family, tiny=a.tiny, images=n_img, resolution=res, batch=a.batch,
                steps=steps, rank=a.rank, model_build_s=round(build_s, 1), data=str(data), torch=torch.__version__,
                gpu=torch.cuda.get_device_name() if on_gpu else "cpu")  # fmt: skip
    emit(head, a.out)
    sets = [f"batch_size={a.batch}", f"max_steps={steps}", f"network_dim={a.rank}", f"network_alpha={a.rank}",
            "save_state=false", f"resolution={res}"]  # fmt: skip
    if a.tiny:
        sets += ["mixed_precision='no'", "log_every_n_steps=1", "min_bucket_reso=32", "bucket_reso_steps=16"]
    sets += a.sets
    lines = []
    for run in range(1, a.runs + 1):
        out_dir = work / f"out-{a.family}{'-tiny' if a.tiny else ''}"
        args = ["train", str(data), "--base", str(model), "--output-dir", str(out_dir)]
        args += [x for s in sets for x in ("--set", s)]
        doc, wall = curate_train(args)
        t = doc["timings"]
        line = dict(case="curate_train", run=run, family=a.family, images=n_img, batch=a.batch, steps=doc["steps"],
                    wall_s=round(wall, 2), total_s=round(t["total_s"], 2), load_s=round(t["load_s"], 2),
                    latent_cache_s=round(t["latent_cache_s"], 2), latents_encoded=t.get("latents_encoded"),
                    latents_cached=t.get("latents_cached"), te_cache_s=round(t["te_cache_s"], 2),
                    te_encoded=t.get("te_encoded"), te_cached=t.get("te_cached"), train_s=round(t["train_s"], 2),
                    steady_img_s=round(t["steady_img_s"], 2) if t["steady_img_s"] else None,
                    latent_img_s=round(t["latents_encoded"] / t["latent_cache_s"], 1)
                    if t.get("latents_encoded") and t["latent_cache_s"] else None)  # fmt: skip
        emit(line, a.out)
        lines.append(line)
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    if on_gpu:
        bench = step_img_s_gpu(a.family, a.batch, a.rank, a.out)["img_s"]
    else:
        bench = step_img_s_cpu(model / "unet", a.batch, res, a.rank)
        emit({"case": "bench_step", "impl": "plain step on the cpu", "img_s": round(bench, 2)}, a.out)
    steady = lines[-1]["steady_img_s"]
    ratio = steady / bench if steady and bench else None
    summary = dict(case="e2e_vs_step", steady_img_s=steady, bench_step_img_s=round(bench, 2),
                   ratio=round(ratio, 3) if ratio else None, goal=0.9, meets_goal=bool(ratio and ratio >= 0.9))  # fmt: skip
    emit(summary, a.out)
    if tmp is not None:
        tmp.cleanup()
    return [head, *lines, summary]


if __name__ == "__main__":
    main()
