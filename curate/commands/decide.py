"""`curate keep` / `curate reject`: a person's decision on single files, recorded in the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..dataset import Dataset
from ..errors import CurateError
from ..io import STATE_DIR
from ..manifest import MANIFEST_NAME
from ..ui import ConfigOpt, JsonOpt, ManifestOpt, console, handle_errors, print_json

Files = Annotated[
    list[str],
    typer.Argument(
        help="Image files (relative to the dataset or absolute inside it). The dataset folder may come "
        "first: curate keep DIR FILE..."
    ),
]
DatasetOpt = Annotated[
    str | None, typer.Option("--dataset", "-d", help="Dataset folder (default: found from the files).")
]
Undo = Annotated[bool, typer.Option("--undo", help="Forget the manual decision on these files instead.")]


def _find_root(items: list[str], dataset: str | None, manifest: str | None) -> tuple[str, list[str]]:
    """(dataset folder, files): --dataset, else a first argument that is a folder, else the nearest
    folder above the first file that holds a manifest."""
    if dataset is not None:
        return dataset, items
    if len(items) >= 2 and Path(items[0]).is_dir():
        return items[0], items[1:]
    if not items or (len(items) == 1 and Path(items[0]).is_dir()):
        raise CurateError("no files given; pass the files to decide on: curate keep DIR FILE...")
    if manifest is None:
        start = Path(items[0]).expanduser().absolute()
        for folder in start.parents:
            if (folder / STATE_DIR / MANIFEST_NAME).exists():
                return str(folder), items
    raise CurateError(
        f"cannot tell which dataset {items[0]} belongs to; pass the dataset folder first: "
        f"curate keep DIR {items[0]}"
    )


def _decide(
    items: list[str],
    decision: str,
    reason: str | None,
    undo: bool,
    dataset: str | None,
    manifest: str | None,
    config: str | None,
    as_json: bool,
) -> None:
    root, files = _find_root(items, dataset, manifest)
    if not files:
        raise CurateError(f"no files given after the dataset folder; curate {decision} {root} FILE...")
    with Dataset.open(root, manifest=manifest, config=config, create=False) as ds:
        if undo:
            paths = ds.undecide(files)
        elif decision == "keep":
            paths = ds.keep(files)
        else:
            paths = ds.reject(files, reason or "manual")
        rejects = ds.manifest.rejected_paths(raw=True)
        unusable = [p for p in paths if any(s == "scan" for s, _, _ in rejects.get(p, []))]
        errors = {p for r in ds.manifest.images(include_errors=True) if r.error for p in r.paths}
        unusable += [p for p in paths if p in errors and p not in unusable]
        counts = ds.summary()
    out = {
        "decision": None if undo else decision,
        "reason": reason if decision == "reject" and not undo else None,
        "paths": paths,
        "unusable": unusable if decision == "keep" and not undo else [],
        "summary": counts,
    }
    if as_json:
        print_json(out)
        return
    what = "forgot the manual decision on" if undo else ("kept" if decision == "keep" else "rejected")
    console.print(f"{what} {len(paths)} file(s) by hand", highlight=False)
    for p in out["unusable"]:
        console.print(
            f"[yellow]warning[/]: {escape(p)} cannot be used (the scan found it unreadable); it stays out"
        )


def register(app: typer.Typer) -> None:
    """Add `keep` and `reject` to the curate app."""

    @app.command()
    @handle_errors
    def keep(
        files: Files,
        undo: Undo = False,
        dataset: DatasetOpt = None,
        manifest: ManifestOpt = None,
        config: ConfigOpt = None,
        as_json: JsonOpt = False,
    ):
        """Keep files whatever the filter and dedupe decide (re-runs keep the decision)."""
        _decide(files, "keep", None, undo, dataset, manifest, config, as_json)

    @app.command()
    @handle_errors
    def reject(
        files: Files,
        reason: Annotated[str, typer.Option(help="Why (shown in the report and status).")] = "manual",
        undo: Undo = False,
        dataset: DatasetOpt = None,
        manifest: ManifestOpt = None,
        config: ConfigOpt = None,
        as_json: JsonOpt = False,
    ):
        """Reject files by hand; every later stage leaves them out and `curate apply` quarantines them."""
        _decide(files, "reject", reason, undo, dataset, manifest, config, as_json)
