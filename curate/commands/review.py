"""`curate review`: the review page in the browser (duplicates, rejects, captions, split, buckets)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..ui import ConfigOpt, DatasetArg, ManifestOpt, handle_errors, say


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def review(
        path: DatasetArg,
        port: Annotated[
            int | None, typer.Option("--port", help="Port on 127.0.0.1 (default: a free one).")
        ] = None,
        no_open: Annotated[
            bool, typer.Option("--no-open", help="Print the address only; do not open a browser.")
        ] = False,
        manifest: ManifestOpt = None,
        config: ConfigOpt = None,
    ):
        """Look at and correct curate's decisions in a local web page; every change is written to the
        manifest at once, with undo. Stop with Ctrl-C."""
        from ..review.server import serve

        serve(
            path,
            manifest=manifest,
            config=config,
            port=port,
            open_browser=not no_open,
            say=lambda text: say(f"curate review: open {text}  (Ctrl-C stops it)"),
            say_stopped=lambda: say("curate review stopped; every change is in the manifest"),
        )
