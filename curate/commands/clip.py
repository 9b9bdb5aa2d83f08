"""`curate outliers`: images far from the rest of the set by CLIP similarity (flagged, never rejected)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..ui import (
    ConfigOpt,
    DatasetArg,
    JsonOpt,
    ManifestOpt,
    console,
    handle_errors,
    print_json,
    progress_bar,
    table,
)


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def outliers(
        path: DatasetArg,
        k: Annotated[int | None, typer.Option(help="Neighbours averaged per image (default 10).")] = None,
        z: Annotated[
            float | None, typer.Option(help="Flag scores below median - z * robust std (default 3).")
        ] = None,
        top: Annotated[int, typer.Option(help="Rows shown in the table (lowest scores first).")] = 20,
        model: Annotated[
            str | None, typer.Option(help="CLIP model: open_clip name, hf-hub: id or local path.")
        ] = None,
        pretrained: Annotated[
            str | None, typer.Option(help="open_clip pretrained tag or .safetensors file.")
        ] = None,
        device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: auto).")] = None,
        batch_size: Annotated[int | None, typer.Option(help="CLIP batch size.")] = None,
        manifest: ManifestOpt = None,
        config: ConfigOpt = None,
        as_json: JsonOpt = False,
    ):
        """Score images by mean CLIP similarity to their nearest neighbours; list the lowest for review."""
        from ..cli import _open

        with _open(path, manifest, config, create=False) as ds:
            with progress_bar("embed", enabled=not as_json) as bar:
                res = ds.outliers(
                    k=k,
                    z=z,
                    model=model,
                    pretrained=pretrained,
                    device=device,
                    batch_size=batch_size,
                    progress=bar,
                )
        if as_json:
            print_json({"outliers": res.as_dict()})
            return
        flagged = set(res.flagged)
        rows = [(p, f"{s:.4f}", "review" if p in flagged else "") for p, s in res.scores[:top]]
        console.print(
            table(
                f"outliers: {len(res.flagged)} of {len(res.scores)} images flagged "
                f"(k={res.k}, cutoff {res.cutoff:.4f}, median {res.stats['median']:.4f}); nothing rejected",
                ["image", "mean sim to k nearest", "flag"],
                rows,
            )
        )
