"""curate: turn a messy folder of images into a clean, captioned, bucketed LoRA training set."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import CurateError

if TYPE_CHECKING:
    from .dataset import Dataset


def __getattr__(name: str) -> Any:
    # Lazy, so that `python -m curate` reaches its Ctrl-C handling before PIL / numpy are imported.
    if name == "Dataset":
        from .dataset import Dataset

        return Dataset
    raise AttributeError(f"module 'curate' has no attribute {name!r}")


def _open(path: str, **kwargs: Any) -> Dataset:
    from .dataset import Dataset

    return Dataset.open(path, **kwargs)


__version__ = "0.1.0"


def scan(path: str, **options):
    """Scan ``path`` and return the scan summary (see :meth:`Dataset.scan`)."""
    with _open(path) as ds:
        return ds.scan(**options)


def dedupe(path: str, **options):
    """Group duplicates in ``path`` and keep the best copy of each (see :meth:`Dataset.dedupe`)."""
    with _open(path, create=False) as ds:
        return ds.dedupe(**options)


def split(path: str, val: float = 0.1, seed: int = 0, **options):
    """Grouped train/val split of ``path`` (see :meth:`Dataset.split`)."""
    with _open(path, create=False) as ds:
        return ds.split(val, seed, **options)


def export(path: str, out: str, format: str = "kohya", **options):
    """Export the kept images of ``path`` for a trainer (see :meth:`Dataset.export`)."""
    with _open(path, create=False) as ds:
        return ds.export(out, format, **options)


def outliers(path: str, **options):
    """Score images by CLIP similarity to their nearest neighbours (see :meth:`Dataset.outliers`)."""
    with _open(path, create=False) as ds:
        return ds.outliers(**options)


def tag(path: str, **options):
    """Tag ``path`` with a WD14 tagger and write captions (see :meth:`Dataset.tag`)."""
    with _open(path, create=False) as ds:
        return ds.tag(**options)


def caption(path: str, **options):
    """Caption ``path`` with BLIP and write captions (see :meth:`Dataset.caption`)."""
    with _open(path, create=False) as ds:
        return ds.caption(**options)


__all__ = [
    "Dataset",
    "CurateError",
    "scan",
    "dedupe",
    "outliers",
    "tag",
    "caption",
    "split",
    "export",
    "__version__",
]
