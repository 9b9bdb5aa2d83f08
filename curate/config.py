"""Options for every stage as frozen dataclasses, loadable from ``curate.toml`` in the dataset root.

A ``curate.toml`` looks like::

    [filter]
    min_side = 512
    min_sharpness = 40.0

    [dedupe]
    phash_threshold = 8
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import CurateError

CONFIG_NAME = "curate.toml"


@dataclass(frozen=True)
class ScanConfig:
    workers: int = 0  # 0 = all cores
    max_pixels: int = 160_000_000  # decompression-bomb limit
    draft_size: int = 256  # JPEGs decode at reduced scale (libjpeg DCT scaling), short side never below this


@dataclass(frozen=True)
class FilterConfig:
    min_side: int = 512  # shortest side in pixels
    min_pixels: int = 0
    max_aspect: float = 3.0  # long side / short side
    min_sharpness: float = 10.0  # variance of Laplacian on the 256x256-area grey image
    min_brightness: float = 0.05  # mean luminance 0..1
    max_brightness: float = 0.96
    min_entropy: float = 2.0  # bits; flat or near-constant images fall below
    reject_flags: tuple[str, ...] = ("animated", "cmyk", "16bit", "alpha")


@dataclass(frozen=True)
class DedupeConfig:
    method: str = "auto"  # auto (verified local features) | phash | dhash | hash | clip | both (auto + CLIP)
    phash_threshold: int = 8  # max Hamming distance of 64-bit pHash (auto: direct accept)
    dhash_threshold: int = 12  # max Hamming distance of 64-bit dHash ("hash": both must hold)
    # keep-best: "original" = the most original copy (see curate/stages/keeper.py), or an order of
    # pixels, sharpness, filesize, png
    keep: tuple[str, ...] = ("original",)
    min_inliers: int = 10  # auto: RANSAC inliers a verified pair needs
    min_ncc: float = 0.5  # auto: tile-median normalised cross-correlation of the warped overlap


T = TypeVar("T")


def _coerce(cls: type[T], values: dict[str, Any], section: str) -> T:
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - set(names)
    if unknown:
        raise CurateError(
            f"unknown option(s) {', '.join(sorted(unknown))} in [{section}]; valid: {', '.join(names)}"
        )
    out = {}
    for k, v in values.items():
        default = names[k].default
        if isinstance(default, tuple) and isinstance(v, list):
            v = tuple(v)
        out[k] = v
    return cls(**out)  # type: ignore[call-arg]


@dataclass(frozen=True)
class Config:
    scan: ScanConfig = field(default_factory=ScanConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # sections owned by other stages

    @classmethod
    def load(cls, path: str | Path | None) -> Config:
        """Read a TOML file; a missing default file gives the defaults."""
        if path is None:
            return cls()
        p = Path(path)
        if not p.exists():
            return cls()
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise CurateError(f"cannot parse {p}: {exc}; fix the TOML syntax") from None
        known = {"scan": ScanConfig, "filter": FilterConfig, "dedupe": DedupeConfig}
        parts: dict[str, Any] = {}
        extra = {}
        for section, values in data.items():
            if section in known:
                if not isinstance(values, dict):
                    raise CurateError(f"[{section}] in {p} must be a table")
                parts[section] = _coerce(known[section], values, section)
            else:
                extra[section] = values
        return cls(**parts, extra=extra)

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.extra.get(name, {}))


def override(obj: T, **changes: Any) -> T:
    """Return ``obj`` with the non-None ``changes`` applied (CLI flags over file values)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(obj, **changes) if changes else obj  # type: ignore[type-var]
