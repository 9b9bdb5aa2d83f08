"""`curate train` and `curate lora-info`: thin typer commands over trainer_bridge (imported lazily)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def _fail(message: str) -> Exception:
    """One-line user error: curate.errors.CurateError when the CLI has it, else print and exit 2."""
    try:
        from curate.errors import CurateError

        return CurateError(message)
    except ImportError:  # TODO(merge): curate.errors exists on main
        typer.echo(f"error: {message}", err=True)
        return typer.Exit(2)


def register(app: typer.Typer) -> None:
    """Add `train` and `lora-info` to the curate app."""

    @app.command("train")
    def train_cmd(
        config: Annotated[
            Path | None, typer.Argument(help="Training TOML with a [train] table (from `curate plan`).")
        ] = None,
        data: Annotated[
            str | None, typer.Option(help="kohya folder (<repeats>_<name>/) or kohya dataset TOML.")
        ] = None,
        base: Annotated[
            str | None, typer.Option(help="Base model: diffusers folder, .safetensors file or hub id.")
        ] = None,
        family: Annotated[str | None, typer.Option(help="sd15 or sdxl.")] = None,
        output_dir: Annotated[
            str | None, typer.Option(help="Where the LoRA, states, samples and logs go.")
        ] = None,
        resume: Annotated[
            str | None, typer.Option(help="A state folder written by an earlier run or Ctrl-C.")
        ] = None,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", help="Override any option: --set unet_lr=5e-5 (repeatable)."),
        ] = None,
    ) -> None:
        """Train a LoRA; Ctrl-C saves a resumable state."""
        from trainer_bridge import TrainConfig, TrainError, train

        try:
            cfg = TrainConfig.from_toml(config) if config else TrainConfig()
            opts = {
                "data": data,
                "base": base,
                "model_family": family,
                "output_dir": output_dir,
                "resume": resume,
            }
            cfg = cfg.override({k: v for k, v in opts.items() if v is not None}).override(list(set_ or []))
            result = train(cfg)
        except TrainError as e:
            raise _fail(str(e)) from None
        if result.interrupted:
            typer.echo(
                f"stopped at step {result.steps}; resume with: curate train --resume {result.state_path}"
            )
        else:
            typer.echo(f"saved {result.lora_path} ({result.steps} steps)")

    @app.command("lora-info")
    def lora_info_cmd(
        file: Annotated[Path, typer.Argument(help="A LoRA .safetensors file.")],
        as_json: Annotated[bool, typer.Option("--json", help="Print the full summary as JSON.")] = False,
    ) -> None:
        """Rank, alpha, base model, learning rates and tag frequency from a LoRA's metadata."""
        from trainer_bridge import TrainError, lora_info

        try:
            info = lora_info(str(file))
        except TrainError as e:
            raise _fail(str(e)) from None
        if as_json:
            typer.echo(json.dumps(info, indent=1))
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(title=str(file), show_header=False)
        for key in ("rank", "alpha", "modules", "unet_modules", "text_encoder_modules", "base_model", "base_model_name",
                    "v_prediction", "network_module", "network_args", "unet_lr", "text_encoder_lr", "optimizer",
                    "epochs", "steps", "resolution", "num_train_images", "model_hash"):  # fmt: skip
            t.add_row(key, str(info[key]))
        t.add_row("top tags", ", ".join(f"{tag} ({n})" for tag, n in info["top_tags"][:10]))
        Console().print(t)
