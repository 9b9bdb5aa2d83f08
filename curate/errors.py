"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class CurateError(Exception):
    """A problem with the user's input, with the fix in the message.

    ``exit_code`` is 2 for usage/input problems; ``curate check`` uses 1 for rule violations.
    """

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class MissingDependency(CurateError):
    """An optional extra is not installed."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed; install it with: pip install 'curate[{extra}]'")


def require(module: str, extra: str, package: str | None = None):
    """Import an optional heavy module, or raise a one-line install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise MissingDependency(package or module, extra) from exc
