"""`curate lora-resize`: SVD resize of a LoRA/LoCon file (trainer_bridge.resize, imported when it runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import CurateError
from ..ui import JsonOpt, console, handle_errors, print_json, table


def _parse_dynamic(spec: str) -> tuple[str, float]:
    from trainer_bridge.resize import METHODS

    name, _, value = spec.partition("=")
    name = name.strip()
    if name not in METHODS or not value:
        raise CurateError(f"--dynamic {spec!r}: use METHOD=VALUE with METHOD one of {', '.join(METHODS)}")
    try:
        v = float(value)
    except ValueError:
        raise CurateError(f"--dynamic {spec!r}: {value!r} is not a number") from None
    if name in ("sv_fro", "sv_cumulative") and not 0 < v <= 1:
        raise CurateError(f"--dynamic {spec!r}: {name} needs a fraction in (0, 1]")
    if name == "sv_ratio" and v < 1:
        raise CurateError(f"--dynamic {spec!r}: sv_ratio needs a ratio >= 1 (largest / smallest kept)")
    if v <= 0:
        raise CurateError(f"--dynamic {spec!r}: the value must be > 0")
    return name, v


def register(app: typer.Typer) -> None:
    """Add `lora-resize` to the curate app."""

    @app.command("lora-resize")
    @handle_errors
    def lora_resize_cmd(
        file: Annotated[Path, typer.Argument(help="A LoRA/LoCon .safetensors file (kohya keys).")],
        out: Annotated[Path, typer.Option(help="Where to write the resized file (never the input).")],
        rank: Annotated[
            int | None, typer.Option(min=1, help="Fixed rank; with --dynamic, the largest rank kept.")
        ] = None,
        dynamic: Annotated[
            str | None,
            typer.Option(help="Per-module rank: sv_ratio=R, sv_fro=F, sv_cumulative=C or threshold=T."),
        ] = None,
        overwrite: Annotated[
            bool, typer.Option(help="Replace --out when it exists (never the input).")
        ] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Shrink a LoRA by SVD of each module's up@down; reports each module's relative Frobenius error."""
        from trainer_bridge.resize import resize_lora

        if out.exists() and not overwrite and out.resolve() != file.resolve():
            raise CurateError(f"{out} exists; choose another --out, or pass --overwrite to replace it")

        method, param = _parse_dynamic(dynamic) if dynamic else (None, None)
        note = resize_lora(file, out, rank=rank, method=method, param=param)
        note["file"], note["out"] = str(file), str(out)
        if as_json:
            print_json(note)
            return
        mods = note["modules"]
        rows = [
            (n, f"{m['rank_in']} -> {m['rank']}", f"{m['rel_fro_error']:.4f}", f"{m['retained']:.4f}")
            for n, m in mods.items()
        ]
        console.print(table(f"resize {file.name}", ["module", "rank", "rel. error", "retained"], rows))
        worst = max(m["rel_fro_error"] for m in mods.values())
        console.print(f"wrote {out} ({len(mods)} modules, worst relative error {worst:.4f})", highlight=False)
