"""Throughput of our trainer's LoRA step (trainer_bridge.loss.diffusion_loss + fused AdamW + grad clipping) on
random-init SD1.5 / SDXL UNets with cached latents and text embeddings already on the GPU; rank 32 on
to_q/k/v/out.0, bf16 autocast. Prints one JSON line per case, with the fields of bench/peer/lora_step_peer.py.

    python bench/train_step.py [sd15] [sdxl] [--channels-last] [--compile] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_bridge.lora import inject_unet, lora_parameters  # noqa: E402
from trainer_bridge.loss import diffusion_loss  # noqa: E402
from trainer_bridge.train import build_optimizer  # noqa: E402

SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)  # fmt: skip
SDXL = dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)  # fmt: skip
ALPHAS = torch.cumprod(
    1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0
).float()


def build(cfg: dict, rank: int, channels_last: bool, compile_: bool, checkpointing: bool = False):
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**cfg)
    unet.requires_grad_(False).to(dtype=torch.bfloat16)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    mods = inject_unet(unet, rank, rank, sdxl="addition_embed_type" in cfg)
    for m in mods:
        m.lora_down.float().requires_grad_(True)
        m.lora_up.float().requires_grad_(True)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    unet.train()
    params = lora_parameters(mods)
    opt = build_optimizer("adamw", [{"params": params, "lr": 1e-4}], 1e-4, 0.01, "cuda")
    fwd = torch.compile(unet) if compile_ else unet
    return unet, fwd, opt, params


def batch(cfg: dict, bs: int, channels_last: bool, size: int | None = None):
    s = size or cfg["sample_size"]
    x = torch.randn(bs, 4, s, s, device="cuda")  # cached latents stay fp32, as in the trainer
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    h = torch.randn(bs, 77, cfg["cross_attention_dim"], device="cuda", dtype=torch.bfloat16)
    added = None
    if "addition_embed_type" in cfg:
        added = dict(text_embeds=torch.randn(bs, 1280, device="cuda", dtype=torch.bfloat16),
                     time_ids=torch.randn(bs, 6, device="cuda", dtype=torch.bfloat16))  # fmt: skip
    return x, h, added


def step(fwd, opt, params, x, h, added, gen):
    """The body of trainer_bridge.train's loop for one optimizer step (grad_accum = 1)."""
    global ALPHAS
    if ALPHAS.device.type != "cuda":
        ALPHAS = ALPHAS.cuda()
    loss = diffusion_loss(fwd, x, h, added, ALPHAS, gen, autocast_dtype=torch.bfloat16)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def run(name, cfg, bs, rank=32, channels_last=False, compile_=False, iters=20, out=None, checkpointing=False):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    unet, fwd, opt, params = build(cfg, rank, channels_last, compile_, checkpointing)
    x, h, added = batch(cfg, bs, channels_last)
    gen = torch.Generator("cuda").manual_seed(0)
    for _ in range(3 if not compile_ else 6):
        step(fwd, opt, params, x, h, added, gen)
    torch.cuda.synchronize()
    with FlopCounterMode(display=False) as fc:
        step(unet, opt, params, x, h, added, gen)
    flops = fc.get_total_flops()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        loss = step(fwd, opt, params, x, h, added, gen)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    res = dict(impl="trainer_bridge", case=name, batch=bs, rank=rank, compile=compile_, channels_last=channels_last,
               gradient_checkpointing=checkpointing, it_s=round(1 / dt, 3), img_s=round(bs / dt, 2),
               tflop_per_step=round(flops / 1e12, 2), achieved_tflops=round(flops / dt / 1e12, 1),
               peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
               lora_params_m=round(sum(p.numel() for p in params) / 1e6, 2), loss_finite=bool(torch.isfinite(loss)))  # fmt: skip
    line = json.dumps(res)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
    del unet, fwd, opt, params


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("which", nargs="*", default=["sd15", "sdxl"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    head = json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__))
    print(head, flush=True)
    if "sd15" in a.which:
        for bs in (1, 8, 16):
            run("sd15-512", SD15, bs, channels_last=a.channels_last, compile_=a.compile, out=a.out)
    if "sdxl" in a.which:
        for bs in (1, 4):
            run("sdxl-1024", SDXL, bs, channels_last=a.channels_last, compile_=a.compile, out=a.out)
