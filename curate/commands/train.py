"""`curate train` and `curate lora-info`: thin commands over trainer_bridge (imported when they run)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import CurateError
from ..ui import JsonOpt, console, handle_errors, print_json, table, warn


def _training_data(
    source: Path,
    output_dir: Path,
    repeats: int,
    trigger: str | None,
    class_word: str | None,
    reg: Path | None = None,
    family: str = "sd15",
    resolution: int = 0,
    captions: dict | None = None,
    no_upscale: bool = False,
) -> str:
    """A kohya folder / dataset TOML as is; a curate dataset exported into ``output_dir/data``.

    The export is reused only while its fingerprint (kept images and their bytes, captions, splits,
    concepts, reg images, options, format version) matches what an export would write now; otherwise
    it is re-exported into a sibling folder and swapped in atomically. A quick scan first picks up
    files and caption files changed since the last scan, so the export is never stale.
    """
    if not (source / ".curate" / "manifest.db").exists():
        for flag, value in (("--trigger", trigger), ("--class", class_word)):
            if value is not None:  # only curate's export writes them into captions / folder names
                raise CurateError(
                    f"{flag} applies to a curated dataset; {source} has no manifest, so it trains as it is: "
                    f"run `curate scan {source}` first, or name its folder 5_{value} (repeats_words) or put "
                    "the word in its caption files"
                )
        if reg is not None:
            raise CurateError(
                f"--reg applies to a curated dataset; {source} is a kohya folder or dataset TOML: "
                "add an is_reg = true subset to its dataset TOML instead"
            )
        return str(source)
    from ..dataset import Dataset
    from ..export.fingerprint import changed_images, read_export_record
    from ..export.kohya import export_kohya, kohya_layout

    target = output_dir / "data"
    captions = dict(captions or {})  # shuffle_caption / flip_aug / keep_tokens the user chose for this run
    keep = captions.pop("keep_tokens", None)
    opts = {"repeats": repeats, "trigger": trigger, "class_word": class_word, "reg": reg, **captions}
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1 and read_export_record(target) is None:  # before touching the manifest
        raise CurateError(
            f"export the dataset once before torchrun: curate export {source} {target} --format kohya "
            "(or use curate train --gpus N, which exports first)"
        )
    # every torchrun rank opens it: only a single process takes the writer lock (and scans)
    with Dataset.open(source, create=False, write=ranks == 1) as ds:
        if ranks == 1:  # under torchrun every rank would scan at once; the launcher's export decides
            scan = ds.scan()
            if scan.decoded or scan.missing:
                console.print(
                    f"scan: {scan.decoded} new and {scan.missing} missing image(s) since the last scan "
                    "(new images are not filtered or deduplicated: run `curate run` to curate them)",
                    highlight=False,
                )
        old = read_export_record(target)
        if ranks > 1 and old is None:
            raise CurateError(
                f"export the dataset once before torchrun: curate export {source} {target} --format kohya "
                "(or use curate train --gpus N, which exports first)"
            )
        import dataclasses

        from ..stages.bucket import family_settings, stored_settings

        stored = stored_settings(ds.manifest)
        if stored is None:  # no `curate bucket`: the buckets of what this run trains
            opts["settings"] = family_settings(family, resolution=resolution or None, no_upscale=no_upscale)
        elif no_upscale and not stored.no_upscale:  # --no-upscale over a `curate bucket` without it
            opts["settings"] = dataclasses.replace(stored, no_upscale=True)
        layout = kohya_layout(ds.manifest, **opts)
        if keep is not None:  # the dataset TOML's keep_tokens wins over [train]'s: write the chosen one there
            layout.keep_tokens = keep
            for sub in layout.subsets:
                sub.keep_tokens = keep
            layout.warnings[:] = [w for w in layout.warnings if "keep_tokens = 0 there" not in w]
        if old and old.get("fingerprint") == layout.fingerprint() and (target / "dataset.toml").is_file():
            console.print(f"reusing the export in {escape(str(target))} (unchanged)", highlight=False)
            for w in layout.warnings:  # still true of what trains (a 0_name folder left out, ...)
                console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
            return str(target / "dataset.toml")
        edited = _edited_in_export(target, old) if old else []
        if edited:  # a fix made in the export itself: replacing the folder would lose it without a word
            raise CurateError(
                f"{len(edited)} caption(s) were edited in {target} (e.g. {edited[0][0]}, the caption of "
                f"{edited[0][1]}) and the re-export this run needs would replace them: put the fix in the "
                f"dataset's caption ({edited[0][1]}'s .txt in {source}) or move {target} away, then rerun"
            )
        if ranks > 1:
            raise CurateError(
                f"the export in {target} is out of date (the dataset or the export options changed); "
                "refresh it before torchrun: use curate train --gpus N, which re-exports first"
            )
        res = export_kohya(ds.manifest, target, replace=True, layout=layout)
    for w in res.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
    counts = f"{res.train} training, {res.val} validation" + (
        f", {res.reg} regularization" if res.reg else ""
    )
    if old is None:
        console.print(f"exported {counts} images to {escape(str(target))}", highlight=False)
    else:
        new = read_export_record(target) or {}
        n = changed_images(old, new)
        was, now = old.get("options") or {}, new.get("options") or {}
        opts_changed = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
        why = f"{n} image(s) changed" + (
            f", options changed: {', '.join(opts_changed)}" if opts_changed else ""
        )
        if not n and not opts_changed:
            why = "0 changed (the export format changed)"
        console.print(f"re-exported: {why}; {counts} images in {escape(str(target))}", highlight=False)
    return str(target / "dataset.toml")


def _name_sources(message: str, target: Path, source: Path) -> str:
    """``message`` with each exported image's path in ``target`` replaced by its file in the dataset ``source``
    (the one a person removes or enlarges; the export is rewritten from it)."""
    from ..export.fingerprint import read_export_record

    record = read_export_record(target) or {}
    for rec in record.get("images") or []:
        if not isinstance(rec, dict) or not rec.get("file") or not rec.get("source"):
            continue
        for base in {target, target.resolve()}:
            message = message.replace(str(base / rec["file"]), str(source / rec["source"]))
    return message


def _edited_in_export(target: Path, record: dict) -> list[tuple[str, str]]:
    """(caption file in the export, its source image) for each exported caption whose text is no longer what
    the export wrote (kept in its curate_export.json), i.e. edited there by hand."""
    from ..export.kohya import CAPTION_EXTENSION

    edited = []
    for im in record.get("images") or []:
        f = target / Path(im.get("file", "")).with_suffix(CAPTION_EXTENSION)
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # gone or unreadable: nothing of the user's to keep
        if im.get("caption") is not None and text.strip() != str(im["caption"]).strip():
            edited.append((str(f.relative_to(target)), str(im.get("source", ""))))
    return edited


SUBSET_COLUMNS = (
    "folder",
    "images",
    "repeats",
    "keep_tokens",
    "shuffle",
    "flip",
    "class",
    "reg",
)  # SUBSET_KEYS


def _cell(v) -> str:
    """A subset setting as lora-info's table shows it: yes / no, '-' where the file does not say."""
    if v is None or v == "":
        return "-"
    return "yes" if v is True else "no" if v is False else str(v)


def _step_kind(t: dict) -> str:
    """How the steps ran: CUDA graphs / eager / plain, the norms' precision, and compile."""
    kind = {"graph": "CUDA graphs", "eager": "fast step, no graphs", "plain": "plain"}.get(t.get("step"), "-")
    norms = {"bf16": ", bf16 norms", "fp32": ", fp32 norms"}.get(t.get("norms"), "")
    comp = {True: ", compiled", "regional": ", regional compile"}.get(t.get("compile"), "")
    return kind + norms + comp


def summary_table(t: dict):
    """Where the time of a training went: model load, latent and text-encoder caches, steps (steady img/s), total."""

    def cache_row(key: str, seconds: float, what: str) -> str:
        if f"{key}_encoded" not in t:
            return f"{seconds:.1f} s (not cached)"
        pruned = t.get(f"{key}_pruned")
        gone = f", {pruned} stale removed" if pruned else ""
        return f"{seconds:.1f} s ({t[f'{key}_encoded']} {what} encoded, {t[f'{key}_cached']} from the cache{gone})"

    steady = t.get("steady_img_s")
    rows = [
        ("model load", f"{t.get('load_s', 0.0):.1f} s"),
        ("latent cache", cache_row("latents", t.get("latent_cache_s", 0.0), "images")),
        ("text-encoder cache", cache_row("te", t.get("te_cache_s", 0.0), "captions")),
        ("training steps", f"{t.get('train_s', 0.0):.1f} s"),
        ("steady speed", f"{steady:.2f} img/s" if steady else "n/a (too few steps after the warm-up)"),
        ("step", _step_kind(t)),
        ("total wall time", f"{t.get('total_s', 0.0):.1f} s"),
    ]
    return table("training time", ["", "value"], rows)


def register(app: typer.Typer) -> None:
    """Add `train` and `lora-info` to the curate app."""

    @app.command("train")
    @handle_errors
    def train_cmd(
        source: Annotated[
            Path | None,
            typer.Argument(
                help="A curated dataset folder, a kohya folder / dataset TOML, or a training TOML."
            ),
        ] = None,
        config: Annotated[
            Path | None, typer.Option(help="Training TOML with a \\[train] table (from `curate plan`).")
        ] = None,
        base: Annotated[
            str | None, typer.Option(help="Base model: diffusers folder, .safetensors or hub id.")
        ] = None,
        family: Annotated[str | None, typer.Option(help="sd15 or sdxl.")] = None,
        output_dir: Annotated[
            str | None, typer.Option(help="Where the LoRA, states, samples and logs go.")
        ] = None,
        resume: Annotated[
            str | None, typer.Option(help="A state folder written by an earlier run or Ctrl-C.")
        ] = None,
        trigger: Annotated[
            str | None, typer.Option(help="Trigger word when exporting a curated dataset.")
        ] = None,
        class_word: Annotated[
            str | None, typer.Option("--class", help="Class word for the kohya folder.")
        ] = None,
        reg: Annotated[
            Path | None,
            typer.Option("--reg", help="Folder of regularization images, exported with a curated dataset."),
        ] = None,
        gpus: Annotated[
            int | None,
            typer.Option(
                help="Data-parallel ranks on this host (torch DDP); torchrun / accelerate launch also work."
            ),
        ] = None,
        no_upscale: Annotated[
            bool,
            typer.Option(
                "--no-upscale",
                help="Never enlarge images (sd-scripts' bucket_no_upscale): one smaller than the resolution "
                "trains at its own size, cropped to a multiple of the bucket step.",
            ),
        ] = False,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", help="Override any option: --set unet_lr=5e-5 (repeatable)."),
        ] = None,
        as_json: Annotated[
            bool,
            typer.Option(
                "--json",
                help="Print the result (files, steps, epochs table) as JSON; progress goes to stderr.",
            ),
        ] = False,
    ) -> None:
        """Train a LoRA on a curated dataset (exported on the fly) or a kohya folder; Ctrl-C saves a resumable state."""
        import contextlib
        import shlex
        import sys

        if as_json:  # stdout is for the JSON alone: messages and progress (also of DDP ranks) go to stderr
            was = os.environ.get("CURATE_TRAIN_LOG")
            os.environ["CURATE_TRAIN_LOG"] = "stderr"
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    result = _run(source, config, base, family, output_dir, resume, trigger, class_word, reg,
                                  gpus, set_, no_upscale)  # fmt: skip
            finally:
                os.environ.pop("CURATE_TRAIN_LOG") if was is None else os.environ.update(CURATE_TRAIN_LOG=was)
            if result is not None:
                print_json(_result_json(result))
            if result is not None and result.interrupted:
                import signal

                raise typer.Exit(143 if result.signal == signal.SIGTERM else 130)
            return
        result = _run(source, config, base, family, output_dir, resume, trigger, class_word, reg, gpus, set_,
                      no_upscale)  # fmt: skip
        if result is None:
            return  # a torchrun / accelerate rank other than 0: rank 0 reports
        console.print(summary_table(result.timings))
        if result.interrupted:
            state = shlex.quote(str(Path(result.state_path).resolve()))
            console.print(
                f"stopped at step {result.steps}; resume with: curate train --resume {escape(state)}",
                highlight=False,
                soft_wrap=True,
            )
            import signal

            # interrupted, as after Ctrl-C (130) or SIGTERM (143) anywhere else
            raise typer.Exit(143 if result.signal == signal.SIGTERM else 130)
        _print_epochs(result)
        console.print(
            f"saved {escape(str(result.lora_path))} ({result.steps} steps)", highlight=False, soft_wrap=True
        )

    def _run(
        source, config, base, family, output_dir, resume, trigger, class_word, reg, gpus, set_, no_upscale
    ):
        """Build the config from the arguments, export a curated dataset if need be, train; None on ranks > 0."""
        import dataclasses

        from trainer_bridge import TrainConfig, train
        from trainer_bridge.config import FAMILY_RESOLUTION, check_output_dir

        if source is not None and source.suffix == ".toml" and config is None and source.is_file():
            import tomllib

            try:
                is_training_toml = "train" in tomllib.loads(source.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise CurateError(f"{source} is not valid TOML: {e}") from None
            if is_training_toml:
                source, config = None, source  # a training TOML given positionally
        if config is not None and not config.exists():
            raise CurateError(
                f"config {config} does not exist; write one with `curate plan DATASET --out train.toml`"
            )
        if source is not None and not source.exists():
            raise CurateError(
                f"{source} does not exist; pass a dataset folder, a kohya folder or a dataset TOML"
            )
        if config:
            cfg = TrainConfig.from_toml(config)
        elif resume:  # the run as it was configured, data source included: `--resume STATE` alone
            from trainer_bridge.state import state_config

            names = {f.name for f in dataclasses.fields(TrainConfig)}
            recorded = {k: v for k, v in state_config(resume).items() if k in names}
            cfg = TrainConfig.from_dict({**recorded, "stop_after_steps": 0})
        else:
            cfg = TrainConfig()
        opts = {
            "base": base,
            "model_family": family,
            "output_dir": output_dir,
            "resume": resume,
            "gpus": gpus,
            "bucket_no_upscale": True if no_upscale else None,
        }
        cfg = cfg.override({k: v for k, v in opts.items() if v is not None}).override(list(set_ or []))
        # caption options chosen for this run (--set, or the [train] table), which an export must carry: its
        # dataset TOML's values win over [train]'s in the trainer, as in sd-scripts
        chosen = {item.partition("=")[0].strip() for item in set_ or []}
        if config:
            import tomllib

            table_ = tomllib.loads(config.read_text(encoding="utf-8"))
            table_ = table_.get("train", table_)
            chosen |= {k for k in ("shuffle_caption", "flip_aug") if k in table_}
            chosen |= {"keep_tokens"} if table_.get("keep_tokens") else set()  # 0 there is the plan's default
        captions = {k: getattr(cfg, k) for k in ("shuffle_caption", "flip_aug", "keep_tokens") if k in chosen}
        check_output_dir(cfg.output_dir)  # before the on-the-fly export writes into it
        if source is not None:
            from trainer_bridge.models import check_family

            fam = check_family(cfg.base, cfg.model_family)[0] if cfg.base else cfg.model_family or "sd15"
            data = _training_data(source, Path(cfg.output_dir).expanduser(), cfg.num_repeats, trigger, class_word,
                                  reg, fam, cfg.resolution, captions, cfg.bucket_no_upscale)  # fmt: skip
            if data != str(source) and not cfg.resolution:
                # a curated dataset: the export's TOML does not choose the resolution (--set > plan > family)
                cfg = cfg.override({"resolution": FAMILY_RESOLUTION[fam]})
            cfg = cfg.override({"data": data})
        if not cfg.data:
            raise CurateError(
                "no training data: pass a dataset folder (curate train ./ds) or set data in [train]"
            )
        try:
            result = train(cfg)
        except CurateError as exc:  # a refusal about an exported copy: name the dataset's file instead
            if source is None or cfg.data == str(source):
                raise
            raise type(exc)(_name_sources(str(exc), Path(cfg.data).parent, Path(source))) from None
        if result.lora_path is None and result.state_path is None:
            return None
        return result

    def _print_epochs(result) -> None:
        """The epochs table (best marked), the overfitting warning and where the sample grid is."""
        from trainer_bridge import epochs as E

        if not result.epochs:
            return
        rows = E.table_rows(result.epochs)
        console.print(table("epochs", ["epoch", "step", "train loss", "val loss", "file", ""], rows))
        if any(r.removed for r in result.epochs):
            console.print(
                "removed: deleted by keep_last_n (the best epoch's file is always kept)", highlight=False
            )
        if E.best_index(result.epochs) is None:
            console.print(
                "no validation set: the best epoch is not chosen (add a val split)", highlight=False
            )
        for w in result.warnings:
            warn(w, stderr=False)
        if result.epochs_grid:
            console.print(
                f"samples per epoch: {escape(str(result.epochs_grid))}", highlight=False, soft_wrap=True
            )

    def _result_json(result) -> dict:
        from trainer_bridge import epochs as E

        return {
            "lora": str(result.lora_path) if result.lora_path else None,
            "state": str(result.state_path) if result.state_path else None,
            "steps": result.steps,
            "epoch": result.epoch,
            "interrupted": result.interrupted,
            "losses": result.losses,
            "val_losses": result.val_losses,
            "timings": result.timings,
            **E.summary(result.epochs),
            "warnings": result.warnings,
            "epochs_grid": str(result.epochs_grid) if result.epochs_grid else None,
            "epochs_log": str(result.epochs_log) if result.epochs_log else None,
            "earlier_run": str(result.earlier_run) if result.earlier_run else None,
            "small_images": result.small_images,
        }

    @app.command("lora-info")
    @handle_errors
    def lora_info_cmd(
        file: Annotated[Path, typer.Argument(help="A LoRA .safetensors file.")],
        as_json: JsonOpt = False,
    ) -> None:
        """Rank, alpha, base model, learning rates, tag frequency and per-subset settings from a LoRA's metadata."""
        from trainer_bridge import lora_info
        from trainer_bridge.export import SUBSET_KEYS

        info = lora_info(str(file))
        if as_json:
            print_json(info)
            return
        keys = ("rank", "alpha", "modules", "unet_modules", "text_encoder_modules", "base_model", "base_model_name",
                "v_prediction", "network_module", "network_args", "unet_lr", "text_encoder_lr", "optimizer",
                "epochs", "steps", "resolution", "num_train_images", "bucket_no_upscale", "model_hash")  # fmt: skip
        rows = [(k, info[k]) for k in keys] + [
            ("top tags", ", ".join(f"{tag} ({n})" for tag, n in info["top_tags"][:10]))
        ]
        if info.get("resize"):  # from `curate lora-resize`
            from trainer_bridge.resize import describe

            rows.append(("resize", describe(info["resize"])))
        console.print(table(str(file), ["", "value"], rows))
        if info["subsets"]:  # ss_datasets: what each subset's captions and images got
            n = len(SUBSET_KEYS) - (
                not any(s["is_reg"] for s in info["subsets"])
            )  # no reg subset: no reg column
            rows = [[_cell(s[k]) for k in SUBSET_KEYS[:n]] for s in info["subsets"]]
            console.print(table("subsets", SUBSET_COLUMNS[:n], rows))
        if info.get("problems"):
            warn(f"{file}: {'; '.join(info['problems'])} (shown as missing above)")
