"""Compile time of the LoRA UNet step: torch.compile of the whole UNet against regional compilation
(trainer_bridge/regions.py: each repeated block compiled on its own, identical blocks sharing code).

Each mode runs in a fresh process with an empty inductor cache (a temp folder), so neither mode reuses the
other's kernels. The time is the first forward + backward (where dynamo, AOTAutograd and inductor run), minus an
eager forward + backward of the same shapes; the second step shows the compiled code is being reused.

    python bench/compile_time.py                          # tiny UNet (the tests' config) on the CPU, both modes
    python bench/compile_time.py --unet sd15 --size 16    # real-size SD1.5 UNet config, 16x16 latents
    TORCHINDUCTOR_COMPILE_THREADS=1 python bench/compile_time.py ...   # compilers in-process: process_cpu_s counts them
    python bench/compile_time.py --device cuda --unet sd15 --size 64 --batch 8 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import emit  # noqa: E402

TINY = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=4)  # fmt: skip


def unet_cfg(name: str) -> dict:
    if name == "tiny":
        return TINY
    from bench.train_step import SD15, SDXL

    return SD15 if name == "sd15" else SDXL


def one(a) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from trainer_bridge.lora import inject_unet
    from trainer_bridge.regions import compile_regions

    torch.manual_seed(0)
    dev = torch.device(a.device)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    cfg = unet_cfg(a.unet)
    with dev:
        unet = UNet2DConditionModel(**cfg)
    unet.requires_grad_(False).to(dtype=dt)
    mods = inject_unet(unet, a.rank, a.rank, sdxl="addition_embed_type" in cfg)
    for m in mods:
        m.lora_down.float().requires_grad_(True)
        m.lora_up.float().requires_grad_(True)
        torch.nn.init.normal_(m.lora_up.weight, std=0.01)  # off zero, so lora_down gets gradients too
    unet.train()
    s = a.size or cfg["sample_size"]
    x = torch.randn(a.batch, 4, s, s, device=dev)
    h = torch.randn(a.batch, 77 if a.unet != "tiny" else 8, cfg["cross_attention_dim"], device=dev)
    t = torch.randint(0, 1000, (a.batch,), device=dev)
    added = None
    if "addition_embed_type" in cfg:
        added = dict(
            text_embeds=torch.randn(a.batch, 1280, device=dev), time_ids=torch.randn(a.batch, 6, device=dev)
        )

    params = [p for m in mods for p in (m.lora_down.weight, m.lora_up.weight)]

    def step(fwd):
        with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
            out = fwd(x, t, h, added_cond_kwargs=added).sample
        loss = out.float().square().mean()
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        grad = torch.cat([p.grad.flatten() for p in params])
        for p in params:
            p.grad = None
        return loss.detach(), grad

    t0 = time.perf_counter()
    loss0, grad0 = step(unet)
    eager_s = time.perf_counter() - t0
    regions = 0
    if a.mode == "whole":
        fwd = torch.compile(unet, dynamic=False)
    else:
        regions = len(compile_regions(unet))
        fwd = unet
    from torch._dynamo.utils import counters

    t0 = time.perf_counter()
    loss1, grad1 = step(fwd)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    step(fwd)
    second_s = time.perf_counter() - t0
    return dict(unet=a.unet, mode=a.mode, device=a.device, dtype=a.dtype, batch=a.batch, size=s, regions=regions,
                compile_s=round(first_s - eager_s, 1), first_step_s=round(first_s, 1), eager_step_s=round(eager_s, 2),
                second_step_s=round(second_s, 2), loss_rel_diff=float((loss1 - loss0).abs() / loss0.abs()),
                grad_rel_diff=float((grad1 - grad0).norm() / grad0.norm()), graphs=int(counters["stats"]["unique_graphs"]),
                graph_breaks=int(sum(counters["graph_break"].values())), torch=torch.__version__)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--unet", default="tiny", choices=["tiny", "sd15", "sdxl"])
    ap.add_argument("--mode", default="", help="whole | regional (default: both, each in a fresh process)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=0, help="latent side (default: the config's sample_size)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--timeout", type=int, default=0, help="per mode, seconds (0: none)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(one(a)), flush=True)
        return
    for mode in ("regional", "whole"):
        with tempfile.TemporaryDirectory(prefix="inductor_") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
            args = ["--unet", a.unet, "--device", a.device, "--dtype", a.dtype, "--batch", str(a.batch),
                    "--size", str(a.size), "--rank", str(a.rank)]  # fmt: skip
            cmd = [sys.executable, __file__, *args, "--mode", mode]
            t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            try:
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout or None)
                line = p.stdout.strip().splitlines()[-1] if p.returncode == 0 else ""
                res = json.loads(line) if line else dict(mode=mode, error=p.stderr.strip().splitlines()[-1:])
            except subprocess.TimeoutExpired:
                res = dict(unet=a.unet, mode=mode, error=f"timed out after {a.timeout} s")
            res["process_s"] = round(time.perf_counter() - t0, 1)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            # CPU seconds of the process and the compilers it reaped (all of them with TORCHINDUCTOR_COMPILE_THREADS=1)
            res["process_cpu_s"] = round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 1)
        emit(res, a.out)


if __name__ == "__main__":
    main()
