"""Terminal output shared by every command: rich console, progress bars, tables, --json, one-line errors."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from .errors import CurateError
from .faults import call_translated, interrupt_exit_code

console = Console()
err_console = Console(stderr=True)

# Options every command shares.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]
ManifestOpt = Annotated[
    str | None, typer.Option("--manifest", help="Manifest path (default: <dataset>/.curate/manifest.db).")
]
ConfigOpt = Annotated[
    str | None, typer.Option("--config", help="TOML options (default: <dataset>/curate.toml).")
]
DatasetArg = Annotated[str, typer.Argument(help="Dataset folder.")]
AddressOpt = Annotated[
    str | None, typer.Option("--address", help="Ray cluster to join (e.g. auto); default starts a local Ray.")
]


def handle_errors(fn: Callable) -> Callable:
    """Turn user errors into one red line and a non-zero exit; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return call_translated(fn, *args, **kwargs)  # disk full, read-only, busy manifest: one line
        except CurateError as exc:
            err_console.print(
                Text.assemble(("error:", "bold red"), " ", exc.message), highlight=False, soft_wrap=True
            )
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            err_console.print("[yellow]interrupted[/]: work already committed is kept; rerun to continue")
            raise typer.Exit(interrupt_exit_code(exc)) from None  # 130 Ctrl-C, 143 SIGTERM

    return wrapper


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """A table whose title, headers and cells are plain text: a file named ``[red]x.jpg`` shows as is."""
    t = Table(title=Text(str(title)), title_justify="left", show_lines=False)
    for c in columns:
        t.add_column(Text(str(c)), overflow="fold")
    for r in rows:
        t.add_row(*(x if isinstance(x, Text) else Text(str(x)) for x in r))
    return t


def warn(message: str, *, stderr: bool = True) -> None:
    """Print ``warning: message`` (the message as plain text, never markup) on stderr or stdout."""
    con = err_console if stderr else console
    con.print(Text.assemble(("warning:", "yellow"), " ", str(message)), highlight=False, soft_wrap=True)


def say(*parts: Any, style: str | None = None) -> None:
    """Print user text (paths, names) on stdout without interpreting ``[...]`` as markup."""
    console.print(Text(" ".join(str(p) for p in parts), style=style or ""), highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """Yield a callback(done, total) that drives a rich progress bar (silent when disabled)."""
    if not enabled:
        yield lambda done, total: None
        return
    prog = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
    task = prog.add_task(description, total=None, rate="")
    import time

    t0 = time.perf_counter()

    started = False

    def update(done: int, total: int) -> None:
        nonlocal started
        if not started:  # shown from the first report on: an early error stays a single line
            prog.start()
            started = True
        dt = time.perf_counter() - t0
        rate = f"{done / dt:.0f}/s" if dt > 0 and done else ""
        prog.update(task, completed=done, total=total, rate=rate)

    try:
        yield update
    finally:
        if started:
            prog.stop()
