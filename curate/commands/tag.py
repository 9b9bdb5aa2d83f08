"""`curate tag`, `curate caption`, `curate edit`, `curate tags`: thin wrappers over Dataset methods."""

from __future__ import annotations

import shlex
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..dataset import Dataset
from ..errors import CurateError
from ..ui import (
    AddressOpt,
    ConfigOpt,
    DatasetArg,
    JsonOpt,
    ManifestOpt,
    console,
    err_console,
    handle_errors,
    print_json,
    progress_bar,
    table,
)

Trigger = Annotated[
    list[str] | None, typer.Option(help="Trigger word(s), first in every caption (repeat or comma-separate).")
]
Format = Annotated[
    str | None, typer.Option("--format", help="txt (default), caption, or jsonl (metadata.jsonl).")
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace captions curate did not write or you edited (backed up first)."
    ),
]
DropCommon = Annotated[
    float | None, typer.Option(help="Drop tags present in more than this fraction of images (0 = off).")
]
MaxTags = Annotated[
    int | None, typer.Option(min=0, help="At most this many general tags per caption (0 = no cap).")
]


def _triggers(values: list[str] | None) -> tuple[str, ...] | None:
    if not values:
        return None
    return tuple(t.strip() for v in values for t in v.split(",") if t.strip())


def _unit(name: str, v: float | None) -> None:
    if v is not None and not 0.0 <= v <= 1.0:
        raise CurateError(f"{name} must be between 0 and 1, got {v}")


def _print_outcome(title: str, d: dict[str, Any]) -> None:
    run, cap, w = d["run"], d["captions"], d["captions"]["write"]
    rows = []
    if run:
        rows += [
            ("model", run["model"]),
            ("images run through the model", run.get("inferred", run.get("generated", 0))),
            ("images from the score cache", run["cached"]),
            ("unreadable", len(run["failed"])),
            ("model seconds", f"{run['seconds']:.2f}"),
        ]
    rows += [
        ("captions built", cap["images"]),
        ("files written", len(w["written"])),
        ("unchanged", w["unchanged"]),
        ("kept: existing captions (not written by curate)", len(w["kept_user"])),
        ("kept: edited by hand", len(w["kept_edited"])),
        ("kept: written by hand, this edit not applied", len(w.get("not_applied", []))),
        ("backed up before overwrite", len(w["backed_up"])),
        ("trigger / keep_tokens", f"{', '.join(cap['trigger']) or '-'} / {cap['keep_tokens']}"),
        ("dropped as common", ", ".join(cap["dropped_common"]) or "-"),
        ("over 75 CLIP tokens", len(cap["over_limit"])),
    ]
    console.print(table(title, ["", ""], rows))
    if w["kept_user"] or w["kept_edited"]:
        err_console.print(
            "[yellow]existing or hand-edited captions were kept; --overwrite replaces them (with a backup)[/]"
        )
    if w.get("not_applied"):
        err_console.print(
            f"[yellow]kept {len(w['not_applied'])} caption(s) written by hand as they are[/]; rerun the same "
            "command with --overwrite to apply this edit to them (each is backed up first)",
            highlight=False,
        )
    lack = cap.get("lack_trigger") or []
    if lack:  # a caption kept as written (or a trigger added after the edit): the export then pins nothing
        names = ", ".join(lack[:3]) + (f" and {len(lack) - 3} more" if len(lack) > 3 else "")
        trig = ", ".join(cap["trigger"])
        err_console.print(
            f"[yellow]warning[/]: {len(lack)} of {cap['images']} caption(s) do not start with the trigger "
            f"{trig!r} ({escape(names)}), so the export sets keep_tokens = 0 and shuffling moves the trigger; "
            f"put it first in them, or run `curate edit DIR --trigger {shlex.quote(trig)} --overwrite` "
            "(backs them up first)",
            highlight=False,
        )
    for p, n in cap["over_limit"][:10]:
        err_console.print(
            f"[yellow]warning[/]: {escape(p)} has {n} CLIP tokens (> 75); use --max-tags or edit it"
        )


def _explain_device(ds: Dataset, model, device, backend, dtype, batch_size, decode, as_json: bool) -> None:
    """`curate tag --explain-device`: which backend, device, provider and decoder the tagger gets here, and why."""
    import importlib.util

    from ..models.wd14 import load_tagger
    from ..stages.tag import _nvjpeg, decode_choice, tag_config

    cfg = tag_config(
        ds, model=model, device=device, backend=backend, dtype=dtype, batch_size=batch_size, decode=decode
    )
    tagger = load_tagger(cfg.model, cfg.device, cfg.backend, cfg.dtype)
    where, why = decode_choice(cfg.decode, tagger.backend, tagger.device, lambda: _nvjpeg(tagger.device))
    decoding = (
        f"nvJPEG on {tagger.device} for JPEG files, CPU threads for the rest" if where == "gpu" else "CPU"
    )
    env: dict[str, Any] = {}
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime as ort

        env["onnxruntime"] = f"{ort.__version__} ({', '.join(ort.get_available_providers())})"
    if importlib.util.find_spec("torch"):
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["torch"] = f"{torch.__version__}, CUDA: {', '.join(gpus) if gpus else 'none'}"
    d = {"model": cfg.model, "backend": tagger.backend, "why": tagger.why, "device": tagger.device,
         "runtime": tagger.describe(), "batch_size": cfg.batch_size or tagger.default_batch,
         "decode": decoding, "decode_why": why, "notices": tagger.notices, **env}  # fmt: skip
    if as_json:
        print_json(d)
        return
    rows = [
        (k, escape(", ".join(v) if isinstance(v, list) else str(v)))
        for k, v in d.items()
        if v not in ([], "")
    ]
    console.print(table("tagger device", ["", ""], rows))


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def tag(
        path: DatasetArg,
        model: Annotated[
            str | None,
            typer.Option(
                help="WD14 tagger: Hugging Face repo id or folder with model.onnx + selected_tags.csv."
            ),
        ] = None,
        general: Annotated[
            float | None, typer.Option(help="Threshold for general tags (default 0.35).")
        ] = None,
        threshold: Annotated[float | None, typer.Option(help="Same as --general.")] = None,
        character: Annotated[
            float | None, typer.Option(help="Threshold for character tags (default 0.85).")
        ] = None,
        mcut: Annotated[
            bool | None, typer.Option("--mcut/--no-mcut", help="Adaptive MCut thresholds.")
        ] = None,
        rating: Annotated[
            bool | None, typer.Option("--rating/--no-rating", help="Add the rating tag.")
        ] = None,
        trigger: Trigger = None,
        drop_common: DropCommon = None,
        max_tags: MaxTags = None,
        fmt: Format = None,
        device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
        backend: Annotated[
            str | None,
            typer.Option(help="auto (torch when timm weights + CUDA, else onnx), torch or onnx."),
        ] = None,
        batch_size: Annotated[
            int | None, typer.Option(help="Images per model call (default: 32, or sized to GPU memory).")
        ] = None,
        dtype: Annotated[
            str | None,
            typer.Option(
                help="torch backend: auto (bf16/fp16 autocast on GPU), bf16 or fp16 (weights), fp32."
            ),
        ] = None,
        decode: Annotated[
            str | None,
            typer.Option(
                help="auto (nvJPEG on the GPU for JPEGs when the torch backend runs on CUDA), gpu or cpu."
            ),
        ] = None,
        compile_model: Annotated[
            bool | None,
            typer.Option(
                "--compile/--no-compile",
                help="torch backend: torch.compile the model (compiles once, tens of s).",
            ),
        ] = None,
        force: Annotated[
            bool, typer.Option("--force", help="Re-run the model on images already scored.")
        ] = False,
        explain_device: Annotated[
            bool,
            typer.Option(
                "--explain-device", help="Load the tagger, say which backend/device/provider runs, exit."
            ),
        ] = False,
        engine: Annotated[
            str,
            typer.Option(
                "--engine",
                help="local, or ray: the tagger on Ray actors that each load it once (needs the ray extra: pip install curate\\[ray]).",
            ),
        ] = "local",
        address: AddressOpt = None,
        num_gpus: Annotated[
            float,
            typer.Option(
                "--num-gpus", help="--engine ray: one actor per GPU (0: one CPU actor, as without GPUs)."
            ),
        ] = 0,
        overwrite: Overwrite = False,
        manifest: ManifestOpt = None,
        config: ConfigOpt = None,
        as_json: JsonOpt = False,
    ):
        """Tag images with a WD14 tagger and write captions; without new images, only re-thresholds stored scores."""
        general = general if general is not None else threshold
        for n, v in (("--general", general), ("--character", character), ("--drop-common", drop_common)):
            _unit(n, v)
        if backend is not None and backend not in ("auto", "torch", "onnx"):
            raise CurateError(f"--backend {backend!r}: use auto, torch or onnx")
        if engine not in ("local", "ray"):
            raise CurateError(f"unknown engine {engine!r}; choose local or ray")
        if decode is not None and decode not in ("auto", "gpu", "cpu", "threads", "processes"):
            raise CurateError(f"--decode {decode!r}: use auto, gpu or cpu")
        with Dataset.open(path, manifest=manifest, config=config, create=False) as ds:
            if explain_device:
                _explain_device(ds, model, device, backend, dtype, batch_size, decode, as_json)
                return
            with progress_bar("tag", enabled=not as_json) as bar:
                res = ds.tag(
                    model=model, device=device, backend=backend, dtype=dtype, batch_size=batch_size, force=force or None,
                    decode=decode, compile=compile_model,
                    overwrite=overwrite, progress=bar, general=general, character=character, mcut=mcut,
                    rating=rating, trigger=_triggers(trigger), drop_common=drop_common, max_tags=max_tags,
                    format=fmt, engine=engine, address=address, num_gpus=num_gpus,
                )  # fmt: skip
        d = res.as_dict()
        if as_json:
            print_json(d)
            return
        _print_outcome("tag", d)
        run = d["run"]
        for n in run.get("notices", []):
            err_console.print(f"[yellow]notice[/]: {escape(n)}")
        if run.get("backend"):
            err_console.print(
                f"tagger ran on {escape(run['runtime'])}: {run['images_per_second']:.1f} img/s, "
                f"batch {run['batch_size']} ({escape(run['why'])}); decoding on {escape(run['decode'])} "
                f"({escape(run['decode_why'])})"
            )

    @app.command()
    @handle_errors
    def caption(
        path: DatasetArg,
        model: Annotated[
            str | None, typer.Option(help="BLIP model: Hugging Face repo id or local folder.")
        ] = None,
        combine: Annotated[
            bool, typer.Option("--combine", help="Caption = trigger, characters, sentence, stored tags.")
        ] = False,
        prompt: Annotated[
            str | None, typer.Option(help="Text the caption starts with, e.g. 'a photograph of'.")
        ] = None,
        num_beams: Annotated[int | None, typer.Option(help="Beam search width (1 = greedy).")] = None,
        min_length: Annotated[int | None, typer.Option(help="Minimum caption length in tokens.")] = None,
        max_length: Annotated[int | None, typer.Option(help="Maximum caption length in tokens.")] = None,
        trigger: Trigger = None,
        fmt: Format = None,
        device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
        dtype: Annotated[str | None, typer.Option(help="auto (bf16/fp16 on GPU), fp32, fp16, bf16.")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Images per generate call.")] = None,
        force: Annotated[
            bool, typer.Option("--force", help="Caption again images that have a caption.")
        ] = False,
        overwrite: Overwrite = False,
        manifest: ManifestOpt = None,
        config: ConfigOpt = None,
        as_json: JsonOpt = False,
    ):
        """Natural-language captions with BLIP (photos); optionally combined with WD14 tags."""
        with Dataset.open(path, manifest=manifest, config=config, create=False) as ds:
            with progress_bar("caption", enabled=not as_json) as bar:
                res = ds.caption(
                    combine=combine, overwrite=overwrite, progress=bar,
                    caption={"trigger": _triggers(trigger), "format": fmt},
                    model=model, prompt=prompt, num_beams=num_beams, min_length=min_length,
                    max_length=max_length, device=device, dtype=dtype, batch_size=batch_size, force=force or None,
                )  # fmt: skip
        d = res.as_dict()
        print_json(d) if as_json else _print_outcome("caption", d)

    @app.command()
    @handle_errors
    def edit(
        path: DatasetArg,
        remove: Annotated[
            list[str] | None, typer.Option(help="Tag to leave out of every caption (repeatable).")
        ] = None,
        replace: Annotated[
            list[str] | None, typer.Option(help="old=new tag replacement (repeatable).")
        ] = None,
        trigger: Trigger = None,
        drop_common: DropCommon = None,
        general: Annotated[float | None, typer.Option(help="Threshold for general tags.")] = None,
        character: Annotated[float | None, typer.Option(help="Threshold for character tags.")] = None,
        max_tags: MaxTags = None,
        fmt: Format = None,
        reset: Annotated[
            bool, typer.Option("--reset", help="Forget earlier edit/tag choices first.")
        ] = False,
        overwrite: Overwrite = False,
        manifest: ManifestOpt = None,
        config: ConfigOpt = None,
        as_json: JsonOpt = False,
    ):
        """Rewrite captions from stored scores: remove / replace tags, trigger words, common-tag dropping."""
        for n, v in (("--general", general), ("--character", character), ("--drop-common", drop_common)):
            _unit(n, v)
        for r in replace or []:
            if "=" not in r:
                raise CurateError(f"--replace {r!r} needs the form old=new, e.g. --replace '1girl=woman'")
        with Dataset.open(path, manifest=manifest, config=config, create=False) as ds:
            res = ds.edit(
                remove=remove, replace=replace, reset=reset, overwrite=overwrite, trigger=_triggers(trigger),
                drop_common=drop_common, general=general, character=character, max_tags=max_tags, format=fmt,
            )  # fmt: skip
        d = res.as_dict()
        print_json(d) if as_json else _print_outcome("edit", d)

    @app.command()
    @handle_errors
    def tags(
        path: DatasetArg,
        top: Annotated[int, typer.Option(help="Rows of the frequency table.")] = 40,
        manifest: ManifestOpt = None,
        config: ConfigOpt = None,
        as_json: JsonOpt = False,
    ):
        """Tag frequency table, tags present in every image, and CLIP token counts per caption."""
        with Dataset.open(path, manifest=manifest, config=config, create=False) as ds:
            st = ds.tag_stats()
        if as_json:
            print_json(st.as_dict())
            return
        users = f" ({st.user_captions} from captions written by hand)" if st.user_captions else ""
        console.print(
            table(f"tags: {st.tagged} of {st.images} images tagged{users}", ["tag", "images", "share"],
                  [(t, n, f"{f:.0%}") for t, n, f in st.frequency[:top]])
        )  # fmt: skip
        console.print(f"in every image: {escape(', '.join(st.always)) or '-'}")
        counted = [c for _, c in st.tokens if c is not None]
        if counted:
            console.print(
                f"CLIP tokens per caption: min {min(counted)}, median {sorted(counted)[len(counted) // 2]}, "
                f"max {max(counted)}; {st.over_limit} over 75"
            )
            longest = sorted(((p, c) for p, c in st.tokens if c is not None), key=lambda x: -x[1])[:10]
            console.print(table("longest captions", ["file", "tokens"], longest))
