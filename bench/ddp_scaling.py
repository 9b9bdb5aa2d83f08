"""Data-parallel scaling of our LoRA step: img/s on 1 vs N GPUs of one host (torch DDP over NCCL).

Each rank runs trainer_bridge.train's optimizer step as the loop does it under DDP: the UNet wrapped in
DistributedDataParallel exactly as train() wraps it, diffusion_loss on cached latents / text embeddings (random,
already on the GPU), loss / grad_accum, no_sync() on all but the last micro-step, grad clipping, fused AdamW,
the per-step all-reduce of the stop flag.
Random-init SD1.5 (512 px, bs 8 per GPU) and SDXL (1024 px, bs 4 per GPU) UNets, rank 32 on to_q/k/v/out.0, bf16.
The 1-GPU baseline is measured in the same run; one JSON line per (case, gpus), with efficiency =
img/s(N) / (N * img/s(1)).

    python bench/ddp_scaling.py --gpus 1 2 [--cases sd15 sdxl] [--grad-accum 1] [--compile] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_step import SD15, SDXL, batch, build  # noqa: E402

from bench._common import emit  # noqa: E402
from trainer_bridge.loss import diffusion_loss  # noqa: E402

CASES = {"sd15": ("sd15-512", SD15, 8), "sdxl": ("sdxl-1024", SDXL, 4)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(
    rank: int, world: int, port: int, case: str, grad_accum: int, iters: int, compile_: bool, q
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    name, cfg, bs = CASES[case]
    torch.manual_seed(0)
    unet, _, opt, params = build(cfg, 32, channels_last=False, compile_=False)
    from torch.nn.parallel import DistributedDataParallel as DDP

    kw = {"device_ids": [rank]}  # as trainer_bridge.train wraps the UNet
    new_name = "forward_sync_buffers" in inspect.signature(DDP).parameters
    kw["forward_sync_buffers" if new_name else "broadcast_buffers"] = False
    ddp = DDP(unet, find_unused_parameters=False, **kw) if world > 1 else unet
    fwd = torch.compile(ddp, dynamic=False) if compile_ else ddp
    x, h, added = batch(cfg, bs, channels_last=False)
    alphas = (
        torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
        .float()
        .cuda()
    )
    gen = torch.Generator("cuda").manual_seed(rank)

    def step():
        for a in range(grad_accum):  # the body of train()'s loop for one optimizer step
            gen.manual_seed(rank * 1000 + a)  # train() reseeds per batch: host-side, no sync
            with ddp.no_sync() if world > 1 and a < grad_accum - 1 else contextlib.nullcontext():
                loss = diffusion_loss(fwd, x, h, added, alphas, gen, autocast_dtype=torch.bfloat16)
                (loss / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (
            world > 1
        ):  # train()'s per-step stop flag (Ctrl-C on any rank stops all at the same step): one sync
            flag = torch.zeros(1, device="cuda")
            dist.all_reduce(flag)
            flag.item()
        return loss

    for _ in range(8 if compile_ else 3):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        loss = step()
    torch.cuda.synchronize()
    dt = torch.tensor([(time.perf_counter() - t0) / iters], device="cuda")
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    if rank == 0:
        q.put(dict(case=name, gpus=world, batch_per_gpu=bs, grad_accum=grad_accum, compile=compile_,
                   step_s=round(dt.item(), 4), img_s=round(world * bs * grad_accum / dt.item(), 2),
                   peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   loss_finite=bool(torch.isfinite(loss))))  # fmt: skip
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cases", nargs="+", default=["sd15", "sdxl"], choices=list(CASES))
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    n_dev = torch.cuda.device_count()
    print(json.dumps(dict(gpu=torch.cuda.get_device_name(), n_gpus=n_dev, torch=torch.__version__,
                          nccl=str(torch.cuda.nccl.version()))), flush=True)  # fmt: skip
    ctx = mp.get_context("spawn")
    for case in a.cases:
        base = None
        for n in sorted(set([1, *a.gpus])):  # the 1-GPU baseline first, in the same run
            if n > n_dev:
                print(json.dumps(dict(case=case, gpus=n, skipped=f"only {n_dev} GPU(s)")), flush=True)
                continue
            q = ctx.SimpleQueue()
            mp.start_processes(_rank, args=(n, _free_port(), case, a.grad_accum, a.iters, a.compile, q), nprocs=n,
                               join=True, start_method="spawn")  # fmt: skip
            res = q.get()
            base = base or res["img_s"]
            res["efficiency"] = round(res["img_s"] / (n * base), 3)
            emit(res, a.out)


if __name__ == "__main__":
    main()
