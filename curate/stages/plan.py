"""Training planner: learning rates, epochs, repeats, batch, network size and steps, each with its reason.

Every number comes from a module-level table below; ``[plan]`` in ``curate.toml`` overrides any of
them (same names), e.g.::

    [plan]
    network_dim = 16
    min_snr_gamma = { anime = 5.0, realistic = 8.0 }
    [[plan.size_tiers]]
    min_images = 0
    unet_lr = 1e-4
    text_encoder_lr = 2e-5
    epochs = 10
    repeats = 10

The result is a TOML whose ``[train]`` table is what ``trainer_bridge.TrainConfig`` reads, plus a
``[plan]`` table with the reasons and the step count.
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from ..errors import CurateError
from ..io import atomic_write_text
from ..manifest import Manifest
from .bucket import DEFAULT_FAMILY, RESOLUTION

# Dataset-size strategy: the tier whose min_images is the largest not above the image count.
SIZE_TIERS: list[dict[str, Any]] = [
    {"min_images": 0, "unet_lr": 5e-4, "text_encoder_lr": 1e-4, "epochs": 10, "repeats": 10,
     "why": "fewer than 50 images: the small-set rates; expect less flexibility, add images if you can"},
    {"min_images": 50, "unet_lr": 5e-4, "text_encoder_lr": 1e-4, "epochs": 10, "repeats": 10,
     "why": "50-100 images: high rates and 7-10 epochs so each image is seen often enough"},
    {"min_images": 100, "unet_lr": 4e-4, "text_encoder_lr": 8e-5, "epochs": 10, "repeats": 5,
     "why": "100-300 images: slightly lower rates, fewer repeats"},
    {"min_images": 300, "unet_lr": 3e-4, "text_encoder_lr": 6e-5, "epochs": 8, "repeats": 3,
     "why": "300-500 images: moderate rates; more data per epoch needs fewer repeats"},
    {"min_images": 500, "unet_lr": 2e-4, "text_encoder_lr": 4e-5, "epochs": 6, "repeats": 1,
     "why": "500+ images: low rates and repeats lowered to 1, the data itself gives the steps"},
]  # fmt: skip

MODEL_FAMILIES: dict[str, dict[str, Any]] = {
    "sd15": {
        "resolution": RESOLUTION["sd15"],
        "base": "runwayml/stable-diffusion-v1-5",
        "mixed_precision": "bf16",
    },
    "sdxl": {
        "resolution": RESOLUTION["sdxl"],
        "base": "stabilityai/stable-diffusion-xl-base-1.0",
        "mixed_precision": "bf16",
    },
}

# Per family, the row with the largest min_vram (GiB) not above the card's memory.
VRAM_TABLE: dict[str, list[dict[str, Any]]] = {
    "sd15": [
        {"min_vram": 6, "batch_size": 1, "grad_accum": 2, "gradient_checkpointing": True},
        {"min_vram": 8, "batch_size": 2, "grad_accum": 1, "gradient_checkpointing": True},
        {"min_vram": 12, "batch_size": 4, "grad_accum": 1, "gradient_checkpointing": False},
        {"min_vram": 24, "batch_size": 8, "grad_accum": 1, "gradient_checkpointing": False},
    ],
    "sdxl": [
        {"min_vram": 10, "batch_size": 1, "grad_accum": 2, "gradient_checkpointing": True},
        {"min_vram": 16, "batch_size": 2, "grad_accum": 1, "gradient_checkpointing": True},
        {"min_vram": 24, "batch_size": 4, "grad_accum": 1, "gradient_checkpointing": True},
        {"min_vram": 40, "batch_size": 8, "grad_accum": 1, "gradient_checkpointing": False},
    ],
}

MIN_SNR_GAMMA: dict[str, float] = {"anime": 5.0, "realistic": 7.0}
# Tags that vote for a style (WD14-style names); a style needs STYLE_VOTE of the images.
STYLE_TAGS: dict[str, list[str]] = {
    # Not 1girl/1boy: taggers put those on photos too.
    "anime": ["anime", "anime coloring", "anime_coloring", "manga", "cel shading", "chibi", "comic", "pixel art"],
    "realistic": ["realistic", "photorealistic", "photo (medium)", "photo_(medium)", "photo", "photograph"],
}  # fmt: skip
STYLE_VOTE = 0.3
DEFAULT_STYLE = "realistic"

NETWORK = {"network_dim": 32, "network_alpha": 16.0, "network_dropout": 0.0, "conv_dim": 0, "conv_alpha": 1.0}
DEFAULTS: dict[str, Any] = {
    "optimizer": "adamw",
    "lr_scheduler": "cosine",
    "warmup_fraction": 0.05,
    "noise_offset": 0.0357,
    "multires_noise_iterations": 0,
    "multires_noise_discount": 0.3,
    "min_timestep": 0,
    "max_timestep": 1000,
    "v_prediction": False,
    "max_grad_norm": 1.0,
    "scale_weight_norms": 0.0,
    "caption_dropout": 0.0,
    "flip_aug": False,
    "cache_latents": True,
    "seed": 42,
    "saves": 5,  # checkpoints spread over the run
    "keep_last_n": 0,
    "samples": 10,  # sample images over the run
    "compile": False,
    "output_dir": "output",
}

# Fields trainer_bridge.TrainConfig reads from [train]; nothing else goes there.
TRAIN_FIELDS = (
    "model_family", "base", "output_dir", "output_name", "resolution", "batch_size", "grad_accum", "epochs",
    "max_steps", "unet_lr", "text_encoder_lr", "network_dim", "network_alpha", "network_dropout", "conv_dim",
    "conv_alpha", "optimizer", "lr_scheduler", "lr_warmup_steps", "min_snr_gamma", "noise_offset",
    "multires_noise_iterations", "multires_noise_discount", "min_timestep", "max_timestep", "v_prediction",
    "mixed_precision", "gradient_checkpointing", "max_grad_norm", "scale_weight_norms", "keep_tokens",
    "shuffle_caption", "caption_dropout", "flip_aug", "cache_latents", "cache_text_encoder_outputs", "seed",
    "save_every_n_epochs", "keep_last_n", "sample_every_n_steps", "sample_prompts", "log_dir", "compile",
    "num_repeats", "bucket_no_upscale",
)  # fmt: skip

_TABLES = {
    "size_tiers": SIZE_TIERS,
    "model_families": MODEL_FAMILIES,
    "vram_table": VRAM_TABLE,
    "min_snr_gamma": MIN_SNR_GAMMA,
    "style_tags": STYLE_TAGS,
    "style_vote": STYLE_VOTE,
    "default_style": DEFAULT_STYLE,
    **NETWORK,
    **DEFAULTS,
}


def tables(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The planner's tables with ``[plan]`` overrides applied (dicts merge one level, lists replace)."""
    out = copy.deepcopy(_TABLES)
    for k, v in (overrides or {}).items():
        if k not in out:
            raise CurateError(f"unknown option {k!r} in [plan]; valid: {', '.join(out)}")
        if isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    tiers = out["size_tiers"]
    if not tiers or any(
        not {"min_images", "unet_lr", "text_encoder_lr", "epochs", "repeats"} <= set(t) for t in tiers
    ):
        raise CurateError(
            "[plan] size_tiers needs min_images, unet_lr, text_encoder_lr, epochs, repeats per tier"
        )
    out["size_tiers"] = sorted(tiers, key=lambda t: t["min_images"])
    return out


def pick_tier(n_images: int, tiers: list[dict[str, Any]]) -> dict[str, Any]:
    chosen = tiers[0]
    for t in tiers:
        if n_images >= t["min_images"]:
            chosen = t
    return chosen


def detect_style(tag_lists: list[list[str]], t: dict[str, Any]) -> tuple[str, str]:
    """(style, reason) from the images' tags: the style whose tags the most images carry, if enough do."""
    if not tag_lists:
        return t["default_style"], f"no tags (run the tagger or pass --style); default {t['default_style']}"
    votes = {}
    for style, names in t["style_tags"].items():
        wanted = {n.lower() for n in names}
        votes[style] = sum(1 for tags in tag_lists if wanted & {x.lower() for x in tags}) / len(tag_lists)
    best = max(sorted(votes), key=votes.__getitem__)
    if votes[best] >= t["style_vote"]:
        return best, f"{votes[best]:.0%} of tagged images carry {best} tags"
    return t[
        "default_style"
    ], f"no style tag on {t['style_vote']:.0%} of images; default {t['default_style']}"


@dataclass
class Plan:
    train: dict[str, Any]
    reasons: dict[str, str]
    images: int
    style: str
    dataset: str = ""
    total_steps: int = 0
    steps_per_epoch: int = 0
    warnings: list[str] = field(default_factory=list)
    suggestion: dict[str, Any] = field(default_factory=dict)  # network type: a suggestion, [train] keeps lora
    small_images: dict[str, Any] | None = (
        None  # images smaller than the resolution (stages.bucket.small_images)
    )

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def to_toml(self) -> str:
        plan = {
            "dataset": self.dataset,
            "images": self.images,
            "style": self.style,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warnings": self.warnings,
            "reasons": self.reasons,
        }
        if self.suggestion:
            plan["suggested_network"] = self.suggestion
        header = "# Written by `curate plan`; every value has its reason in [plan.reasons].\n"
        return header + tomli_w.dumps({"train": self.train, "plan": plan})


KINDS = ("character", "concept", "style")


def suggest_network(n_images: int, kind: str) -> dict[str, Any]:
    """The network type for ``n_images`` of a ``kind`` (character, concept, style), with its reason and the
    ``--set`` options that apply it. A suggestion only: the plan's [train] table stays a plain LoRA."""
    if kind not in KINDS:
        raise CurateError(f"unknown --kind {kind!r}; choose {', '.join(KINDS)}")
    if n_images < 30:
        net, opts = "lora", {}
        why = f"{n_images} images: a plain LoRA has the least room to memorise a small set and keeps the fast step"
    elif kind == "style" and n_images < 300:
        net, opts = "locon", {"conv_dim": 8, "conv_alpha": 4}
        why = "a style lives in texture and brushwork, which LoCon's 3x3 conv layers carry"
    elif kind == "style":
        net, opts = "loha", {"network_dim": 16, "network_alpha": 8, "conv_dim": 8, "conv_alpha": 4}
        why = (
            f"{n_images} images of a style: LoHa's Hadamard product reaches a higher rank than a LoRA "
            "of the same size, and its conv layers carry texture"
        )
    elif n_images >= 500:
        net, opts = "dora", {}
        why = (
            f"{n_images} images of one {kind}: DoRA (magnitude and direction trained apart) follows full "
            "fine-tuning closer at the same rank; its step is slower (no CUDA-graph fast path)"
        )
    else:
        net, opts = "lora", {}
        why = f"one {kind} needs little capacity: a plain LoRA trains fastest (CUDA-graph step) and loads everywhere"
    sets = " ".join(f"--set {k}={v}" for k, v in {"network": net, **opts}.items())
    return {"network": net, "options": opts, "reason": why, "apply": sets}


def plan_training(
    n_images: int,
    *,
    model: str = DEFAULT_FAMILY,
    vram: float = 24.0,
    style: str | None = None,
    tag_lists: list[list[str]] | None = None,
    bucket_counts: list[int] | None = None,
    tag_captions: bool = True,
    trigger: str | None = None,
    class_word: str | None = None,
    output_name: str = "lora",
    overrides: dict[str, Any] | None = None,
    kind: str | None = None,
) -> Plan:
    """A training plan for ``n_images`` training images (``bucket_counts``: images per bucket, if known)."""
    t = tables(overrides)
    if model not in t["model_families"]:
        raise CurateError(f"unknown --model {model!r}; choose {', '.join(t['model_families'])}")
    if n_images < 1:
        raise CurateError("no training images; run `curate scan` and `curate split` first")
    fam = t["model_families"][model]
    rows = sorted(t["vram_table"][model], key=lambda r: r["min_vram"])
    if vram < rows[0]["min_vram"]:
        raise CurateError(
            f"{model} LoRA training needs at least {rows[0]['min_vram']} GiB of GPU memory, got --vram {vram}; "
            + ("use --model sd15" if model != "sd15" else "use a larger GPU")
        )
    mem = [r for r in rows if vram >= r["min_vram"]][-1]
    tier = pick_tier(n_images, t["size_tiers"])
    reasons: dict[str, str] = {}
    warnings = []
    if n_images < 50:
        warnings.append(f"only {n_images} training images; 50+ varied images give a more flexible LoRA")

    batch = min(int(mem["batch_size"]), n_images)
    accum = int(mem["grad_accum"])
    repeats, epochs = int(tier["repeats"]), int(tier["epochs"])
    counts = bucket_counts or [n_images]
    per_epoch = sum(math.ceil(c * repeats / batch) for c in counts)  # batches never mix buckets
    opt_per_epoch = math.ceil(per_epoch / accum)
    total = opt_per_epoch * epochs

    if style is None:
        style, why_style = detect_style(tag_lists or [], t)
    else:
        why_style = "given with --style"
    if style not in t["min_snr_gamma"]:
        raise CurateError(f"unknown --style {style!r}; choose {', '.join(t['min_snr_gamma'])}")

    tr: dict[str, Any] = {
        "model_family": model,
        "base": fam["base"],
        "output_dir": t["output_dir"],
        "output_name": output_name,
        "resolution": int(fam["resolution"]),
        "batch_size": batch,
        "grad_accum": accum,
        "epochs": epochs,
        "max_steps": 0,
        "unet_lr": float(tier["unet_lr"]),
        "text_encoder_lr": float(tier["text_encoder_lr"]),
        "network_dim": int(t["network_dim"]),
        "network_alpha": float(t["network_alpha"]),
        "network_dropout": float(t["network_dropout"]),
        "conv_dim": int(t["conv_dim"]),
        "conv_alpha": float(t["conv_alpha"]),
        "optimizer": t["optimizer"],
        "lr_scheduler": t["lr_scheduler"],
        "lr_warmup_steps": math.ceil(total * t["warmup_fraction"]),
        "min_snr_gamma": float(t["min_snr_gamma"][style]),
        "noise_offset": float(t["noise_offset"]),
        "multires_noise_iterations": int(t["multires_noise_iterations"]),
        "multires_noise_discount": float(t["multires_noise_discount"]),
        "min_timestep": int(t["min_timestep"]),
        "max_timestep": int(t["max_timestep"]),
        "v_prediction": bool(t["v_prediction"]),
        "mixed_precision": fam.get("mixed_precision", "bf16"),
        "gradient_checkpointing": bool(mem["gradient_checkpointing"]),
        "max_grad_norm": float(t["max_grad_norm"]),
        "scale_weight_norms": float(t["scale_weight_norms"]),
        "keep_tokens": 1 if trigger else 0,
        "shuffle_caption": bool(tag_captions),
        "caption_dropout": float(t["caption_dropout"]),
        "flip_aug": bool(t["flip_aug"]),
        "cache_latents": bool(t["cache_latents"]),
        "cache_text_encoder_outputs": False,
        "seed": int(t["seed"]),
        "save_every_n_epochs": max(1, epochs // max(1, int(t["saves"]))),
        "keep_last_n": int(t["keep_last_n"]),
        "sample_every_n_steps": max(1, total // max(1, int(t["samples"]))),
        "sample_prompts": [" ".join(w for w in (trigger, class_word) if w)] if trigger or class_word else [],
        "log_dir": "",
        "compile": bool(t["compile"]),
        "num_repeats": repeats,
    }
    eff = batch * accum
    steps_why = (
        f"{n_images} images x {repeats} repeats x {epochs} epochs / batch {batch}"
        + (f" / grad accum {accum}" if accum > 1 else "")
        + (" (batches never mix buckets, so each bucket rounds up)" if bucket_counts else "")
        + f" = {total} optimizer steps"
    )
    reasons.update(
        {
            "model_family": f"--model {model}",
            "base": f"the {model} base model; point it at a local folder or .safetensors to stay offline",
            "resolution": f"native resolution of {model}",
            "unet_lr": tier.get("why", "dataset-size tier") + f" (tier from {tier['min_images']} images)",
            "text_encoder_lr": "a fifth of the UNet rate: the text encoder overfits fast",
            "epochs": tier.get("why", "dataset-size tier"),
            "num_repeats": f"{repeats} repeats: {n_images} images x {repeats} = {n_images * repeats} samples per epoch",
            "batch_size": f"{vram:g} GiB for {model} fits batch {mem['batch_size']}"
            + (f" (capped at the {n_images} images)" if batch < mem["batch_size"] else ""),
            "grad_accum": f"effective batch {eff}"
            + (": accumulation makes up for the small batch" if accum > 1 else ""),
            "gradient_checkpointing": "needed to fit this batch in memory"
            if mem["gradient_checkpointing"]
            else "enough memory without it (faster)",
            "max_steps": "0: the epochs decide the length",
            "total_steps": steps_why,
            "lr_warmup_steps": f"{t['warmup_fraction']:.0%} of {total} steps",
            "lr_scheduler": f"{t['lr_scheduler']} decay lets the last epochs settle",
            "network_dim": f"dim {t['network_dim']} / alpha {t['network_alpha']:g}: enough capacity for a character or style, "
            "alpha = dim/2 halves the effective rate",
            "network_alpha": "half the dim",
            "min_snr_gamma": f"{style} ({why_style}): gamma {t['min_snr_gamma'][style]:g} "
            "(5 for anime, 7-10 for realistic) steadies the loss across timesteps",
            "noise_offset": "small offset widens the brightness range the LoRA can produce",
            "optimizer": f"{t['optimizer']}: dependable with the tiered rates above",
            "keep_tokens": "keep the trigger word first when captions shuffle"
            if trigger
            else "no trigger word",
            "shuffle_caption": "tag captions: order carries no meaning"
            if tag_captions
            else "sentence captions: keep word order",
            "flip_aug": "off: flipping mirrors asymmetric features (hair parting, logos, text)",
            "cache_latents": "no random crop or colour augmentation, so latents can be cached once",
            "cache_text_encoder_outputs": "off: the text encoder is trained (text_encoder_lr > 0)",
            "save_every_n_epochs": f"about {t['saves']} checkpoints to pick the best epoch from",
            "sample_every_n_steps": f"about {t['samples']} sample rounds over {total} steps",
            "mixed_precision": "bf16 avoids fp16 overflow on modern GPUs",
        }
    )
    reasons["output_dir"] = "relative to where you start the trainer"
    kind_why = "given with --kind"
    if kind is None:  # a trigger word names one subject; no trigger: the set teaches a look
        kind, kind_why = (
            ("character", "a trigger word names one subject") if trigger else ("style", "no trigger word")
        )
    suggestion = suggest_network(n_images, kind)
    suggestion["kind"], suggestion["kind_reason"] = kind, kind_why
    return Plan(
        tr,
        reasons,
        n_images,
        style,
        total_steps=total,
        steps_per_epoch=opt_per_epoch,
        warnings=warnings,
        suggestion=suggestion,
    )


def plan(
    manifest: Manifest,
    *,
    model: str = DEFAULT_FAMILY,
    vram: float = 24.0,
    style: str | None = None,
    trigger: str | None = None,
    class_word: str | None = None,
    overrides: dict[str, Any] | None = None,
    kind: str | None = None,
    no_upscale: bool = False,
) -> Plan:
    """Plan from the manifest: the training images (kept, not in val), their buckets, tags and captions.

    ``no_upscale``: sd-scripts' bucket_no_upscale, written into [train] (also when the last `curate bucket`
    used it); images smaller than the resolution are counted either way, with a warning when they are enlarged.
    """
    kept = manifest.kept_images()
    if not kept:
        raise CurateError(manifest.nothing_kept("plan"))
    from ..export.kohya import reg_inside_warnings, zero_repeat_folder, zero_repeat_warnings

    zero = zero_repeat_warnings([r.path for r in kept])  # the export leaves them out, val images too
    trains = [r.path for r in kept if zero_repeat_folder(r.path) is None]
    zero += reg_inside_warnings(trains)  # a reg/ folder inside the dataset trains as training images
    images = [r for r in kept if r.split != "val" and zero_repeat_folder(r.path) is None]
    if not images and any(r.split != "val" and zero_repeat_folder(r.path) for r in kept):
        raise CurateError(
            "every training image is in a 0_<name> folder, which sd-scripts skips (0 repeats); rename the "
            "folder N_<name> with N >= 1 (e.g. 10_<name>)"
        )
    if not images:
        raise CurateError(
            f"all {len(kept)} kept images are in the validation split, none left to train on; "
            "rerun `curate split` with a smaller --val (e.g. 0.1)"
        )
    buckets = [r.bucket for r in images]
    counts = list(Counter(buckets).values()) if all(buckets) and images else None
    from .captions import tags_of  # a caption a person wrote counts with its comma-separated parts

    tag_lists = [t for t in map(tags_of, images) if t]
    from ..export.common import looks_like_tags, make_caption

    captioned = [c for c in map(make_caption, images) if c]  # none yet: assume tags will come (curate tag)
    tag_captions = sum(map(looks_like_tags, captioned)) > len(captioned) / 2 if captioned else True
    stored: list[str] = []  # the trigger words `curate tag --trigger` put first (the export pins them too)
    if trigger is None:
        stored = [str(t) for t in json.loads(manifest.get_meta("caption.trigger") or "[]")]
        trigger = ", ".join(stored) or None
    name = trigger or manifest.root.name
    p = plan_training(
        len(images),
        model=model,
        vram=vram,
        style=style,
        tag_lists=tag_lists,
        bucket_counts=counts,
        tag_captions=tag_captions,
        trigger=trigger,
        class_word=class_word,
        output_name="".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "lora",
        overrides=overrides,
        kind=kind,
    )
    p.dataset = str(manifest.root)
    p.warnings[:0] = zero
    if stored:
        p.train["keep_tokens"] = len(stored)
        p.reasons["keep_tokens"] = (
            f"keep the trigger word(s) `curate tag --trigger` put first ({trigger}) when captions shuffle"
        )
    from .bucket import stored_settings

    bs = stored_settings(manifest)
    if bs is not None and bs.family == model and bs.resolution != p.train["resolution"]:
        p.train["resolution"] = bs.resolution  # the user chose it with `curate bucket --resolution`
        p.reasons["resolution"] = f"the resolution of the last `curate bucket --model {model}`"
    elif bs is not None and bs.resolution != p.train["resolution"]:
        p.warnings.append(
            f"buckets are stored for resolution {bs.resolution} but {model} trains at {p.train['resolution']}; "
            f"rerun `curate bucket --resolution {p.train['resolution']}` for exact steps and buckets"
        )
    if counts is None:
        p.warnings.append(
            "no buckets stored: steps assume one bucket; run `curate bucket` for the exact count"
        )
    import dataclasses

    from .bucket import family_settings, small_images, small_images_message

    settings = bs if bs is not None and bs.resolution == p.train["resolution"] else None
    try:
        settings = settings or family_settings(model, resolution=p.train["resolution"])
    except CurateError:  # a [plan] resolution no bucket settings take: the trainer says so in one line
        return p
    no_upscale = no_upscale or settings.no_upscale
    if no_upscale:
        settings = dataclasses.replace(settings, no_upscale=True)
        p.train["bucket_no_upscale"] = True
        source = "--no-upscale" if not (bs and bs.no_upscale) else "the last `curate bucket --no-upscale`"
        p.reasons["bucket_no_upscale"] = f"{source}: no image is enlarged"
    p.small_images = small_images({r.path: (r.width, r.height) for r in images}, settings)
    if p.small_images and not no_upscale:
        p.warnings.append(small_images_message(p.small_images))
    elif p.small_images:
        p.reasons["bucket_no_upscale"] = f"{source}: {small_images_message(p.small_images)}"
    return p


def write_plan(p: Plan, path: Path) -> Path:
    atomic_write_text(path, p.to_toml())
    return path
