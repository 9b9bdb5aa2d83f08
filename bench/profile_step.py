"""Where the GPU time of one LoRA training step goes, and which attention backend is fastest at SD1.5's shapes.

    python bench/profile_step.py sdpa --out prof.jsonl              # fwd+bwd ms per SDPA backend, SD1.5 shapes
    python bench/profile_step.py kernels --batch 16 --levers graph  # kernel time by category, top kernels

`kernels` runs train_step.py's step (`--levers` as its variants: plain, graph, graph+bf16norm, ...) under
torch.profiler for a few steps after warm-up and sums the CUDA kernel time per category (conv, gemm, attention,
norm, elementwise, copy/cast, optimizer, other), next to the wall time per step: wall minus kernel time is the GPU
idle. One JSON line per figure on stdout, also appended to --out.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import emit  # noqa: E402

# SD1.5 at 512² (64x64 latents): self-attention per level (tokens, heads, head dim), cross-attention 77 keys
SD15_ATTN = [("self-64x64", 4096, 4096, 8, 40), ("self-32x32", 1024, 1024, 8, 80), ("self-16x16", 256, 256, 8, 160),
             ("cross-64x64", 4096, 77, 8, 40), ("cross-32x32", 1024, 77, 8, 80)]  # fmt: skip
CATEGORIES = [  # first match wins; kernel names of cuDNN / cuBLAS / flash / PyTorch native kernels
    ("attention", r"flash|fmha|attention|sdpa|cudnn_generated_fort_native_sdpa"),
    ("conv", r"conv|implicit|dgrad|wgrad|fprop|xmma_(fprop|dgrad)|cudnn::|nchwTo|nhwcTo|sm90_xmma"),
    ("gemm", r"gemm|cutlass|nvjet|cublas|splitK"),
    ("norm", r"norm|welford"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("copy/cast", r"copy|cast|convert|to_copy"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|gelu|mul|add|reduce|triton"),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"


def sdpa(out, bs: int, iters: int = 20) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends.append(("cudnn", SDPBackend.CUDNN_ATTENTION))
    for name, lq, lk, heads, hd in SD15_ATTN:
        q = torch.randn(bs, heads, lq, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(bs, heads, lk, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(bs, heads, lk, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(bs, heads, lq, hd, device="cuda", dtype=torch.bfloat16)
        flops = 4 * bs * heads * lq * lk * hd * 3.5  # forward 2 matmuls, backward 5 (of which 4 matmul-sized)
        rec = dict(what="sdpa", shape=name, batch=bs, q=list(q.shape), keys=lk)
        for bname, be in backends:
            try:
                with sdpa_kernel([be]):
                    for _ in range(3):
                        torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(g)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(g)
                    torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) / iters * 1e3
                rec[bname + "_ms"] = round(ms, 3)
                rec[bname + "_tflops"] = round(flops / ms / 1e9, 1)
            except Exception as e:  # noqa: BLE001
                rec[bname + "_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        emit(rec, out)


def kernels(out, bs: int, levers: str, steps: int = 3) -> None:
    from torch.profiler import ProfilerActivity, profile

    import bench.train_step as T

    torch.backends.cuda.matmul.allow_tf32 = True
    lv = set(levers.replace("-", "+").split("+"))
    cfg = T.SD15 if T.DEV == "cuda" else T.TINY
    unet, fwd, opt, params = T.build(cfg, 32, "cl" in lv, False)
    cl = T.apply_levers(unet, lv)["channels_last"] or "cl" in lv
    x, h, added = T.batch(cfg, bs, cl)
    gen = torch.Generator(T.DEV).manual_seed(0)
    fs = T.fast(fwd, opt, params) if "graph" in lv else None

    def one():
        return T.fast_step(fs, x, h, added, gen) if fs else T.step(fwd, opt, params, x, h, added, gen)

    for _ in range(4):
        one()
    T.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    T.sync()
    wall_ms = (time.perf_counter() - t0) / steps * 1e3
    acts = [ProfilerActivity.CUDA] if T.DEV == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(steps):
            one()
        T.sync()
    per: dict[str, float] = {}
    top: dict[str, list] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", 0) if T.DEV == "cuda" else ev.self_cpu_time_total
        if t <= 0 or ev.key.startswith(("cudaGraphLaunch", "ProfilerStep")):
            continue
        c = category(ev.key)
        per[c] = per.get(c, 0.0) + t
        top[ev.key] = [t / steps / 1e3, ev.count // steps, c]
    total = sum(per.values()) / steps / 1e3
    emit(dict(what="kernels", batch=bs, levers=levers, wall_ms=round(wall_ms, 2), kernel_ms=round(total, 2),
              idle_ms=round(wall_ms - total, 2),
              by_category_ms={c: round(t / steps / 1e3, 2) for c, t in sorted(per.items(), key=lambda kv: -kv[1])},
              top=[[k[:90], round(v[0], 2), v[1], v[2]] for k, v in sorted(top.items(), key=lambda kv: -kv[1][0])[:30]]),
         out)  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["sdpa", "kernels"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--levers", default="plain", help="kernels: comma-separated train_step variants")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--dry-run", action="store_true", help="kernels on the CPU over a tiny UNet (code paths only)"
    )
    a = ap.parse_args()
    if a.dry_run:
        import bench.train_step as T

        T.DEV = "cpu"
    if a.what == "sdpa":
        sdpa(a.out, a.batch)
    else:
        import gc

        for v in a.levers.split(","):
            kernels(a.out, a.batch, v)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
