# Copied unchanged from the project's shared baseline (../shared/bench/lora_step_peer.py) so it travels to the GPU machine.
"""Peer anchor: LoRA training-step throughput of the diffusers+peft reference recipe
(the loop of diffusers' examples/text_to_image/train_text_to_image_lora*.py) on a
randomly initialised SD1.5 / SDXL UNet with cached latents and text embeddings.
Random weights cost the same FLOPs as real ones. Prints one JSON line per case."""

import json
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from torch.utils.flop_counter import FlopCounterMode

SD15 = dict(
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL = dict(
    sample_size=128,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def build(cfg, rank, compile_):
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**cfg)
    unet.requires_grad_(False)
    unet.to(dtype=torch.bfloat16)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    fwd = torch.compile(unet) if compile_ else unet
    return unet, fwd, opt, params


def batch(cfg, bs):
    s = cfg["sample_size"]
    x = torch.randn(bs, 4, s, s, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (bs,), device="cuda")
    h = torch.randn(bs, 77, cfg["cross_attention_dim"], device="cuda", dtype=torch.bfloat16)
    extra = {}
    if "addition_embed_type" in cfg:
        extra = dict(
            added_cond_kwargs=dict(
                text_embeds=torch.randn(bs, 1280, device="cuda", dtype=torch.bfloat16),
                time_ids=torch.randn(bs, 6, device="cuda", dtype=torch.bfloat16),
            )
        )
    return x, t, h, extra


def step(fwd, opt, x, t, h, extra):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        pred = fwd(x, t, h, **extra).sample
    loss = torch.nn.functional.mse_loss(pred.float(), x.float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def run(name, cfg, bs, rank=32, compile_=False, iters=20):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    unet, fwd, opt, params = build(cfg, rank, compile_)
    x, t, h, extra = batch(cfg, bs)
    for _ in range(3 if not compile_ else 6):
        step(fwd, opt, x, t, h, extra)
    torch.cuda.synchronize()
    with FlopCounterMode(display=False) as fc:
        step(unet, opt, x, t, h, extra)
    flops = fc.get_total_flops()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step(fwd, opt, x, t, h, extra)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    out = dict(
        case=name,
        batch=bs,
        rank=rank,
        compile=compile_,
        it_s=round(1 / dt, 3),
        img_s=round(bs / dt, 2),
        tflop_per_step=round(flops / 1e12, 2),
        achieved_tflops=round(flops / dt / 1e12, 1),
        peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        lora_params_m=round(sum(p.numel() for p in params) / 1e6, 2),
    )
    print(json.dumps(out), flush=True)
    del unet, fwd, opt, params


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    print(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__)), flush=True)
    which = sys.argv[1:] or ["sd15", "sdxl"]
    if "sd15" in which:
        for bs in (1, 4, 8, 16):
            run("sd15-512", SD15, bs)
        run("sd15-512", SD15, 8, compile_=True)
    if "sdxl" in which:
        for bs in (1, 4):
            run("sdxl-1024", SDXL, bs)
        run("sdxl-1024", SDXL, 4, compile_=True)
