"""The LoRA training loop, readable top to bottom (after nanoGPT's train.py).

    result = train(TrainConfig.from_toml("train.toml"))

Setup: load the base model, cache latents (and text embeddings when the text encoders are frozen) on the device,
wrap the target layers with LoRA. Loop: one bucket-batch per micro-step, loss on the device (no host sync inside
the step), optimizer step every grad_accum micro-steps, logging / sampling / saving on schedules.

Data parallel (`gpus = N`, torchrun, accelerate launch): torch DDP all-reduces the LoRA gradients; an optimizer step
consumes grad_accum * N consecutive per-device batches of the epoch (rank r takes every N-th one), and every random
draw is seeded by the batch's index, so N ranks compute what one process with grad_accum * N computes. The lines
marked `# DDP` are all there is to it (plus trainer_bridge/dist.py).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import random
import re
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer_bridge.config import TrainConfig, TrainError, check_output_dir
from trainer_bridge.epochs import EpochRecord


@dataclass
class TrainResult:
    lora_path: Path | None  # the final (or last saved) LoRA file
    state_path: Path | None  # resumable state folder, if one was written
    steps: int
    epoch: int
    losses: list[float] = field(default_factory=list)  # mean train loss per log interval
    val_losses: list[float] = field(default_factory=list)  # one per epoch, if there is a validation set
    interrupted: bool = False
    signal: int = 0  # the signal that stopped the run (SIGINT, SIGTERM), 0 for stop_after_steps
    # where the time went (seconds) and the steady-state speed: total_s, load_s, latent_cache_s, te_cache_s,
    # latents_encoded / latents_cached / latents_pruned, te_encoded / te_cached / te_pruned, steady_img_s (None: too
    # few clean intervals)
    timings: dict[str, Any] = field(default_factory=dict)
    epochs: list[EpochRecord] = field(default_factory=list)  # one per saved epoch (and the final file)
    warnings: list[str] = field(default_factory=list)  # the overfitting warning (epochs.py)
    epochs_grid: Path | None = None  # sample/epochs.png: a row per sample prompt, a column per saved epoch
    epochs_log: Path | None = None  # logs/epochs.json: the epochs table, best epoch and warnings
    earlier_run: Path | None = None  # output_dir/earlier/N: an earlier run's files, moved (never overwritten)
    # training images smaller than the resolution (curate.stages.bucket.small_images), None when there is none
    small_images: dict[str, Any] | None = None


def build_optimizer(name: str, groups: list[dict], lr: float, weight_decay: float, device_type: str):
    """AdamW (fused on CUDA), AdamW8bit (bitsandbytes), Prodigy (prodigyopt) or Adafactor (transformers)."""
    import torch

    name = name.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=device_type == "cuda")
    if name == "adamw8bit":
        if device_type != "cuda":
            raise TrainError('optimizer adamw8bit needs a CUDA GPU; use optimizer = "adamw" on this machine')
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainError("optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay)
    if name == "prodigy":
        if len({g["lr"] for g in groups}) > 1:
            raise TrainError("prodigy needs one learning rate: set text_encoder_lr = unet_lr (usually 1.0)")
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise TrainError("optimizer prodigy needs prodigyopt: pip install prodigyopt") from None
        return Prodigy(groups, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)  # fmt: skip
    raise TrainError(f"unknown optimizer {name!r}; choose adamw, adamw8bit, prodigy or adafactor")


def build_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    from diffusers.optimization import get_scheduler

    try:
        return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=total_steps,
                             num_cycles=cfg.lr_scheduler_num_cycles, power=cfg.lr_scheduler_power)  # fmt: skip
    except ValueError:
        raise TrainError(
            f"unknown lr_scheduler {cfg.lr_scheduler!r}; choose constant, constant_with_warmup, cosine, "
            "cosine_with_restarts, linear or polynomial"
        ) from None


def keep_earlier_run(out_dir: Path, name: str) -> tuple[Path, list[str]] | None:
    """Move an earlier run's <name>.safetensors, its epoch / step files, their -state/ folders and samples into
    out_dir/earlier/<N>/ (N: the next free number), so a new run never overwrites them; None if there are none."""
    pat = re.compile(re.escape(name) + r"(-\d{6}|-step\d{6})?(\.safetensors|-state)")
    found = sorted((f.name for f in out_dir.iterdir() if pat.fullmatch(f.name)),
                   key=lambda f: (f != f"{name}.safetensors", f))  # fmt: skip
    if not found:
        return None
    sample = re.compile(re.escape(name) + r"_\d{6}_\d{2}\.png|epochs\.png")  # its sample images and grid
    samples = [f"sample/{f.name}" for f in (out_dir / "sample").glob("*.png") if sample.fullmatch(f.name)]
    taken = [int(d.name) for d in (out_dir / "earlier").glob("*") if d.name.isdigit()]
    dest = out_dir / "earlier" / str(max(taken, default=0) + 1)
    (dest / "sample" if samples else dest).mkdir(parents=True)
    for f in found + samples:
        (out_dir / f).rename(dest / f)
    return dest, found


def train(config: TrainConfig | str | Path, **overrides: Any) -> TrainResult:
    """Train a LoRA as `config` says (a TrainConfig or a TOML path; keyword overrides win) and export it.

    With gpus > 1 this spawns the ranks and returns rank 0's result; under torchrun / accelerate launch each rank
    calls it and joins the group (ranks other than 0 get a result with lora_path None)."""
    from trainer_bridge import dist

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_toml(config)
    cfg = cfg.override(overrides) if overrides else cfg
    # DDP: spawn the ranks (each comes back here with WORLD_SIZE set), or join torchrun's / accelerate's group
    if cfg.gpus > 1 and dist.env_world() <= 1:
        return dist.spawn(cfg)
    own_group = dist.init(cfg)
    try:
        return _train(cfg)
    finally:
        if own_group:
            dist.cleanup()


def _printer(main: bool):
    """say(msg): print on rank 0, markup-escaped (messages carry paths); say.console also draws the progress bar."""
    import os

    from rich.console import Console
    from rich.markup import escape

    # curate train --json keeps stdout for the result: progress and messages go to stderr (DDP ranks inherit it)
    console = Console(highlight=False, soft_wrap=True, stderr=os.environ.get("CURATE_TRAIN_LOG") == "stderr")

    def say(msg: str) -> None:
        if main:
            console.print(escape(msg))

    say.console = console  # type: ignore[attr-defined]
    return say


def _recorded(cfg: TrainConfig) -> dict[str, Any]:
    """The config a state records, with absolute paths so the printed resume command works from anywhere."""
    d = dict(cfg.__dict__)
    for k in ("data", "val_data", "output_dir", "cache_dir", "log_dir", "base"):
        p = Path(d[k]).expanduser() if d[k] else None
        if p is not None and (k != "base" or p.exists()):
            d[k] = str(p.resolve())
    return d


def _train(cfg: TrainConfig) -> TrainResult:
    import torch

    from trainer_bridge import data as D
    from trainer_bridge import dist
    from trainer_bridge import epochs as E
    from trainer_bridge import lora as L
    from trainer_bridge.export import BASE_MODEL_VERSION, save_lora
    from trainer_bridge.loss import diffusion_loss
    from trainer_bridge.models import check_family, load_base
    from trainer_bridge.readback import Readback
    from trainer_bridge.state import check_resume, load_state, restore_rng, save_state

    rank, world = dist.rank(), dist.world()  # DDP: (0, 1) on one device
    main = rank == 0  # only rank 0 logs, samples and saves
    say = _printer(main)
    dev = dist.device()
    on_gpu = dev.type == "cuda"
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision) if on_gpu else None
    weight_dtype = amp or torch.float32
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    out_dir = check_output_dir(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    # ---------------------------------------------------------------- data + model
    # everything a user can get wrong is checked before the model loads: family, data, buckets, the resume state
    family, why = check_family(
        cfg.base, cfg.model_family
    )  # model_index.json / checkpoint keys, nothing loaded
    spec = D.read_dataset(cfg, family)
    cfg = cfg.override({"model_family": family, "resolution": spec.resolution})  # what the state records
    sdxl = family == "sdxl"
    resumed = load_state(cfg.resume) if cfg.resume else None  # a bad state fails here, in one line
    if resumed:
        check_resume(cfg, resumed[3])
    for note in ([why] if why else []) + spec.notes:
        say(note)
    items = D.list_items(spec.subsets, spec)
    repeats = D.epoch_repeats(items)  # reg images balanced against the training images, as sd-scripts
    items, repeats = [it for it, r in zip(items, repeats, strict=True) if r], [r for r in repeats if r]
    val_items = D.list_items(spec.val_subsets, spec) if spec.val_subsets else []
    if not any(not it.subset.is_reg for it in items):
        raise TrainError(f"no images found under {cfg.data}")
    bare = sum(1 for it in items if not it.subset.is_reg and not it.caption)
    caption_warnings = [f"{bare} of {sum(1 for it in items if not it.subset.is_reg)} training images have no "
                        "caption (no caption file, no class tokens from a N_name folder): they train on an empty "
                        "caption; run `curate tag` or add .txt files"] if bare else []  # fmt: skip
    small_note, small_info = D.small_images_warning(items, spec, D.export_sources(cfg.data))
    if small_note and not spec.bucket_no_upscale:  # enlarged without a word otherwise
        caption_warnings.append(small_note)
    elif small_note:
        say(small_note)
    for w in caption_warnings:
        say(f"warning: {w}")
    if cfg.block_dims or cfg.block_alphas:  # their length is the UNet's block count: checked before it loads
        from trainer_bridge import lycoris_net as LY

        want = LY.n_blocks_of(cfg.base, family)
        if want is not None:
            LY.check_blocks(cfg, family, want)
    earlier = keep_earlier_run(out_dir, cfg.output_name) if main and not resumed else None
    if earlier:
        more = f" and {len(earlier[1]) - 1} more file(s)" if len(earlier[1]) > 1 else ""
        say(f"an earlier run's {earlier[1][0]}{more} are kept in {earlier[0]} "
            f"(this run writes {out_dir / cfg.output_name}.safetensors)")  # fmt: skip
        if f"{cfg.output_name}.safetensors" not in earlier[1] and f"{cfg.output_name}-state" in earlier[1]:
            say(f"that run had stopped; to continue it instead: Ctrl-C, then "
                f"curate train --resume {earlier[0] / (cfg.output_name + '-state')}")  # fmt: skip
    timings: dict[str, Any] = {}
    t_phase = time.perf_counter()
    base = load_base(cfg.base, family, cfg.v_prediction)
    unet, vae, tes, toks = base.unet, base.vae, base.text_encoders, base.tokenizers
    v_pred = base.scheduler.config.prediction_type == "v_prediction"
    alphas_cumprod = base.scheduler.alphas_cumprod.to(dev, torch.float32)
    timings["load_s"] = time.perf_counter() - t_phase

    # latents: encoded once in fp32 (no NaN from fp16 VAEs), batched by bucket, cached on disk, kept on the device
    t_phase = time.perf_counter()
    vae.requires_grad_(False).to(dev, torch.float32).eval()
    cache_dir = Path(cfg.cache_dir or out_dir / "cache") if cfg.cache_latents or world > 1 else None
    vid = D.vae_id(vae, base.name)
    all_items = items + val_items
    flips = [it.subset.flip_aug for it in items] + [False] * len(val_items)
    if main:  # DDP: rank 0 encodes and writes the disk cache; the other ranks wait, then only read it
        encoded = D.encode_latents(all_items, vae, dev, cache_dir, vid, flips, batch_size=cfg.latent_batch_size,
                                   console=say.console, stats=timings)  # fmt: skip
    dist.barrier()
    if not main:
        encoded = D.encode_latents(all_items, vae, dev, cache_dir, vid, flips, read_only=True)
    vae.to("cpu")  # only needed again for samples
    timings["latent_cache_s"] = time.perf_counter() - t_phase
    buckets = sorted({it.bucket for it in all_items})
    bucket_of = [buckets.index(it.bucket) for it in all_items]
    row_of, lat, lat_flip = [], [], []
    for b in range(len(buckets)):
        members = [i for i, bi in enumerate(bucket_of) if bi == b]
        lat.append(torch.stack([encoded[i][0] for i in members]).to(dev))
        flipped = [encoded[i][1] for i in members]
        if any(f is not None for f in flipped):
            lat_flip.append(
                torch.stack(
                    [f if f is not None else encoded[i][0] for f, i in zip(flipped, members, strict=True)]
                ).to(dev)
            )
        else:
            lat_flip.append(lat[-1])  # no flipped copies in this bucket: latents_for() skips the flip draw
    rows_in_bucket: dict[int, int] = {}
    for bi in bucket_of:
        row_of.append(rows_in_bucket.get(bi, 0))
        rows_in_bucket[bi] = row_of[-1] + 1
    row_of_t = torch.tensor(row_of, device=dev)
    can_flip = torch.tensor(flips, device=dev)
    # per-item loss weight: prior_loss_weight for regularization images, 1 for the rest (sd-scripts' loss_weights)
    loss_w = torch.tensor(
        [cfg.prior_loss_weight if it.subset.is_reg else 1.0 for it in all_items], device=dev
    )
    time_ids = torch.tensor([[it.size[1], it.size[0], *encoded[i][2], it.bucket[1], it.bucket[0]]
                             for i, it in enumerate(all_items)], device=dev, dtype=weight_dtype)  # fmt: skip

    # text encoders: trained with LoRA when text_encoder_lr > 0, else frozen and (optionally) cached
    train_te = cfg.text_encoder_lr > 0
    # what the subsets (the dataset TOML's [general] / subset values, else [train]) really do, for the metadata
    trained = [s for s in spec.subsets if not s.is_reg] or spec.subsets
    any_shuffle = any(s.shuffle_caption for s in spec.subsets)
    cache_te = cfg.cache_text_encoder_outputs and not train_te and not any_shuffle
    t_phase = time.perf_counter()
    tid = D.te_id(toks, tes, base.name, cfg.clip_skip, f"{weight_dtype}/{amp}") if cache_te else ""
    for te in tes:
        te.requires_grad_(False).to(dev, weight_dtype).eval()
    unet.requires_grad_(False).to(dev, weight_dtype)
    captions = [it.caption for it in all_items]
    if cache_te:
        # every distinct caption (and "" for caption dropout) once, batched, kept on disk beside the latents
        te_dir = Path(cfg.cache_dir or out_dir / "cache") / "te"
        te_args = (toks, tes, captions + [""], dev, cfg.clip_skip, te_dir, tid, weight_dtype, amp)
        if main:
            emb_all, pooled_all = D.encode_text_cached(*te_args, console=say.console, stats=timings)
        dist.barrier()
        if not main:
            emb_all, pooled_all = D.encode_text_cached(*te_args, read_only=True)
        emb_all, emb_empty = emb_all[:-1], emb_all[-1:]
        pooled_all, pooled_empty = (pooled_all[:-1], pooled_all[-1:]) if sdxl else (None, None)
        if cfg.sample_every_n_steps <= 0:
            for te in tes:
                te.to("cpu")  # frees memory; sampling would need them back

    timings["te_cache_s"] = time.perf_counter() - t_phase

    # LoRA (trainable weights in fp32; the frozen base in weight_dtype); LoHa/LoKr/DoRA/presets: lycoris_net.py
    from trainer_bridge import lycoris_net as LY

    lyco = LY.build(unet, tes, cfg, sdxl, train_te) if LY.uses_lycoris(cfg) else None
    mods, te_mods = [], []
    if lyco is None:
        mods = L.inject_unet(unet, cfg.network_dim, cfg.network_alpha, cfg.network_dropout, cfg.network_train_ff,
                             cfg.conv_dim, cfg.conv_alpha, sdxl=sdxl)  # fmt: skip
        if train_te:
            prefixes = ["lora_te1", "lora_te2"] if sdxl else ["lora_te"]
            for te, prefix in zip(tes, prefixes, strict=True):
                te_mods += L.inject_text_encoder(
                    te, prefix, cfg.network_dim, cfg.network_alpha, cfg.network_dropout
                )
    for te in tes if train_te else []:
        te.train()
    all_mods = mods + te_mods
    for m in all_mods:
        m.lora_down.float().requires_grad_(True)
        m.lora_up.float().requires_grad_(True)
    all_mods = lyco.modules if lyco else all_mods  # below: eval() / train() around validation and samples

    def net_sd(dtype):
        return lyco.state_dict(dtype) if lyco else L.lora_state_dict(all_mods, dtype)

    unet.train()
    # norms in bf16, not autocast's fp32 round trip; compiled code fuses those casts itself (and was measured so)
    switched_norms = 0
    if amp is torch.bfloat16 and cfg.norms == "auto" and not cfg.compile:
        from trainer_bridge.kernels import bf16_norms

        switched_norms = bf16_norms(unet)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in tes if train_te else []:
            te.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )  # DDP-safe
    # DDP: wrap what has trainable (LoRA) parameters so their gradients are all-reduced; the frozen base is not synced
    ddp_mods, te_fwd, unet_ddp = [], tes, unet
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # no buffer sync: the frozen base is identical on every rank (newer torch renames broadcast_buffers)
        kw = {"device_ids": [dev.index] if dev.type == "cuda" else None}
        new_name = "forward_sync_buffers" in inspect.signature(DDP).parameters
        kw["forward_sync_buffers" if new_name else "broadcast_buffers"] = False
        unet_ddp = DDP(unet, find_unused_parameters=False, **kw)
        if train_te:  # SDXL reads CLIP-L's penultimate layer: its last layer's LoRA gets no gradient
            te_fwd = [DDP(te, find_unused_parameters=sdxl, **kw) for te in tes]
        ddp_mods = [unet_ddp, *(te_fwd if train_te else [])]
    # compile = true: one static graph of the whole UNet per bucket shape; "regional": each repeated block compiled
    # in place (identical blocks share compiled code), the UNet itself called as is; the fast step graphs it
    unet_fwd = torch.compile(unet_ddp, dynamic=False) if cfg.compile is True else unet_ddp
    if cfg.compile and dev.type != "cuda":
        say("warning: compile on a CPU first builds C++ kernels for every block and bucket shape (minutes) and "
            "rarely trains faster; it is meant for CUDA GPUs (set compile = false here)")  # fmt: skip
    if cfg.compile == "regional":  # with channels-last convs: 141 vs 136 img/s at SD1.5 bs8 (bench/README.md)
        from trainer_bridge.kernels import channels_last
        from trainer_bridge.regions import compile_regions

        channels_last(unet)
        compile_regions(unet)
    params = lyco.parameters() if lyco else L.lora_parameters(all_mods)
    groups = [{"params": lyco.parameters("unet") if lyco else L.lora_parameters(mods), "lr": cfg.unet_lr}]
    if te_mods or (lyco and lyco.te_nets):
        te_params = lyco.parameters("te") if lyco else L.lora_parameters(te_mods)
        groups.append({"params": te_params, "lr": cfg.text_encoder_lr})
    optimizer = build_optimizer(cfg.optimizer, groups, cfg.unet_lr, cfg.weight_decay, dev.type)
    scaler = torch.amp.GradScaler(dev.type) if amp is torch.float16 else None

    n_train = len(items)
    sampler = D.BucketBatchSampler([it.bucket for it in items], repeats, spec.batch_size, cfg.seed)
    batches_per_epoch = len(sampler)
    per_step = cfg.grad_accum * world  # DDP: per-device batches one optimizer step consumes, over all ranks
    steps_per_epoch = math.ceil(batches_per_epoch / per_step)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = build_scheduler(cfg, optimizer, total_steps)

    # random streams: noise/timesteps/flip/dropout on the device; captions + multires on the host. Both are reseeded
    # from (seed, per-device batch index) at every micro-batch, so the draws do not depend on which rank runs a batch
    gen = torch.Generator(dev).manual_seed(cfg.seed)
    host_rng = random.Random(cfg.seed)
    global_step, start_epoch, start_batch = 0, 0, 0
    if resumed:
        lora_sd, opt_sd, sched_sd, info, rng = resumed
        try:
            lyco.load_state_dict(lora_sd) if lyco else L.load_lora_state_dict(all_mods, lora_sd)
            optimizer.load_state_dict(opt_sd)
            scheduler.load_state_dict(sched_sd)
        except (KeyError, ValueError, RuntimeError) as e:
            raise TrainError(f"the state {cfg.resume} does not fit this network or optimizer ({e})") from None
        restore_rng(rng, {"noise": gen})
        hs = info["host_rng"]
        host_rng.setstate((hs[0], tuple(hs[1]), hs[2]))
        global_step, start_epoch, start_batch = info["step"], info["epoch"], info["batch"]
        if main and info.get("per_step", per_step) != per_step:
            import warnings

            warnings.warn(f"resuming with {per_step} batches per step instead of {info['per_step']}: the data position "
                          "is kept, the step count and lr schedule continue with the new global batch", stacklevel=2)  # fmt: skip

    # fixed validation noise and timesteps, so the per-epoch val loss is comparable across epochs and runs
    val_idx = list(range(n_train, len(all_items)))
    vgen = torch.Generator(dev).manual_seed(cfg.seed + 1)
    val_noise = {i: torch.randn(lat[bucket_of[i]].shape[1:], device=dev, generator=vgen) for i in val_idx}
    val_t = torch.linspace(cfg.min_timestep, cfg.max_timestep - 1, max(len(val_idx), 1)).long().to(dev)

    def conditioning(idx: torch.Tensor, batch: list[int], train_mode: bool):
        """Text conditioning (+ SDXL added conditioning) for the items `idx` (device) / `batch` (host)."""
        if cache_te:
            emb = emb_all[idx]
            pooled_b = pooled_all[idx] if sdxl else None
            if train_mode and cfg.caption_dropout:
                drop = torch.rand(len(batch), device=dev, generator=gen) < cfg.caption_dropout
                emb = torch.where(drop[:, None, None], emb_empty, emb)
                pooled_b = torch.where(drop[:, None], pooled_empty, pooled_b) if sdxl else None
        else:
            caps = [captions[i] for i in batch]
            if train_mode:
                caps = [D.process_caption(c, all_items[i].subset.keep_tokens, all_items[i].subset.shuffle_caption,
                                          cfg.caption_dropout, host_rng) for c, i in zip(caps, batch, strict=True)]  # fmt: skip
            with (
                torch.set_grad_enabled(train_te and train_mode),
                torch.autocast(dev.type, amp or torch.float32, enabled=amp is not None),
            ):
                encoders = te_fwd if train_mode else tes  # DDP: the wrapped text encoders while training
                emb, pooled_b = D.encode_prompts(toks, encoders, caps, dev, cfg.clip_skip)
        added = {"text_embeds": pooled_b, "time_ids": time_ids[idx]} if sdxl else None
        return emb, added

    def latents_for(idx: torch.Tensor, bucket: int, train_mode: bool) -> torch.Tensor:
        rows = row_of_t[idx]
        x = lat[bucket][rows]
        if train_mode and lat_flip[bucket] is not lat[bucket]:
            flip = (torch.rand(len(rows), device=dev, generator=gen) < 0.5) & can_flip[idx]
            x = torch.where(flip[:, None, None, None], lat_flip[bucket][rows], x)
        return x

    loss_kw = dict(v_prediction=v_pred, min_snr_gamma=cfg.min_snr_gamma, noise_offset=cfg.noise_offset,
                   multires_iterations=cfg.multires_noise_iterations, multires_discount=cfg.multires_noise_discount,
                   min_timestep=cfg.min_timestep, max_timestep=cfg.max_timestep, autocast_dtype=amp)  # fmt: skip
    # speed: the step as CUDA graph replays where that works (trainer_bridge/fast_step.py); None = the plain step
    from trainer_bridge.fast_step import make_fast_step

    fast = make_fast_step(cfg, unet_fwd=unet_fwd, params=params, optimizer=optimizer, alphas_cumprod=alphas_cumprod,
                          loss_kw=loss_kw, device=dev, world=world, train_te=train_te, scaler=scaler)  # fmt: skip
    if fast is not None and (lyco is not None or any(it.subset.is_reg for it in items)):
        fast = None  # the graph step has no per-sample loss weights: with reg images (prior_loss_weight) step plainly
    # which step and kernels this run uses, for --json and the bench (plain / eager / graph; norms bf16 / fp32)
    timings["step"] = "plain" if fast is None else "graph" if fast.capture else "eager"
    timings["norms"] = "bf16" if switched_norms else "fp32" if amp is not None else "none"
    timings["compile"] = cfg.compile

    @torch.no_grad()
    def validation_loss() -> float:
        for m in all_mods:
            m.eval()
        total = torch.zeros((), device=dev)
        mine = val_idx[rank::world]  # DDP: each rank sums the loss of its share of the validation items
        for b in range(len(buckets)):
            members = [i for i in mine if bucket_of[i] == b]
            for k in range(0, len(members), spec.batch_size):
                batch = members[k : k + spec.batch_size]
                idx = torch.tensor(batch, device=dev)
                emb, added = conditioning(idx, batch, train_mode=False)
                noise = torch.stack([val_noise[i] for i in batch])
                t = val_t[torch.tensor([val_idx.index(i) for i in batch], device=dev)]
                x = latents_for(idx, b, train_mode=False)
                total += diffusion_loss(unet_fwd, x, emb, added, alphas_cumprod, gen, noise=noise, timesteps=t,
                                        **{k: v for k, v in loss_kw.items() if k in ("v_prediction", "min_snr_gamma", "autocast_dtype")}) * len(batch)  # fmt: skip
        for m in all_mods:
            m.train()
        sums = dist.all_reduce_sum(torch.stack([total, torch.full_like(total, float(len(mine)))]))  # DDP
        return (sums[0] / sums[1]).item()

    # ---------------------------------------------------------------- bookkeeping
    log_dir = Path(cfg.log_dir or out_dir / "logs")
    writer = None
    with contextlib.suppress(ImportError):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(log_dir)) if main else None
    session_id = uuid.uuid4().hex[:8]
    save_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(
        cfg.save_precision, torch.float16
    )
    all_listed = D.list_items(
        spec.subsets, spec
    )  # with the reg images past the balance (sd-scripts counts them)
    num_train = sum(it.subset.num_repeats for it in all_listed if not it.subset.is_reg)
    num_reg = sum(it.subset.num_repeats for it in all_listed if it.subset.is_reg)
    bucket_counts: dict[tuple[int, int], int] = {}
    for it, r in zip(items, repeats, strict=True):
        bucket_counts[it.bucket] = bucket_counts.get(it.bucket, 0) + r

    def metadata(epoch: int, step: int) -> dict[str, Any]:
        arch = "stable-diffusion-xl-v1-base/lora" if sdxl else "stable-diffusion-v1/lora"
        return {
            "ss_session_id": session_id, "ss_training_started_at": started, "ss_training_finished_at": time.time(),
            "ss_output_name": cfg.output_name, "ss_learning_rate": cfg.unet_lr, "ss_unet_lr": cfg.unet_lr,
            "ss_text_encoder_lr": cfg.text_encoder_lr, "ss_num_train_images": num_train,
            "ss_num_reg_images": num_reg, "ss_prior_loss_weight": cfg.prior_loss_weight,
            "ss_num_validation_images": len(val_items), "ss_num_batches_per_epoch": batches_per_epoch, "ss_num_epochs": epochs,
            "ss_epoch": epoch, "ss_steps": step, "ss_max_train_steps": total_steps, "ss_batch_size_per_device": spec.batch_size,
            "ss_gradient_checkpointing": cfg.gradient_checkpointing, "ss_gradient_accumulation_steps": cfg.grad_accum,
            "ss_lr_warmup_steps": cfg.lr_warmup_steps, "ss_lr_scheduler": cfg.lr_scheduler,
            "ss_network_module": "lycoris.kohya" if lyco else "networks.lora", "ss_network_dim": cfg.network_dim,
            "ss_network_alpha": cfg.network_alpha, "ss_network_dropout": cfg.network_dropout,
            "ss_network_args": LY.network_args(cfg) if lyco else {"conv_dim": str(cfg.conv_dim), "conv_alpha": f"{cfg.conv_alpha:g}"} if cfg.conv_dim else {},
            "ss_mixed_precision": cfg.mixed_precision if amp else "no", "ss_full_fp16": False, "ss_v2": False,
            "ss_base_model_version": BASE_MODEL_VERSION[cfg.model_family], "ss_v_parameterization": v_pred,
            "ss_clip_skip": cfg.clip_skip or "None", "ss_max_token_length": "None", "ss_cache_latents": cfg.cache_latents,
            "ss_seed": cfg.seed, "ss_noise_offset": cfg.noise_offset, "ss_multires_noise_iterations": cfg.multires_noise_iterations,
            "ss_multires_noise_discount": cfg.multires_noise_discount, "ss_min_snr_gamma": cfg.min_snr_gamma,
            "ss_scale_weight_norms": cfg.scale_weight_norms, "ss_max_grad_norm": cfg.max_grad_norm,
            "ss_optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}(weight_decay={cfg.weight_decay})",
            "ss_caption_dropout_rate": cfg.caption_dropout, "ss_keep_tokens": max((s.keep_tokens for s in trained), default=0),
            "ss_shuffle_caption": any_shuffle, "ss_flip_aug": any(s.flip_aug for s in trained), "ss_min_timestep": cfg.min_timestep,
            "ss_max_timestep": cfg.max_timestep, "ss_training_comment": cfg.training_comment,
            "ss_resolution": f"({spec.resolution}, {spec.resolution})", "ss_enable_bucket": spec.enable_bucket,
            "ss_bucket_no_upscale": spec.bucket_no_upscale,
            "ss_min_bucket_reso": spec.min_bucket_reso, "ss_max_bucket_reso": spec.max_bucket_reso,
            "ss_bucket_info": {"buckets": {str(i): {"resolution": list(b), "count": n}
                                           for i, (b, n) in enumerate(sorted(bucket_counts.items()))}, "mean_img_ar_error": 0.0},
            "ss_tag_frequency": D.tag_frequency(all_listed), "ss_dataset_dirs": D.dataset_dirs(all_listed, reg=False),
            "ss_reg_dataset_dirs": D.dataset_dirs(all_listed, reg=True),
            # per subset (a dataset TOML may pin keep_tokens in one subset and not another), as sd-scripts writes
            "ss_datasets": [{"is_dreambooth": True, "batch_size_per_device": spec.batch_size,
                             "num_train_images": num_train, "num_reg_images": num_reg,
                             "resolution": [spec.resolution, spec.resolution], "enable_bucket": spec.enable_bucket,
                             "min_bucket_reso": spec.min_bucket_reso, "max_bucket_reso": spec.max_bucket_reso,
                             "subsets": D.subsets_metadata(all_listed)}],
            "ss_sd_model_name": base.name, "ss_sd_model_hash": base.model_hash, "ss_new_sd_model_hash": base.new_model_hash,
            "ss_vae_name": "None",
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers",
            "modelspec.title": cfg.output_name, "modelspec.resolution": f"{spec.resolution}x{spec.resolution}",
            "modelspec.prediction_type": "v" if v_pred else "epsilon",
            # curate's own keys: the per-epoch validation loss (fixed noise and timesteps), the last one first
            **({"curate_val_loss": result.val_losses[-1], "curate_val_losses": result.val_losses} if result.val_losses else {}),
            # this epoch's mean train loss, and the epochs table so far (the final file's is the whole run's)
            **({"curate_train_loss": result.epochs[-1].train_loss, "curate_epochs": E.summary(result.epochs)}
               if result.epochs and result.epochs[-1].step == step else {}),
        }  # fmt: skip

    def save(
        name: str, epoch: int, step: int, batch: int, with_state: bool, state_name: str = ""
    ) -> tuple[Path | None, Path | None]:
        """Write <name>.safetensors and (with_state) the resumable <state_name or name-state>/ folder."""
        if not main:  # DDP: the LoRA is the same on every rank; rank 0 writes it
            return None, None
        path = save_lora(out_dir / f"{name}.safetensors", net_sd(save_dtype), metadata(epoch, step))
        state = None
        if with_state:
            info = {
                "step": step,
                "epoch": epoch,
                "batch": batch,  # per-device batches of the epoch consumed (by all ranks together)
                "per_step": per_step,
                "world": world,
                "host_rng": host_rng.getstate(),
                "epochs": [r.to_dict() for r in result.epochs],  # the epochs table continues after a resume
                "val_losses": result.val_losses,
                "config": _recorded(cfg),  # `curate train --resume STATE` alone continues from this
            }
            state = save_state(out_dir / (state_name or f"{name}-state"), net_sd(torch.float32), optimizer,
                               scheduler, json.loads(json.dumps(info, default=str)), {"noise": gen})  # fmt: skip
        return path, state

    def sample(step: int) -> list[str]:
        """One image per sample prompt with the LoRA as it is now; returns their names inside output_dir."""
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        for m in all_mods:
            m.eval()
        vae.to(dev)
        for te in tes:
            te.to(dev)
        sched = EulerDiscreteScheduler.from_config(base.scheduler.config)
        if sdxl:
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=tes[0], text_encoder_2=tes[1], tokenizer=toks[0],
                                             tokenizer_2=toks[1], unet=unet, scheduler=sched)  # fmt: skip
        else:
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=tes[0], tokenizer=toks[0], unet=unet, scheduler=sched,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        sample_dir = out_dir / "sample"
        sample_dir.mkdir(exist_ok=True)
        skip = (
            {"clip_skip": cfg.clip_skip - 1} if cfg.clip_skip > 1 and not sdxl else {}
        )  # diffusers: 1 = penultimate
        names = []
        with torch.no_grad(), torch.autocast(dev.type, amp or torch.float32, enabled=amp is not None):
            for k, prompt in enumerate(cfg.sample_prompts):
                g = torch.Generator(dev).manual_seed(cfg.seed + k)
                img = pipe(prompt, num_inference_steps=cfg.sample_steps, generator=g, height=spec.resolution,
                           width=spec.resolution, **skip).images[0]  # fmt: skip
                img.save(sample_dir / f"{cfg.output_name}_{step:06d}_{k:02d}.png")
                names.append(f"sample/{cfg.output_name}_{step:06d}_{k:02d}.png")
                if writer:
                    import numpy as np

                    writer.add_image(f"sample/{k}", np.asarray(img), step, dataformats="HWC")
        vae.to("cpu")
        for te in tes if cache_te and cfg.sample_every_n_steps <= 0 else []:
            te.to("cpu")  # only the per-epoch samples need them: free the memory again
        for m in all_mods:
            m.train()
        sampled[step] = names
        return names

    sampled: dict[int, list[str]] = {}  # step -> sample images written at it

    def record_epoch(ep: int, file: str, train_loss: float | None) -> None:
        """The epochs-table row of a saved epoch (rank 0 samples it when sample_prompts are set)."""
        names = sampled.get(global_step) or (sample(global_step) if main and cfg.sample_prompts else [])
        val = result.val_losses[-1] if val_idx else None
        result.epochs.append(EpochRecord(ep, global_step, train_loss, val, file, samples=names))
        warning = E.overfitting(result.epochs)
        if warning and warning not in result.warnings:
            result.warnings.append(warning)
            say(f"warning: {warning}")
            if writer:
                writer.add_text("warnings", warning, global_step)

    def prune() -> None:
        """keep_last_n: delete older epoch files (and their states), never the best epoch's."""
        import shutil

        final = f"{cfg.output_name}.safetensors"
        for r in E.keep_files(result.epochs, cfg.keep_last_n, final) if main else []:
            (out_dir / r.file).unlink(missing_ok=True)
            shutil.rmtree(out_dir / (r.file.removesuffix(".safetensors") + "-state"), ignore_errors=True)
            r.removed = True

    stop = {"flag": False, "signal": 0}  # Ctrl-C and SIGTERM both stop after the step and save a state
    old_handlers = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # signal handlers only in the main thread
            old_handlers[signum] = signal.signal(signum, lambda n, _f: stop.update(flag=True, signal=n))

    # ---------------------------------------------------------------- the loop
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    result = TrainResult(None, None, global_step, start_epoch)
    result.small_images = small_info
    result.earlier_run = earlier[0] if earlier else None
    result.warnings += caption_warnings
    if resumed:  # the epochs table and val losses of the run so far
        result.epochs = [EpochRecord.from_dict(d) for d in resumed[3].get("epochs", [])]
        result.val_losses = list(resumed[3].get("val_losses", []))
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=say.console,
        disable=not main,
    )
    task = progress.add_task("training", total=total_steps, completed=global_step)
    # this log interval's train loss: the sum on the device, the count on the host
    loss_sum, loss_n = torch.zeros((), device=dev), 0
    ep_sum, ep_n = torch.zeros((), device=dev), 0  # this epoch's train loss (for the epochs table)
    epoch = start_epoch
    # steady-state speed: images over the time between log points' losses reaching the host (the GPU has run those
    # steps then), leaving out the first interval and any interval with a batch shape not seen before (graph
    # capture, compile, cuDNN autotune)
    steady = {"img": 0, "s": 0.0, "iv_t": None, "iv_img": 0, "dirty": True, "shapes": set()}
    t_loop = time.perf_counter()
    # the interval losses come back from the device without a host sync (trainer_bridge/readback.py); show() takes
    # them as they arrive, with what the log point recorded: step -> epoch, images, dirty
    readback = Readback(dev)
    logged: dict[int, dict[str, Any]] = {}
    last_shown = {"t": time.time(), "step": global_step}

    def show(arrived: list[tuple[int, float]]) -> None:
        """Log interval losses that reached the host: result.losses, tensorboard, the progress bar, the speed."""
        for step, avg in arrived:
            at = logged.pop(step)
            now = time.perf_counter()
            if steady["iv_t"] is not None and not at["dirty"]:
                steady["img"] += at["img"]
                steady["s"] += now - steady["iv_t"]
            steady["iv_t"] = now
            dt = time.time() - last_shown["t"]
            it_s = (step - last_shown["step"]) / dt if dt else 0.0
            last_shown.update(t=time.time(), step=step)
            vram = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0
            result.losses.append(avg)
            progress.update(
                task, description=f"epoch {at['epoch'] + 1} loss {avg:.4f} {it_s:.2f} it/s {vram:.1f} GiB"
            )
            if writer:
                writer.add_scalar("loss/train", avg, step)
                writer.add_scalar("perf/it_per_s", it_s, step)

    def finish(r: TrainResult) -> TrainResult:
        timings["train_s"] = time.perf_counter() - t_loop
        timings["steady_img_s"] = steady["img"] / steady["s"] if steady["s"] > 0 else None
        timings["steady_steps_s"] = steady["s"]
        timings["total_s"] = time.time() - started
        r.timings = timings
        return r

    progress.start()
    try:
        for epoch in range(start_epoch, epochs):
            batches = sampler.epoch(epoch)
            n = len(batches)
            flat = torch.tensor(
                [i for b in batches for i in b], device=dev
            )  # one host->device copy per epoch
            offsets = [0]
            for b in batches:
                offsets.append(offsets[-1] + len(b))
            first = start_batch if epoch == start_epoch else 0
            for pos in range(first, n, per_step):  # one optimizer step: batches pos .. pos + per_step - 1
                # DDP: micro-step a of rank r takes batch pos + a * world + r (None: nothing left for this rank)
                mine = dist.micro_batches(n, pos, per_step, world, rank)
                for a, bi in enumerate(mine):
                    real = bi is not None  # else run batch 0 with loss x 0, so DDP's all-reduce still matches
                    bi = bi if real else 0
                    seed_j = dist.seed_for(cfg.seed, epoch * n + bi)
                    gen.manual_seed(seed_j)  # host-side reseeds: no device sync
                    host_rng.seed(seed_j)
                    torch.manual_seed(seed_j)  # LoRA dropout
                    batch = batches[bi]
                    idx = flat[offsets[bi] : offsets[bi + 1]]
                    bucket = bucket_of[batch[0]]
                    if (bucket, len(batch)) not in steady["shapes"]:
                        steady["shapes"].add((bucket, len(batch)))
                        steady["dirty"] = True
                    steady["iv_img"] += len(batch) * world if real else 0
                    sync = a == len(mine) - 1
                    with contextlib.ExitStack() as no_sync:
                        for m in ddp_mods if not sync else []:  # DDP: all-reduce only on the last micro-step
                            no_sync.enter_context(m.no_sync())
                        emb, added = conditioning(idx, batch, train_mode=True)
                        x = latents_for(idx, bucket, train_mode=True)
                        if fast is not None:  # speed: forward + backward = one graph replay per bucket shape
                            loss = fast.micro_step(x, emb, added, gen, host_rng)
                        else:
                            loss = diffusion_loss(unet_fwd, x, emb, added, alphas_cumprod, gen, rng=host_rng,
                                                  weights=loss_w[idx], **loss_kw)  # fmt: skip
                            scaled = loss / cfg.grad_accum if real else loss * 0.0
                            (scaler.scale(scaled) if scaler else scaled).backward()
                    if real:
                        loss_sum += loss.detach()
                        loss_n += 1
                        ep_sum += loss.detach()
                        ep_n += 1
                # optimizer step
                if fast is not None:  # speed: clip + AdamW + zero grads = one graph replay
                    fast.optimizer_step()
                else:
                    if scaler:
                        scaler.unscale_(optimizer)
                    if cfg.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if cfg.scale_weight_norms:
                    lyco.scale_weight_norms(cfg.scale_weight_norms) if lyco else L.scale_weight_norms(
                        all_mods, cfg.scale_weight_norms)  # fmt: skip
                global_step += 1
                progress.update(task, completed=global_step)

                if global_step % cfg.log_every_n_steps == 0 or global_step == total_steps:
                    # the interval's mean on the device (a fill, not a host->device copy), read back later
                    sums = dist.all_reduce_sum(
                        torch.stack([loss_sum, torch.full_like(loss_sum, float(loss_n))])
                    )
                    readback.push(global_step, sums[0] / sums[1])  # DDP: summed over the ranks first
                    logged[global_step] = {"epoch": epoch, "img": steady["iv_img"], "dirty": steady["dirty"]}
                    steady.update(iv_img=0, dirty=False)
                    if writer:
                        writer.add_scalar("lr/unet", scheduler.get_last_lr()[0], global_step)
                    loss_sum, loss_n = torch.zeros((), device=dev), 0
                show(readback.poll())  # the losses whose copies have arrived (on a CPU: at once)
                if (
                    main
                    and cfg.sample_every_n_steps
                    and cfg.sample_prompts
                    and global_step % cfg.sample_every_n_steps == 0
                ):
                    show(readback.flush())  # before the sample, whose time is left out of the speed
                    sample(global_step)
                    steady.update(iv_t=time.perf_counter(), iv_img=0)  # the sample's time is not step time
                done = global_step >= total_steps
                stopping = stop["flag"]
                if world > 1:  # DDP: a Ctrl-C seen by any rank stops all of them after the same step (1 sync)
                    flag = torch.full((1,), float(stopping), device=dev)
                    stopping = dist.all_reduce_sum(flag).item() > 0
                if not done and (stopping or (cfg.stop_after_steps and global_step >= cfg.stop_after_steps)):
                    show(readback.flush())
                    nb = pos + per_step if pos + per_step < n else 0
                    ep = epoch if nb else epoch + 1
                    result.lora_path, result.state_path = save(f"{cfg.output_name}-step{global_step:06d}", ep,
                                                               global_step, nb, True, f"{cfg.output_name}-state")  # fmt: skip
                    result.interrupted, result.steps, result.epoch = True, global_step, ep
                    result.signal = stop["signal"]
                    say(f"saved a resumable state at step {global_step} in {result.state_path}")
                    return finish(result)
                if done:
                    break
            start_batch = 0
            show(readback.flush())  # the epoch's losses, before validation and saves
            if val_idx:
                v = validation_loss()
                result.val_losses.append(v)
                say(f"epoch {epoch + 1}: val loss {v:.4f} ({len(val_idx)} images)")
                if writer:
                    writer.add_scalar("loss/val", v, global_step)
            sums = dist.all_reduce_sum(torch.stack([ep_sum, torch.full_like(ep_sum, float(ep_n))]))  # DDP
            train_loss = (sums[0] / sums[1]).item() if sums[1] > 0 else None  # one host sync per epoch
            ep_sum, ep_n = torch.zeros((), device=dev), 0
            last = global_step >= total_steps or epoch == epochs - 1
            if cfg.save_every_n_epochs and (epoch + 1) % cfg.save_every_n_epochs == 0 and not last:
                name = f"{cfg.output_name}-{epoch + 1:06d}"
                record_epoch(epoch + 1, f"{name}.safetensors", train_loss)
                save(name, epoch + 1, global_step, 0, cfg.save_state)
                prune()
            if on_gpu:
                torch.cuda.synchronize()  # once an epoch: what ran before is out of the next interval
            steady.update(iv_t=time.perf_counter(), iv_img=0)  # validation and saves are not step time
            if last:
                record_epoch(epoch + 1, f"{cfg.output_name}.safetensors", train_loss)
                break
        result.lora_path, result.state_path = save(cfg.output_name, epoch + 1, global_step, 0, cfg.save_state)
        result.steps, result.epoch = global_step, epoch + 1
        if main:  # the epochs table beside the tensorboard log, and the prompt x epoch grid
            result.epochs_grid = E.epochs_grid(result.epochs, out_dir, out_dir / "sample" / "epochs.png")
            log_dir.mkdir(parents=True, exist_ok=True)
            result.epochs_log = log_dir / "epochs.json"
            result.epochs_log.write_text(json.dumps(E.summary(result.epochs), indent=2) + "\n")
        return finish(result)
    finally:
        progress.stop()
        if writer:
            writer.close()
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
