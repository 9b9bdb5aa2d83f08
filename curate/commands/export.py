"""`curate split`, `curate bucket`, `curate export` and `curate plan`: from a curated folder to a trainer."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from ..dataset import Dataset
from ..errors import CurateError
from ..stages.bucket import DEFAULT_FAMILY
from ..ui import ConfigOpt, DatasetArg, JsonOpt, ManifestOpt, console, handle_errors, print_json, table


def _open(path: str, manifest: str | None, config: str | None) -> Dataset:
    return Dataset.open(path, manifest=manifest, config=config, create=False)


def _warn(lines: list[str]) -> None:
    for w in lines:
        console.print(f"[yellow]warning:[/] {escape(str(w))}", highlight=False)


def split(
    path: DatasetArg,
    val: Annotated[float, typer.Option(help="Validation fraction (10-20% is typical).")] = 0.1,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same split.")] = 0,
    balance_tag: Annotated[
        str | None, typer.Option(help="Stratify by this tag or tag prefix (e.g. character), comma separated.")
    ] = None,
    phash_threshold: Annotated[
        int, typer.Option(help="pHash bits within which images count as near-duplicates (kept together).")
    ] = 10,
    clear_moves: Annotated[
        bool, typer.Option("--clear-moves", help="Forget the moves made in `curate review` first.")
    ] = False,
    manifest: ManifestOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
):
    """Split kept images into train/val; near-duplicates always land on the same side."""
    with _open(path, manifest, config) as ds:
        if clear_moves:
            from ..stages.split import MOVES_KEY

            with ds.manifest.transaction():
                ds.manifest.conn.execute("DELETE FROM meta WHERE key=?", (MOVES_KEY,))
        res = ds.split(val, seed, balance_tag=balance_tag, phash_threshold=phash_threshold)
    if as_json:
        print_json(res.as_dict())
        return
    rows = [("train", res.train), ("val", res.val), ("val fraction", f"{res.val_fraction:.1%}"),
            ("groups", res.groups), ("images in near-duplicate groups", res.grouped_images)]  # fmt: skip
    console.print(table(f"split (seed {res.seed})", ["", "images"], rows))
    if res.strata:
        srows = [(s, c["train"], c["val"]) for s, c in sorted(res.strata.items())]
        console.print(table("by " + (balance_tag or ""), ["stratum", "train", "val"], srows))
    _warn(res.notes)


def bucket(
    path: DatasetArg,
    model: Annotated[
        str, typer.Option(help="Model family: sd15 (512 px) or sdxl (1024 px); sets the defaults below.")
    ] = DEFAULT_FAMILY,
    resolution: Annotated[
        int | None,
        typer.Option(help="Base resolution (side of the square bucket area); default: the family's."),
    ] = None,
    min_size: Annotated[
        int | None, typer.Option("--min", help="Smallest bucket side (default 256, at most the resolution).")
    ] = None,
    max_size: Annotated[
        int | None, typer.Option("--max", help="Largest bucket side (default twice the resolution).")
    ] = None,
    step: Annotated[int, typer.Option(help="Bucket sides are multiples of this.")] = 64,
    no_upscale: Annotated[
        bool, typer.Option("--no-upscale", help="Never enlarge images; buckets follow image sizes.")
    ] = False,
    manifest: ManifestOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
):
    """Preflight: the trainer's aspect buckets for every kept image, crop loss, upscales, warnings."""
    with _open(path, manifest, config) as ds:
        rep = ds.bucket(model, resolution=resolution, min_size=min_size, max_size=max_size, step=step,
                        no_upscale=no_upscale)  # fmt: skip
    if as_json:
        print_json(rep.as_dict())
        return
    rows = [
        (f"{w}x{h}", f"{w / h:.2f}", n, "few images" if n <= 2 else "") for (w, h), n in rep.counts.items()
    ]
    console.print(table(f"buckets: {len(rep.placements)} images in {len(rep.counts)} buckets",
                        ["bucket", "aspect", "images", ""], rows))  # fmt: skip
    worst = sorted(rep.placements.items(), key=lambda kv: -kv[1].crop_loss)[:5]
    if worst and worst[0][1].crop_loss > 0:
        wrows = [
            (p, f"{pl.bucket[0]}x{pl.bucket[1]}", f"{pl.crop_loss:.1%}", f"x{pl.scale:.2f}")
            for p, pl in worst
        ]
        console.print(table("largest crops", ["image", "bucket", "crop loss", "scale"], wrows))
    console.print(f"mean crop loss {rep.mean_crop:.1%}; upscaled images: {len(rep.upscaled)}")
    _warn(rep.warnings)


def export(
    path: DatasetArg,
    out: Annotated[str, typer.Argument(help="New folder to write (must not exist or be empty).")],
    format: Annotated[
        str, typer.Option("--format", help="kohya (folders + dataset TOML) or diffusers.")
    ] = "kohya",
    repeats: Annotated[
        int, typer.Option(help="kohya: repeats per epoch of images outside <N>_<class> concept folders.")
    ] = 10,
    trigger: Annotated[str | None, typer.Option(help="Trigger word, put first in every caption.")] = None,
    class_word: Annotated[
        str | None,
        typer.Option(
            "--class", help="Class word of images outside concept folders (and of loose --reg images)."
        ),
    ] = None,
    resize: Annotated[
        bool, typer.Option("--resize", help="Write each image scaled and cropped to its bucket.")
    ] = False,
    link: Annotated[
        str | None,
        typer.Option(
            "--link",
            help="hard or sym: link files to the originals instead of copying them (edits to the export "
            "then change your originals). Default: copy, as a reflink where the file system can.",
        ),
    ] = None,
    copy: Annotated[bool, typer.Option("--copy", hidden=True, help="Copy files (the default now).")] = False,
    reg: Annotated[
        str | None,
        typer.Option(
            "--reg",
            help="kohya: folder of regularization images (<N>_<class>/ folders, or --class with repeats 1), "
            "exported into reg/ as is_reg subsets.",
        ),
    ] = None,
    flip_aug: Annotated[bool, typer.Option("--flip-aug", help="kohya: enable horizontal flips.")] = False,
    manifest: ManifestOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
):
    """Write the kept images with captions in a trainer's layout, atomically, never touching the sources."""
    if format not in ("kohya", "diffusers"):
        raise CurateError(f"unknown --format {format!r}; choose kohya or diffusers")
    if copy and link:
        raise CurateError("--copy and --link contradict each other; copying is the default, drop --copy")
    if reg and format != "kohya":
        raise CurateError(
            "--reg works with --format kohya (sd-scripts' is_reg subsets); drop it or use kohya"
        )
    opts: dict = {"trigger": trigger, "class_word": class_word, "resize": resize, "link": link}
    if format == "kohya":
        opts.update(repeats=repeats, flip_aug=flip_aug, reg=reg)
    with _open(path, manifest, config) as ds:
        res = ds.export(out, format, **opts)
    if as_json:
        print_json(res.as_dict())
        return
    rows = [("train", res.train), ("val", res.val), ("regularization", res.reg), ("copied", res.copied),
            ("reflinked (copy-on-write)", res.reflinked), ("linked to the originals", res.linked),
            ("re-encoded", res.reencoded), ("resized to bucket", res.resized)]  # fmt: skip
    console.print(table(f"export ({res.format}) -> {res.out}", ["", "images"], rows))
    for f in res.files:
        console.print(f"wrote {escape(str(res.out / f))}")
    _warn(res.warnings)


def plan(
    path: DatasetArg,
    model: Annotated[str, typer.Option(help="Model family: sd15 or sdxl.")] = DEFAULT_FAMILY,
    vram: Annotated[float, typer.Option(help="GPU memory in GiB.")] = 24.0,
    style: Annotated[str | None, typer.Option(help="anime or realistic (default: from tags).")] = None,
    trigger: Annotated[str | None, typer.Option(help="Trigger word (keep_tokens, sample prompt).")] = None,
    class_word: Annotated[
        str | None, typer.Option("--class", help="Class word for the sample prompt.")
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(help="character, concept or style (default: character with --trigger, else style)."),
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="Training TOML to write (default: <dataset>/.curate/train.toml).")
    ] = None,
    no_upscale: Annotated[
        bool,
        typer.Option(
            "--no-upscale",
            help="Never enlarge images (sd-scripts' bucket_no_upscale), written into the training TOML.",
        ),
    ] = False,
    manifest: ManifestOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
):
    """Recommend LR, epochs, repeats, batch, dim/alpha and steps, with reasons; write the trainer's TOML."""
    from pathlib import Path

    from ..io import STATE_DIR
    from ..stages.plan import write_plan

    with _open(path, manifest, config) as ds:
        p = ds.plan(model=model, vram=vram, style=style, trigger=trigger, class_word=class_word, kind=kind,
                    no_upscale=no_upscale)  # fmt: skip
        target = Path(out) if out else ds.root / STATE_DIR / "train.toml"
    if out and target.exists():
        raise CurateError(f"{target} exists; choose another --out (plans never overwrite your files)")
    write_plan(p, target)
    if as_json:
        print_json({**p.as_dict(), "written": str(target)})
        return
    keys = ["unet_lr", "text_encoder_lr", "epochs", "num_repeats", "batch_size", "grad_accum", "network_dim",
            "network_alpha", "min_snr_gamma", "gradient_checkpointing", "max_steps"]  # fmt: skip
    rows = [(k, p.train[k], p.reasons.get(k, "")) for k in keys]
    if p.train.get("bucket_no_upscale"):
        rows.append(("bucket_no_upscale", True, p.reasons["bucket_no_upscale"]))
    rows.append(("total steps", p.total_steps, p.reasons["total_steps"]))
    sg = p.suggestion
    rows.append(("network (suggested)", sg["network"], f"{sg['kind']} ({sg['kind_reason']}): {sg['reason']}; "
                 f"apply with `curate train DS {sg['apply']}`"))  # fmt: skip
    console.print(table(f"plan: {model}, {vram:g} GiB, {p.images} training images ({p.style})",
                        ["option", "value", "why"], rows))  # fmt: skip
    console.print(
        f"wrote {escape(str(target))} (its \\[train] table is the trainer's config)", highlight=False
    )
    _warn(p.warnings)


def register(app: typer.Typer) -> None:
    for fn in (split, bucket, export, plan):
        app.command(fn.__name__)(handle_errors(fn))
    from ..export.report import SECTIONS
    from ..stages.bucket import report_section

    if report_section not in SECTIONS:
        SECTIONS.append(report_section)
