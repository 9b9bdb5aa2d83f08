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


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_REPO = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}


def resolve_base(base: str) -> Path:
    """A local path for `base`: the folder or file itself, or a hub id's snapshot in the local cache (no network)."""
    if not base:
        raise TrainError(
            "no base model given: set `base` to a diffusers folder, a .safetensors file or a hub id"
        )
    path = Path(base).expanduser()
    if path.exists():
        return path
    looks_local = base.startswith((".", "/", "~")) or path.suffix in (".safetensors", *PICKLE_SUFFIXES)
    if (
        looks_local or base.count("/") != 1 or path.parent.is_dir()
    ):  # a hub id is "org/name", org not a folder
        kind = "checkpoint file" if path.suffix else "folder"
        raise TrainError(f"base model not found: no such {kind} {path}; check the path (or give a hub id)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, local_files_only=True))
    except Exception:  # not in the cache, or not a valid repo id
        raise TrainError(
            f"cannot load base model {base!r} offline: it is not a local folder and not in the Hugging Face cache; "
            f"download it first: `hf download {base}` (or `hf download {base} --local-dir DIR` and pass DIR)"
        ) from None


def infer_family(path: Path) -> tuple[str | None, str]:
    """(family, why) read from a diffusers folder's model_index.json or a single file's key layout; None if unknown."""
    import json

    if path.is_dir():
        idx = path / "model_index.json"
        if not idx.is_file():
            raise TrainError(f"{path} is not a diffusers model folder (no model_index.json)")
        try:
            name = str(json.loads(idx.read_text()).get("_class_name", ""))
        except (ValueError, AttributeError):
            raise TrainError(f"{idx} is not valid JSON; re-download or re-save the model") from None
        if "XL" in name:
            return "sdxl", f"{name} in model_index.json"
        if name.startswith("StableDiffusion"):
            return "sd15", f"{name} in model_index.json"
        return None, f"{name or 'no _class_name'} in model_index.json"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
        except Exception:
            return None, "the checkpoint could not be read"
        if any(k.startswith("conditioner.embedders.1.") for k in keys):
            return "sdxl", "SDXL key layout (two text encoders)"
        if any(k.startswith("cond_stage_model.transformer.") for k in keys):
            return "sd15", "SD1.5 key layout (one CLIP-L text encoder)"
        return None, "unrecognised key layout"
    return None, "not a diffusers folder or .safetensors file"


def check_family(base: str, family: str) -> tuple[str, str]:
    """(family, note): the family the base model is, checked against an explicit one; before anything loads."""
    path = resolve_base(base)
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise TrainError(
            f"{path} is a pickle checkpoint, which curate never loads; convert it to .safetensors once, in a "
            "Python you trust: `from safetensors.torch import save_file` on its state_dict"
        )
    if path.is_dir():
        _refuse_pickle_components(path)
    found, why = infer_family(path)
    if family and found and family != found:
        raise TrainError(
            f"base model {base} is {NAMES[found]} ({why}) but model_family is {family}; "
            f"drop --family and model_family from the training TOML (it is read from the model; `curate plan "
            f"--model {found}` writes a matching plan) or use a {NAMES[family]} base"
        )
    if family:
        return family, ""
    if found:
        return found, f"model family {found} (read from the base model: {why})"
    return "sd15", f"model family sd15 (the default: {why}; set model_family to be sure)"


def _refuse_pickle_components(folder: Path) -> None:
    """Every weight-bearing component must have safetensors weights; a pickle-only one is refused with the fix."""
    for comp in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [f for f in comp.iterdir() if f.is_file()]
        if any(f.name.endswith(".safetensors") for f in files):
            continue
        pickles = [f.name for f in files if f.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise TrainError(
                f"{comp.name} of {folder} has only pickle weights ({pickles[0]}), which curate never loads; "
                "convert the model once, in a Python you trust: `DiffusionPipeline.from_pretrained(SRC)"
                ".save_pretrained(DST, safe_serialization=True)`, then train on DST"
            )


def load_base(base: str, family: str, v_prediction: bool = False) -> Base:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and the DDPM noise schedule, without network access.

    Only safetensors weights load (use_safetensors=True): a pickle-only model is refused by check_family."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    local = resolve_base(base)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    path = Path(base).expanduser()
    legacy = full = ""
    kw: dict[str, Any] = dict(safety_checker=None, requires_safety_checker=False) if family == "sd15" else {}
    kw["use_safetensors"] = True
    try:
        if local.is_dir():
            if not (local / "model_index.json").is_file():
                raise TrainError(f"{local} is not a diffusers model folder (no model_index.json)")
            _refuse_pickle_components(local)
            pipe = cls.from_pretrained(local, local_files_only=True, **kw)
        else:
            if local.suffix.lower() in PICKLE_SUFFIXES:
                raise TrainError(f"{local} is a pickle checkpoint; convert it to .safetensors first")
            if local.suffix != ".safetensors":
                raise TrainError(f"{local} is not a .safetensors checkpoint or a diffusers folder")
            legacy, full = _file_hashes(local)
            kw.pop("use_safetensors")
            pipe = cls.from_single_file(str(local), local_files_only=True, **kw)
    except TrainError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        if path.suffix == ".safetensors":
            hint = (
                f"from_single_file needs the {family} model configs offline; run once with network: "
                f"`hf download {HUB_REPO[family]} --exclude '*.safetensors' '*.bin' '*.ckpt'`"
            )
        else:
            hint = f"is it a complete {NAMES[family]} diffusers model with safetensors weights?"
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise TrainError(
            f"cannot load base model {base!r} offline ({type(e).__name__}: {why}); {hint}"
        ) from None

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
