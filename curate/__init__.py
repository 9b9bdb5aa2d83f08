"""curate: turn a messy folder of images into a clean, captioned, bucketed LoRA training set."""

from __future__ import annotations

from .dataset import Dataset
from .errors import CurateError

__version__ = "0.1.0"


def scan(path: str, **options):
    """Scan ``path`` and return the scan summary (see :meth:`Dataset.scan`)."""
    with Dataset.open(path) as ds:
        return ds.scan(**options)


def dedupe(path: str, **options):
    """Group duplicates in ``path`` and keep the best copy of each (see :meth:`Dataset.dedupe`)."""
    with Dataset.open(path, create=False) as ds:
        return ds.dedupe(**options)


def split(path: str, val: float = 0.1, seed: int = 0, **options):
    """Grouped train/val split of ``path`` (see :meth:`Dataset.split`)."""
    with Dataset.open(path, create=False) as ds:
        return ds.split(val, seed, **options)


def export(path: str, out: str, format: str = "kohya", **options):
    """Export the kept images of ``path`` for a trainer (see :meth:`Dataset.export`)."""
    with Dataset.open(path, create=False) as ds:
        return ds.export(out, format, **options)


def outliers(path: str, **options):
    """Score images by CLIP similarity to their nearest neighbours (see :meth:`Dataset.outliers`)."""
    with Dataset.open(path, create=False) as ds:
        return ds.outliers(**options)


def tag(path: str, **options):
    """Tag ``path`` with a WD14 tagger and write captions (see :meth:`Dataset.tag`)."""
    with Dataset.open(path, create=False) as ds:
        return ds.tag(**options)


def caption(path: str, **options):
    """Caption ``path`` with BLIP and write captions (see :meth:`Dataset.caption`)."""
    with Dataset.open(path, create=False) as ds:
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
