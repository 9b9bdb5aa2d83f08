"""Throughput of our trainer's LoRA step (trainer_bridge.loss.diffusion_loss + fused AdamW + grad clipping) on
random-init SD1.5 / SDXL UNets with cached latents and text embeddings already on the GPU; rank 32 on
to_q/k/v/out.0, bf16 autocast. Prints one JSON line per case, with the fields of bench/peer/lora_step_peer.py.

    python bench/train_step.py [sd15] [sdxl] [--channels-last] [--compile] [--out results.jsonl]
    python bench/train_step.py --suite --out results.jsonl   # peer + ours, every variant, in one process

Variants (--variant): plain = the eager step; graph = trainer_bridge.fast_step (forward+backward and the
optimizer step as CUDA graph replays, the default of `curate train`); compile-graph = the same over a
torch.compile'd UNet (compile = true); regional-graph = the same with each repeated block compiled on its own
(compile = "regional", trainer_bridge/regions.py); +qkv fuses the q/k/v LoRA down-projections of every
self-attention into one matmul (trainer_bridge/fused_qkv.py), e.g. graph+qkv, regional-graph+qkv. --suite runs the peer (bench/peer/lora_step_peer.py) and ours
on the same shapes in the same process and appends each figure to --out as soon as it is measured.

    python bench/train_step.py --dry-run --suite --variants graph,regional-graph   # CPU, tiny UNet: code paths only

--dry-run runs the same code on the CPU over a tiny UNet (no peer, no CUDA graphs, regions compiled with the
aot_eager backend unless DRY_BACKEND=inductor), to check a suite's code paths before a device call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import emit  # noqa: E402  (one JSON line, also appended to --out)
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
TINY = dict(sample_size=8, cross_attention_dim=32, attention_head_dim=4, block_out_channels=(32, 64),
            norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))  # fmt: skip
DEV = "cuda"  # --dry-run: "cpu"
ALPHAS = torch.cumprod(
    1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0
).float()


def build(cfg: dict, rank: int, channels_last: bool, compile_: bool, checkpointing: bool = False):
    with torch.device(DEV):
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
    opt = build_optimizer("adamw", [{"params": params, "lr": 1e-4}], 1e-4, 0.01, DEV)
    fwd = torch.compile(unet) if compile_ else unet
    return unet, fwd, opt, params


def batch(cfg: dict, bs: int, channels_last: bool, size: int | None = None):
    s = size or cfg["sample_size"]
    x = torch.randn(bs, 4, s, s, device=DEV)  # cached latents stay fp32, as in the trainer
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    h = torch.randn(bs, 77, cfg["cross_attention_dim"], device=DEV, dtype=torch.bfloat16)
    added = None
    if "addition_embed_type" in cfg:
        added = dict(text_embeds=torch.randn(bs, 1280, device=DEV, dtype=torch.bfloat16),
                     time_ids=torch.randn(bs, 6, device=DEV, dtype=torch.bfloat16))  # fmt: skip
    return x, h, added


def step(fwd, opt, params, x, h, added, gen):
    """The body of trainer_bridge.train's loop for one optimizer step (grad_accum = 1)."""
    global ALPHAS
    if ALPHAS.device.type != DEV:
        ALPHAS = ALPHAS.to(DEV)
    loss = diffusion_loss(fwd, x, h, added, ALPHAS, gen, autocast_dtype=torch.bfloat16)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def fast(fwd, opt, params, max_grad_norm=1.0):
    """Our default step: trainer_bridge.fast_step.FastStep over the same UNet, optimizer and loss settings."""
    from trainer_bridge.fast_step import FastStep

    global ALPHAS
    ALPHAS = ALPHAS.to(DEV)
    return FastStep(fwd, params, opt, ALPHAS, {"autocast_dtype": torch.bfloat16}, max_grad_norm=max_grad_norm,
                    capture=DEV == "cuda")  # fmt: skip


def fast_step(fs, x, h, added, gen):
    loss = fs.micro_step(x, h, added, gen)
    fs.optimizer_step()
    return loss


_FLOPS: dict = {}


def heartbeat(t0: float, counters):
    """Every 15 s until the returned event is set, the compile's progress on stderr (graphs built so far), so a
    case cut by its time limit still shows how far it got."""
    import threading

    done = threading.Event()

    def beat():
        while not done.wait(15):
            n = counters["stats"]["unique_graphs"]
            print(
                f"compiling: {time.perf_counter() - t0:.0f} s, {n} graphs so far", file=sys.stderr, flush=True
            )

    threading.Thread(target=beat, daemon=True).start()
    return done


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def mem_gib(reserved: bool = False) -> float:
    if DEV != "cuda":
        return 0.0
    return round((torch.cuda.memory_reserved() if reserved else torch.cuda.max_memory_allocated()) / 2**30, 2)


def apply_levers(unet, levers: set[str]) -> dict:
    """The eager levers of a variant, applied in place: attention backend (cudnnattn / flashattn / effattn),
    clpatch (channels-last, transformer outputs kept NHWC), bf16norm, qkv. Returns what each did."""
    from trainer_bridge.kernels import bf16_norms, set_attention_backend

    attn = set_attention_backend({"cudnnattn": "cudnn", "flashattn": "flash", "effattn": "efficient"}.get(
        next((lv for lv in levers if lv.endswith("attn")), ""), "auto"))  # fmt: skip
    if "clpatch" in levers:  # channels-last convs and transformer outputs kept channels-last
        from trainer_bridge.kernels import channels_last as to_channels_last

        to_channels_last(unet)
    norms16 = bf16_norms(unet) if "bf16norm" in levers else 0  # GroupNorm / LayerNorm in bf16, not fp32
    pointwise = 0
    if "cpw" in levers:  # GroupNorm + GEGLU as small dynamic-shape inductor kernels (after bf16norm: wins)
        from trainer_bridge.kernels import compiled_pointwise

        pointwise = compiled_pointwise(unet, "inductor" if DEV == "cuda" else "aot_eager")
    fused_qkv = 0
    if "qkv" in levers:  # one matmul for the q/k/v LoRA down-projections of each self-attention
        from trainer_bridge.fused_qkv import fuse_qkv_lora

        fused_qkv = fuse_qkv_lora(unet)
    return dict(attention=attn, channels_last="clpatch" in levers, bf16_norms=norms16, fused_qkv=fused_qkv,
                pointwise=pointwise)  # fmt: skip


def run_variant(name, cfg, bs, variant, rank=32, blocks=3, iters=10, out=None, channels_last=False):
    """One figure of ours: build, warm up (capture / compile), time `blocks` x `iters` steps, report the median."""
    import gc

    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    reset_peak()
    levers = set(
        variant.replace("-", "+").split("+")
    )  # e.g. "graph", "compile+graph", "regional+graph", "graph+cudnn", "graph+cl"
    compile_, regional = "compile" in levers, "regional" in levers
    if DEV != "cuda":  # dry run: one step per block, kernels not compiled
        blocks, iters = 1, 1
    channels_last = channels_last or "cl" in levers
    torch.backends.cudnn.benchmark = "cudnn" in levers  # cuDNN tries the conv algorithms once per shape
    unet, fwd, opt, params = build(cfg, rank, channels_last, False)
    applied = apply_levers(unet, levers)
    channels_last = channels_last or applied["channels_last"]
    attn, norms16, fused_qkv = applied["attention"], applied["bf16_norms"], applied["fused_qkv"]
    if compile_:
        fwd = torch.compile(unet, dynamic=False, backend="inductor" if DEV == "cuda" else "aot_eager")
    x, h, added = batch(cfg, bs, channels_last)
    gen = torch.Generator(DEV).manual_seed(0)
    if (name, bs) not in _FLOPS:
        step(unet, opt, params, x, h, added, gen)
        sync()
        with FlopCounterMode(display=False) as fc:
            step(unet, opt, params, x, h, added, gen)
        _FLOPS[name, bs] = fc.get_total_flops()
    flops = _FLOPS[name, bs]
    regions = []
    if regional:  # after the FLOP count (an eager step): the blocks compile at the first step below
        import trainer_bridge.regions as R

        if DEV != "cuda":
            R.BACKEND = os.environ.get("DRY_BACKEND", "aot_eager")
        regions = R.compile_regions(unet)
    from torch._dynamo.utils import counters

    graphs0 = counters["stats"]["unique_graphs"]
    breaks0 = sum(counters["graph_break"].values())
    sync()
    reset_peak()  # the peak of this variant's own steps (weights + state stay counted)
    fs = fast(fwd, opt, params) if "graph" in levers else None

    def one():
        return fast_step(fs, x, h, added, gen) if fs else step(fwd, opt, params, x, h, added, gen)

    sync()
    t0 = time.perf_counter()
    done = heartbeat(t0, counters) if (compile_ or regional) else None
    one()  # graph: warm-up + capture; compile: compilation
    sync()
    first_s = time.perf_counter() - t0
    if done:
        done.set()
    graphs = counters["stats"]["unique_graphs"] - graphs0
    for _ in range(3):
        one()
    sync()
    times = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(iters):
            loss = one()
        sync()
        times.append((time.perf_counter() - t0) / iters)
    dt = sorted(times)[len(times) // 2]
    emit(dict(impl="trainer_bridge", variant=variant, case=name, batch=bs, rank=rank,
              compile="regional" if regional else compile_, channels_last=channels_last, it_s=round(1 / dt, 3), img_s=round(bs / dt, 2),
              step_ms=[round(t * 1e3, 2) for t in times], first_step_s=round(first_s, 1),
              tflop_per_step=round(flops / 1e12, 2), achieved_tflops=round(flops / dt / 1e12, 1),
              peak_mem_gib=mem_gib(), reserved_gib=mem_gib(reserved=True),
              graphs=fs.captures if fs else 0, graphed=bool(fs and fs.capture), regions=len(regions), fused_qkv=fused_qkv, bf16_norms=norms16, pointwise=applied["pointwise"], attention=attn,
              compiled_graphs=graphs, graph_breaks=sum(counters["graph_break"].values()) - breaks0,
              recompiles_after_first=counters["stats"]["unique_graphs"] - graphs0 - graphs,
              lora_params_m=round(sum(p.numel() for p in params) / 1e6, 2),
              loss_finite=bool(torch.isfinite(loss))), out)  # fmt: skip


def run_peer(name, bs, compile_=False, out=None):
    """One figure of the peer (diffusers + peft reference step), its own code and timing, tagged impl=peer."""
    import contextlib
    import io

    if DEV != "cuda":
        return emit(dict(impl="peer", case=name, batch=bs, skipped="dry run (CPU)"), out)

    sys.path.insert(0, str(Path(__file__).resolve().parent / "peer"))
    import lora_step_peer as P

    torch.backends.cudnn.benchmark = False  # the peer's own settings
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        P.run(name, P.SD15 if name.startswith("sd15") else P.SDXL, bs, compile_=compile_)
    res = json.loads(buf.getvalue().strip().splitlines()[-1])
    emit({"impl": "peer", **res}, out)


SHAPES = [("sd15-512", SD15, 1), ("sd15-512", SD15, 8), ("sd15-512", SD15, 16), ("sdxl-1024", SDXL, 1),
          ("sdxl-1024", SDXL, 4)]  # fmt: skip
DRY_SHAPES = [("sd15-tiny", TINY, 1), ("sd15-tiny", TINY, 8), ("sd15-tiny", TINY, 16)]  # --dry-run


def suite(out, variants, which, compiled_cases, batches=None):
    """Peer and ours side by side: per shape the peer, then each of our variants; compiled cases last."""
    torch.backends.cuda.matmul.allow_tf32 = True
    gpu = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)"
    emit(dict(gpu=gpu, torch=torch.__version__,
              diffusers=__import__("diffusers").__version__, peft=__import__("peft").__version__), out)  # fmt: skip

    def guarded(fn, *args, **kw):  # one failing figure must not cost the others
        try:
            fn(*args, **kw)
        except Exception as e:  # noqa: BLE001
            emit(dict(error=f"{type(e).__name__}: {str(e)[:300]}", args=[str(a)[:40] for a in args]), out)

    for name, cfg, bs in SHAPES if DEV == "cuda" else DRY_SHAPES:
        if name.split("-")[0] not in which or (batches and bs not in batches):
            continue
        guarded(run_peer, name, bs, out=out)
        for v in variants:
            guarded(run_variant, name, cfg, bs, v, out=out)
    for case in compiled_cases:  # e.g. "sd15-512:8:peer", "sd15-512:8:compile-graph", "sd15-512:8:peer-eager"
        name, bs, who = case.split(":")
        cfg = SD15 if name.startswith("sd15") else SDXL
        if DEV != "cuda":
            name, cfg = "sd15-tiny", TINY
        if who in ("peer", "peer-eager"):  # peer = the compiled peer, peer-eager its eager step
            guarded(run_peer, name, int(bs), compile_=who == "peer", out=out)
        else:
            guarded(run_variant, name, cfg, int(bs), who, out=out)


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
    ap.add_argument(
        "--variant",
        default="plain",
        help="plain | graph | compile-graph | regional-graph | graph+cudnn | graph+cl",
    )
    ap.add_argument("--suite", action="store_true", help="peer + ours side by side, every shape")
    ap.add_argument("--variants", default="graph,plain", help="with --suite: our variants per shape")
    ap.add_argument("--compiled", default="sd15-512:8:peer,sd15-512:8:compile-graph",
                    help="with --suite: name:batch:who cases run last (who = peer or a variant)")  # fmt: skip
    ap.add_argument("--batches", default="", help="with --suite: only these batch sizes, e.g. 8,16")
    ap.add_argument("--cases", default="", help="only these name:batch:who cases, in order (who: peer-eager, "
                    "peer = compiled peer, or one of our variants), e.g. sd15-512:8:peer-eager,sd15-512:8:graph")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny UNet: the code paths, no real figures")
    a = ap.parse_args()
    if a.dry_run:
        DEV = "cpu"
    if a.cases:
        suite(a.out, [], [], [c for c in a.cases.split(",") if c])
        sys.exit(0)
    if a.suite:
        bs_only = [int(b) for b in a.batches.split(",") if b]
        suite(
            a.out,
            [v for v in a.variants.split(",") if v],
            a.which,
            [c for c in a.compiled.split(",") if c],
            bs_only,
        )
        sys.exit(0)
    if a.variant != "plain":
        torch.backends.cuda.matmul.allow_tf32 = True
        for name, cfg, bs in SHAPES:
            if name.split("-")[0] in a.which:
                run_variant(name, cfg, bs, a.variant, out=a.out, channels_last=a.channels_last)
        sys.exit(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    head = json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__))
    print(head, flush=True)
    if "sd15" in a.which:
        for bs in (1, 8, 16):
            run("sd15-512", SD15, bs, channels_last=a.channels_last, compile_=a.compile, out=a.out)
    if "sdxl" in a.which:
        for bs in (1, 4):
            run("sdxl-1024", SDXL, bs, channels_last=a.channels_last, compile_=a.compile, out=a.out)
