"""What the environment can do to a command (signals, full or read-only disks, a busy or damaged manifest),
turned into one line each. Programming errors are never translated: they keep their traceback.

Light on purpose (stdlib only): ``curate.__main__`` imports it before anything heavy so that a Ctrl-C during
start-up exits 130 quietly.
"""

from __future__ import annotations

import errno
import signal
import sqlite3
import sys
from collections.abc import Callable
from typing import Any

from .errors import CurateError

SIGINT_EXIT = 130  # 128 + SIGINT
SIGTERM_EXIT = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so that every ``except KeyboardInterrupt`` commits and cleans up."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def install_signal_handlers() -> None:
    """SIGINT raises KeyboardInterrupt and SIGTERM raises :class:`Terminated` (main thread only)."""
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave the handlers alone
        pass


def interrupt_exit_code(exc: BaseException | None = None) -> int:
    """143 after SIGTERM, 130 after Ctrl-C."""
    return SIGTERM_EXIT if isinstance(exc, Terminated) else SIGINT_EXIT


def interrupted_message() -> str:
    return "interrupted: work already committed is kept; rerun to continue"


# -- OSError -------------------------------------------------------------------------------------------
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_WRITE = {errno.EROFS, errno.EACCES, errno.EPERM}


def _name(exc: OSError, target: bool = False) -> str:
    # copy errors carry (source, destination): for a full disk the destination is the one that failed
    name = (exc.filename2 if target else None) or exc.filename
    return str(name) if name else "a file"


def os_error(exc: OSError) -> CurateError | None:
    """A one-line error for what the disk did (full, read-only, permissions, I/O); None for anything else."""
    code = exc.errno
    if code in _DISK_FULL:
        what = "quota exceeded" if code != errno.ENOSPC else "disk full"
        return CurateError(f"{what} while writing {_name(exc, True)}; free space and rerun", exit_code=1)
    if code == errno.EROFS:
        return CurateError(
            f"cannot write {_name(exc)}: the file system is read-only; make it writable, or keep curate's "
            "files elsewhere (--manifest PATH for the manifest, --out PATH for exports)",
            exit_code=1,
        )
    if code in (errno.EACCES, errno.EPERM):
        return CurateError(
            f"permission denied: {_name(exc)}; fix its permissions (chmod/chown) or use another location",
            exit_code=1,
        )
    if code == errno.EIO:
        return CurateError(f"I/O error on {_name(exc)}; check the disk and rerun", exit_code=1)
    if code in (errno.ENOTDIR, errno.EEXIST) and exc.filename:
        blocker = _file_in_path(str(exc.filename))  # e.g. --out notes.txt/plan.toml: a folder is needed there
        if blocker is not None:
            return CurateError(
                f"{blocker} is a file where a folder is needed (for {exc.filename}); choose another path"
            )
    return None


def _file_in_path(name: str) -> str | None:
    """The first existing non-folder among ``name`` and its parents (what made a mkdir or open fail)."""
    from pathlib import Path

    path = Path(name)
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else str(p)
    return None


# -- sqlite3 -------------------------------------------------------------------------------------------
def sqlite_error(exc: sqlite3.Error) -> CurateError | None:
    """A one-line error for a full disk, a read-only, busy, vanished or damaged manifest; None otherwise."""
    from . import manifest as _m

    text = str(exc).lower()
    path = _m.last_opened()
    where = f"the manifest {path}" if path else "the manifest"
    if "database or disk is full" in text:
        return CurateError(f"disk full while writing {where}; free space and rerun", exit_code=1)
    if "readonly database" in text:
        return CurateError(
            f"{where} is read-only; make it writable or pass --manifest PATH to keep it elsewhere",
            exit_code=1,
        )
    if "database is locked" in text or "database is busy" in text or "table is locked" in text:
        return CurateError(
            f"busy: another program keeps {where} locked; wait for it to finish and rerun "
            "(curate --wait waits for another curate)",
            exit_code=75,
        )
    if "disk i/o error" in text and path is not None and _nearly_full(path.parent):
        return CurateError(f"disk full while writing {where}; free space and rerun", exit_code=1)
    if "disk i/o error" in text:
        return CurateError(
            f"disk I/O error on {where} (deleted, moved or a failing disk?); check it and rerun", exit_code=1
        )
    if "unable to open database file" in text:
        return CurateError(
            f"cannot open {where}; check that its folder exists and is writable, or pass --manifest PATH",
            exit_code=1,
        )
    if _m.is_corruption(exc) and path is not None and _m.is_damaged(path):  # not some other database
        return _m.damaged_error(path, str(exc))
    return None


def _nearly_full(folder: Any) -> bool:
    """sqlite reports a full disk as an I/O error when it cannot grow its shared-memory file."""
    import os

    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def call_translated(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; environmental OSError / sqlite3 errors become a :class:`CurateError` (one line)."""
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        err = os_error(exc)
        if err is None:
            raise
        raise err from None
    except sqlite3.Error as exc:
        err = sqlite_error(exc)
        if err is None:
            raise
        raise err from None


def quiet_interrupt(exc: KeyboardInterrupt) -> None:
    """Print the one interrupted line and exit 130 / 143 (used before typer has started)."""
    sys.stderr.write(interrupted_message() + "\n")
    sys.exit(interrupt_exit_code(exc))
