"""Load the base model (diffusers folder, single-file checkpoint, or hub id; offline-first)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer_bridge.config import TrainError

# SD1.5's noise schedule, used when the base model carries no scheduler config
DEFAULT_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)


@dataclass
class Base:
    family: str  # "sd15" | "sdxl"
    unet: Any
    vae: Any
    text_encoders: list  # [clip-l] or [clip-l, clip-g with projection]
    tokenizers: list
    scheduler: Any  # DDPMScheduler (training noise schedule)
    model_hash: str  # legacy A1111 hash of the checkpoint file ("" for folders)
    new_model_hash: str  # sha256 of the checkpoint file ("" for folders)
    name: str


def _file_hashes(path: Path) -> tuple[str, str]:
    """(legacy 8-hex model hash, full sha256), as A1111 and kohya record ss_sd_model_hash / ss_new_sd_model_hash."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    full = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            full.update(chunk)
    return legacy, full.hexdigest()


def load_base(base: str, family: str, v_prediction: bool = False) -> Base:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and the DDPM noise schedule, without network access."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if not base:
        raise TrainError(
            "no base model given: set `base` to a diffusers folder, a .safetensors file or a hub id"
        )
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    path = Path(base).expanduser()
    legacy = full = ""
    kw: dict[str, Any] = dict(safety_checker=None, requires_safety_checker=False) if family == "sd15" else {}
    try:
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise TrainError(f"{path} is not a diffusers model folder (no model_index.json)")
            pipe = cls.from_pretrained(path, local_files_only=True, **kw)
        elif path.suffix in (".safetensors", ".ckpt"):
            if not path.is_file():
                raise TrainError(f"base checkpoint not found: {path}")
            if path.suffix == ".ckpt":
                raise TrainError(f"{path} is a pickle checkpoint; convert it to .safetensors first")
            legacy, full = _file_hashes(path)
            pipe = cls.from_single_file(str(path), local_files_only=True, **kw)
        else:
            pipe = cls.from_pretrained(base, local_files_only=True, **kw)
    except TrainError:
        raise
    except (OSError, ValueError) as e:
        where = "~/.cache/huggingface/hub"
        if path.suffix == ".safetensors":
            hint = (
                f"from_single_file needs the {family} model configs offline; run once with network: "
                f"`huggingface-cli download {'stabilityai/stable-diffusion-xl-base-1.0' if family == 'sdxl' else 'stable-diffusion-v1-5/stable-diffusion-v1-5'} --exclude '*.safetensors' '*.bin'`"
            )
        else:
            hint = f"download it first: `huggingface-cli download {base}` (stored in {where}), or pass a local folder"
        raise TrainError(f"cannot load base model {base!r} offline ({type(e).__name__}); {hint}") from None

    sched_cfg = dict(pipe.scheduler.config) if pipe.scheduler is not None else dict(DEFAULT_SCHEDULER)
    sched = DDPMScheduler.from_config({k: v for k, v in sched_cfg.items() if not k.startswith("_")})
    if v_prediction:
        sched.register_to_config(prediction_type="v_prediction")
    if family == "sdxl":
        tes, toks = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
    else:
        tes, toks = [pipe.text_encoder], [pipe.tokenizer]
    return Base(
        family, pipe.unet, pipe.vae, tes, toks, sched, legacy, full, path.name if path.exists() else base
    )
