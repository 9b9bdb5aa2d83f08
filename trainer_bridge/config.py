"""TrainConfig: every training option as a plain value, loadable from the `[train]` table of a TOML file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from curate.errors import CurateError


class TrainError(CurateError):
    """A mistake the user can fix (bad path, missing weights, unknown optimizer); printed as one line."""


FAMILY_RESOLUTION = {"sd15": 512, "sdxl": 1024}


def check_output_name(name: str) -> None:
    """output_name is a file name inside output_dir: no separator, no `..`, not absolute, not empty."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or Path(name).is_absolute()
        or "\0" in name
    ):
        raise TrainError(
            f"output_name {name!r} must be a plain file name (no '/', '\\' or '..'); "
            "the LoRA is written inside output_dir: set output_dir to choose the folder"
        )


# diffusers.optimization.SchedulerType's values (piecewise_constant is accepted, not advertised)
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial",
              "piecewise_constant")  # fmt: skip


def _with_hints(unknown: list[str], names: set[str]) -> str:
    """`netwrk_dim (did you mean network_dim?)`: each unknown option with its closest known name, if any."""
    import difflib

    def one(k: str) -> str:
        close = difflib.get_close_matches(k, sorted(names), n=1, cutoff=0.75)
        return f"{k} (did you mean {close[0]}?)" if close else k

    return ", ".join(map(one, unknown))


def check_output_dir(path: str | Path) -> Path:
    """output_dir is a folder (created when missing); an existing file there is a mistake, never replaced."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise TrainError(
            f"output_dir {out} is a file; pass a folder for the LoRA, states and logs (--output-dir)"
        )
    return out


@dataclass(frozen=True)
class TrainConfig:
    # model
    model_family: str = (
        ""  # "sd15" | "sdxl"; "" = read from the base model (model_index.json / checkpoint keys)
    )
    base: str = ""  # diffusers folder, single-file .safetensors, or hub id (offline-first)
    v_prediction: bool = False
    # data
    data: str = ""  # kohya-layout folder (<repeats>_<name>/) or kohya dataset-config TOML
    val_data: str = (
        ""  # folder or dataset TOML; else dataset_val.toml beside a dataset TOML, or a val/ folder
    )
    # resolution: this value > the dataset TOML's > the family default (sd15 512, sdxl 1024); 0 = not given
    resolution: int = 0
    enable_bucket: bool = True
    min_bucket_reso: int = 0  # 0: the dataset TOML's, else min(256, resolution)
    max_bucket_reso: int = 0  # 0: the dataset TOML's, else 2 * resolution
    bucket_reso_steps: int = 0  # 0: the dataset TOML's, else 64
    # sd-scripts' bucket_no_upscale: an image smaller than resolution² trains at its own size (cropped to the
    # step) instead of being enlarged into a predefined bucket; larger ones shrink to that area. The dataset
    # TOML's bucket_no_upscale = true also turns it on
    bucket_no_upscale: bool = False
    prior_loss_weight: float = 1.0  # loss weight of regularization (is_reg) images, as sd-scripts
    num_repeats: int = 1  # for folders without a <repeats>_ prefix
    batch_size: int = 1
    keep_tokens: int = 0
    shuffle_caption: bool = False
    caption_dropout: float = 0.0
    flip_aug: bool = False
    cache_latents: bool = True
    cache_text_encoder_outputs: bool = True  # only when the text encoders are frozen
    cache_dir: str = ""  # default: <output_dir>/cache (text-encoder outputs in its te/ folder)
    # images per VAE encode while caching latents; 0: by bucket area (16 at 512², 4 at 1024²)
    latent_batch_size: int = 0
    # network
    network_dim: int = 32
    network_alpha: float = 16.0
    network_dropout: float = 0.0
    network_train_ff: bool = False  # also proj_in/proj_out and feed-forward layers of the transformer blocks
    conv_dim: int = 0  # > 0: LoCon on resnet / sampler convs
    conv_alpha: float = 1.0
    # LyCORIS (trainer_bridge/lycoris_net.py, docs/networks.md): lora | locon | loha | lokr | dora | full
    network: str = "lora"
    preset: str = ""  # "": lora.py's layers (lora/locon), lycoris' "full" (others); docs/networks.md
    block_dims: list[int] = field(default_factory=list)  # per UNet block; 25 for SD1.5, 19 for SDXL
    block_alphas: list[float] = field(default_factory=list)
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    train_norm: bool = False
    use_tucker: bool = False
    use_scalar: bool = False
    dora_wd: bool = False  # DoRA on top of lora/locon/loha/lokr (network=dora is lora + dora_wd)
    full_matrix: bool = False  # "lokr full": LoKr with both factors full matrices
    lokr_factor: int = -1
    clip_skip: int = 0  # SD1.5: 2 = condition on the penultimate CLIP layer (as A1111/sd-scripts); 0/1 = last
    # optimisation
    epochs: int = 10
    max_steps: int = 0  # > 0 caps the run (optimizer steps)
    grad_accum: int = 1
    unet_lr: float = 1e-4
    text_encoder_lr: float = 0.0  # 0 keeps the text encoder(s) frozen
    optimizer: str = "adamw"  # adamw | adamw8bit | prodigy | adafactor
    weight_decay: float = 0.01
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    max_grad_norm: float = 1.0
    scale_weight_norms: float = 0.0
    # noise and loss
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    min_timestep: int = 0
    max_timestep: int = 1000
    # speed
    mixed_precision: str = "bf16"  # bf16 | fp16 | no
    gradient_checkpointing: bool = False
    # torch.compile: true = the whole UNet; "regional" = each repeated block on its own (trainer_bridge/regions.py)
    compile: bool | str = False
    # data parallel (torch DDP): per-device batch stays batch_size; the global batch is batch_size * grad_accum * gpus
    gpus: int = 1  # > 1 spawns that many ranks; under torchrun / accelerate launch, WORLD_SIZE wins
    ddp_backend: str = (
        ""  # "": nccl on CUDA, gloo on CPU (so gpus = 2 also runs on a CPU-only machine: the tests)
    )
    # bookkeeping
    seed: int = 42
    output_dir: str = "output"
    output_name: str = "lora"
    save_precision: str = "fp16"  # fp16 | bf16 | fp32
    save_every_n_epochs: int = 0
    keep_last_n: int = 0  # 0 keeps all
    save_state: bool = True  # write a resumable state next to each saved epoch and at the end
    resume: str = ""  # a state folder written by save_state / Ctrl-C
    stop_after_steps: int = 0  # > 0: stop early and save a resumable state, as Ctrl-C does
    sample_every_n_steps: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 20
    log_dir: str = ""  # default: <output_dir>/logs
    log_every_n_steps: int = 10
    training_comment: str = ""
    # training-step speed (trainer_bridge/fast_step.py): auto = CUDA graphs where they work, else the plain step;
    # graph = the same, warning when it cannot; eager = the fast step's code without graphs; off = the plain step
    fast: str = "auto"
    # the frozen UNet's GroupNorm / LayerNorm under bf16 autocast: auto = in bf16 (fp32 statistics, bf16 output;
    # 15 % faster steps and 20 % less memory at SD1.5 bs8, trainer_bridge/kernels.py) unless compile is set (the
    # compiled kernels fuse autocast's casts themselves); fp32 = autocast's fp32 norms
    norms: str = "auto"

    def __post_init__(self) -> None:
        self._checked()  # also for TrainConfig(...) built in code: ints become floats where floats are expected

    @classmethod
    def from_toml(cls, path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> TrainConfig:
        """Read the `[train]` table (or the top level, if there is none) and apply overrides."""
        p = Path(path)
        if not p.is_file():
            raise TrainError(f"config file not found: {p}")
        try:
            doc = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise TrainError(f"{p} is not valid TOML: {e}") from None
        values = doc.get("train", doc)
        return cls.from_dict(values).override(overrides or {})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in names and not isinstance(values[k], dict))
        if unknown:
            raise TrainError(f"unknown training option(s): {_with_hints(unknown, names)}")
        return cls(**{k: v for k, v in values.items() if k in names})

    def override(self, overrides: dict[str, Any] | list[str]) -> TrainConfig:
        """Apply {"name": value} or CLI-style ["name=value", ...] (values parsed as TOML, else string)."""
        if isinstance(overrides, list):
            parsed = {}
            for item in overrides:
                key, eq, raw = item.partition("=")
                if not eq:
                    raise TrainError(f"override must look like name=value, got {item!r}")
                try:
                    parsed[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
                except tomllib.TOMLDecodeError:
                    parsed[key.strip()] = raw
            overrides = parsed
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise TrainError(f"unknown training option(s): {_with_hints(bad, names)}")
        return dataclasses.replace(self, **overrides)

    def _checked(self) -> TrainConfig:
        types = {
            f.name: type(f.default) if f.default is not dataclasses.MISSING else list
            for f in dataclasses.fields(self)
        }
        types.pop("compile")
        if not (isinstance(self.compile, bool) or self.compile == "regional"):
            raise TrainError(f"compile must be true, false or 'regional', got {self.compile!r}")
        for name, want in types.items():
            v = getattr(self, name)
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, name, float(v))
            elif not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise TrainError(f"option {name} must be {want.__name__}, got {v!r}")
        if self.model_family not in ("", "sd15", "sdxl"):
            raise TrainError(f"model_family must be 'sd15' or 'sdxl', got {self.model_family!r}")
        if self.mixed_precision not in ("bf16", "fp16", "no"):
            raise TrainError(f"mixed_precision must be bf16, fp16 or no, got {self.mixed_precision!r}")
        if self.norms not in ("auto", "fp32"):
            raise TrainError(f"norms must be 'auto' or 'fp32', got {self.norms!r}")
        if self.gpus < 1:
            raise TrainError(f"gpus must be >= 1, got {self.gpus}")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise TrainError("need 0 <= min_timestep < max_timestep <= 1000")
        for name in ("resolution", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
            if getattr(self, name) < 0:
                raise TrainError(f"{name} must be positive (or 0 for the default), got {getattr(self, name)}")
        if self.latent_batch_size < 0:
            raise TrainError(
                f"latent_batch_size must be >= 1 (or 0: by bucket area), got {self.latent_batch_size}"
            )
        if self.prior_loss_weight < 0:
            raise TrainError(f"prior_loss_weight must be >= 0, got {self.prior_loss_weight}")
        # counts the loop divides by or steps with: 0 would crash mid-run or train nothing and save it
        for name in ("batch_size", "grad_accum", "network_dim", "num_repeats", "log_every_n_steps",
                     "sample_steps", "lr_scheduler_num_cycles"):  # fmt: skip
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "lr_warmup_steps", "save_every_n_epochs", "keep_last_n", "stop_after_steps",
                     "sample_every_n_steps", "keep_tokens", "conv_dim", "unet_lr", "text_encoder_lr"):  # fmt: skip
            if getattr(self, name) < 0:
                raise TrainError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.epochs < 1 and not (self.epochs == 0 and self.max_steps > 0):
            raise TrainError(f"epochs must be >= 1 (or set max_steps to cap the run), got {self.epochs}")
        if not 0 <= self.caption_dropout <= 1:
            raise TrainError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        # names build_optimizer / diffusers' get_scheduler take: checked here, before the model loads
        if self.optimizer.lower() not in ("adamw", "adamw8bit", "prodigy", "adafactor"):
            raise TrainError(
                f"unknown optimizer {self.optimizer!r}; choose adamw, adamw8bit, prodigy or adafactor"
            )
        if self.lr_scheduler not in SCHEDULERS:
            raise TrainError(
                f"unknown lr_scheduler {self.lr_scheduler!r}; choose constant, constant_with_warmup, cosine, "
                "cosine_with_restarts, linear or polynomial"
            )
        if self.save_precision not in ("fp16", "bf16", "fp32"):
            raise TrainError(f"save_precision must be fp16, bf16 or fp32, got {self.save_precision!r}")
        from trainer_bridge.lycoris_net import ALGOS, PRESETS

        if self.network not in ALGOS:
            raise TrainError(f"network must be one of {', '.join(sorted(ALGOS))}, got {self.network!r}")
        if self.preset and self.preset not in PRESETS:
            raise TrainError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for name in ("network_dropout", "rank_dropout", "module_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise TrainError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.clip_skip < 0:
            raise TrainError(f"clip_skip must be >= 0, got {self.clip_skip}")
        check_output_name(self.output_name)
        return self


def write_error(path: Path, exc: OSError) -> TrainError:
    """One line for a failed write (disk full, read-only, permissions); the caller has removed the partial file."""
    import errno

    if exc.errno == errno.ENOSPC:
        why = "no space left on the disk"
        fix = "free some space (or set output_dir on another disk) and rerun"
    else:
        why = exc.strerror or type(exc).__name__
        fix = "check the folder is writable (or set output_dir elsewhere) and rerun"
    return TrainError(f"cannot write {path}: {why}; nothing was left half-written there; {fix}")
