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
from collections.abc import Callable
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
    thorough: bool = False  # auto: verify with SIFT (slower) instead of ORB


T = TypeVar("T")

# Flags the scan can set; [filter] reject_flags must name some of these.
KNOWN_FLAGS = ("animated", "cmyk", "16bit", "alpha", "exif-rotated")
DEDUPE_METHODS = ("auto", "phash", "dhash", "hash", "clip", "both")


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, "a list of strings"
    )


def _toml_repr(v: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "float", str: "string", list: "list", dict: "table"}
    text = repr(v) if not isinstance(v, str) else f'"{v}"'
    return f"{text[:40]} ({kind.get(type(v), type(v).__name__)})"


def _check_type(value: Any, tp: Any, *, lenient_list: bool = False) -> Any:
    """``value`` converted to the field type ``tp``, or raise TypeError (message: the expected type)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp == "list":
        if isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
            return tuple(value)
        if lenient_list and isinstance(value, (str, dict)):
            return value  # trigger = "zz" / replace = {old = "new"}: the caption code accepts these forms
    else:  # pragma: no cover - a field type this loader does not know: accept as is
        return value
    raise TypeError(_type_name(tp))


def _field_types(cls: type) -> dict[str, Any]:
    """name -> int | float | bool | str | "list" for a dataclass (annotations are strings here)."""
    import typing

    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, Any)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (tuple, list):
            tp = "list"
        elif args and len(args) == 1:
            tp = args[0]
        out[f.name] = tp
    return out


def _did_you_mean(word: str, choices: Any, *, brackets: bool = False) -> str:
    import difflib

    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    if close:
        return f"did you mean {f'[{close[0]}]' if brackets else close[0]}?"
    listed = ", ".join(f"[{c}]" if brackets else c for c in sorted(choices))
    return f"valid: {listed}"


def _where(section: str, source: str | Path | None) -> str:
    return f"[{section}]" + (f" of {source}" if source else "")


def _unknown_keys(unknown: set[str], names: Any, section: str, source: str | Path | None) -> CurateError:
    first = sorted(unknown)[0]
    return CurateError(
        f"unknown option(s) {', '.join(sorted(unknown))} in {_where(section, source)}; "
        + _did_you_mean(first, names)
    )


def _coerce(cls: type[T], values: dict[str, Any], section: str, source: str | Path | None = None) -> T:
    """Build ``cls`` from a TOML table: unknown keys, wrong types and nonsense values are one-line errors."""
    types = _field_types(cls)
    unknown = set(values) - set(types)
    if unknown:
        raise _unknown_keys(unknown, types, section, source)
    out = {}
    for k, v in values.items():
        try:
            out[k] = _check_type(v, types[k])
        except TypeError as exc:
            raise CurateError(
                f"{k} in {_where(section, source)} must be {exc}, got {_toml_repr(v)}"
            ) from None
    obj = cls(**out)  # type: ignore[call-arg]
    check_values(section, obj, source)
    return obj


def _rules(section: str) -> list[tuple[str, Callable[[Any], bool], str]]:
    """(key, is_valid, what a valid value is) for the options of ``section``."""

    def between(lo: float, hi: float) -> Callable[[Any], bool]:
        return lambda v: lo <= v <= hi

    def at_least(lo: float) -> Callable[[Any], bool]:
        return lambda v: v >= lo

    def one_of(choices: tuple[str, ...]) -> Callable[[Any], bool]:
        return lambda v: v in choices

    def subset(choices: Any) -> Callable[[Any], bool]:
        return lambda v: all(x in choices for x in v)

    if section == "scan":
        return [("workers", at_least(0), "0 (all cores) or more"), ("max_pixels", at_least(1), "at least 1"),
                ("draft_size", at_least(1), "at least 1")]  # fmt: skip
    if section == "filter":
        return [("min_side", at_least(0), "0 or more pixels"), ("min_pixels", at_least(0), "0 or more"),
                ("max_aspect", at_least(1.0), "a ratio of at least 1.0"),
                ("min_sharpness", at_least(0.0), "0 or more"),
                ("min_brightness", between(0.0, 1.0), "between 0 and 1"),
                ("max_brightness", between(0.0, 1.0), "between 0 and 1"),
                ("min_entropy", between(0.0, 8.0), "between 0 and 8 bits"),
                ("reject_flags", subset(KNOWN_FLAGS), f"a list from {', '.join(KNOWN_FLAGS)}")]  # fmt: skip
    if section == "dedupe":
        from .stages.dedupe import KEY_FUNCS

        return [("method", one_of(DEDUPE_METHODS), f"one of {', '.join(DEDUPE_METHODS)}"),
                ("phash_threshold", between(0, 64), "between 0 and 64 (Hamming distance of a 64-bit hash)"),
                ("dhash_threshold", between(0, 64), "between 0 and 64 (Hamming distance of a 64-bit hash)"),
                ("keep", lambda v: list(v) == ["original"] or (bool(v) and subset(KEY_FUNCS)(v)),
                 f"[\"original\"] or a non-empty list from {', '.join(KEY_FUNCS)}"),
                ("min_inliers", at_least(4), "4 or more"),
                ("min_ncc", between(-1.0, 1.0), "between -1 and 1")]  # fmt: skip
    if section == "tag":
        return [("batch_size", at_least(0), "0 (auto) or more"), ("floor", between(0.0, 1.0), "between 0 and 1"),
                ("workers", at_least(0), "0 (auto) or more"),
                ("backend", one_of(("auto", "torch", "onnx")), "auto, torch or onnx"),
                ("decode", one_of(("auto", "gpu", "cpu", "threads", "processes")),
                 "auto, gpu, cpu, threads or processes"),
                ("dtype", one_of(("auto", "fp32", "fp16", "bf16")), "auto, fp32, fp16 or bf16")]  # fmt: skip
    if section == "blip":
        return [("batch_size", at_least(1), "at least 1"), ("num_beams", at_least(1), "at least 1"),
                ("min_length", at_least(0), "0 or more"), ("max_length", at_least(1), "at least 1"),
                ("repetition_penalty", lambda v: v > 0, "above 0"), ("max_side", at_least(1), "at least 1"),
                ("dtype", one_of(("auto", "fp32", "fp16", "bf16")), "auto, fp32, fp16 or bf16")]  # fmt: skip
    if section == "clip":
        return [("threshold", between(-1.0, 1.0), "a cosine similarity between -1 and 1"),
                ("batch_size", at_least(1), "at least 1"), ("workers", at_least(0), "0 or more"),
                ("exact_max", at_least(0), "0 or more"), ("k", at_least(1), "at least 1"),
                ("z", at_least(0.0), "0 or more"), ("min_gap", at_least(0.0), "0 or more"),
                ("index", one_of(("auto", "flat", "ivf")), "auto, flat or ivf")]  # fmt: skip
    return []


def check_values(section: str, obj: Any, source: str | Path | None = None) -> None:
    """Reject option values that make no sense (negative sizes, thresholds out of range, unknown names)."""
    get = obj.get if isinstance(obj, dict) else lambda k, d=None: getattr(obj, k, d)
    where = f" in {_where(section, source)}" if source else ""
    for key, ok, expected in _rules(section):
        v = get(key)
        if v is None:
            continue
        if not ok(v):
            shown = list(v) if isinstance(v, tuple) else v
            raise CurateError(f"{key}{where} must be {expected}, got {shown!r}")
    if section == "filter" and get("min_brightness", 0) > get("max_brightness", 1):
        raise CurateError(f"min_brightness{where} is above max_brightness; lower it")
    if section == "blip" and get("min_length", 0) > get("max_length", 1):
        raise CurateError(f"min_length{where} is above max_length; lower it")


def _clip_types() -> dict[str, Any]:
    return {"model": str, "pretrained": str, "threshold": float, "device": str, "batch_size": int,
            "workers": int, "gpu_decode": bool, "exact_max": int, "index": str, "k": int, "z": float,
            "min_gap": float}  # fmt: skip


def _section_types(name: str) -> dict[str, Any] | None:
    """Option name -> type for every section a stage reads (None: keys checked where the section is used)."""
    if name == "tag":
        from .stages.captions import CAPTION_KEYS, CaptionConfig
        from .stages.tag import TagConfig

        caption = _field_types(CaptionConfig)
        return {**{k: caption[k] for k in CAPTION_KEYS}, **_field_types(TagConfig)}
    if name == "caption":
        from .stages.captions import CaptionConfig

        return _field_types(CaptionConfig)
    if name == "blip":
        from .stages.caption import BlipConfig

        return _field_types(BlipConfig)
    if name == "clip":
        return _clip_types()
    return None


# Sections of curate.toml and who reads them. A stage that reads a new section adds its name here.
SECTIONS: dict[str, type | None] = {
    "scan": ScanConfig,
    "filter": FilterConfig,
    "dedupe": DedupeConfig,
    "clip": None,  # dedupe --method clip and `curate outliers`
    "tag": None,  # TagConfig + caption options
    "caption": None,  # CaptionConfig
    "blip": None,  # BlipConfig
    "plan": None,  # planner tables; curate.stages.plan.tables checks the keys
}


def _check_plan(values: dict[str, Any], source: Path) -> None:
    """[plan] overrides must have the type of the table they replace (unknown keys: plan.tables says)."""
    from .stages.plan import _TABLES

    kinds = {dict: "a table", list: "a list", str: "a string", bool: "true or false", int: "a number",
             float: "a number"}  # fmt: skip
    for k, v in values.items():
        if k not in _TABLES:
            continue
        want = type(_TABLES[k])
        ok = (
            isinstance(v, (int, float)) and not isinstance(v, bool)
            if want in (int, float)
            else isinstance(v, want)
        )
        if want is int and isinstance(v, float):
            ok = False
        if not ok:
            expected = "an integer" if want is int else kinds.get(want, want.__name__)
            raise CurateError(f"{k} in {_where('plan', source)} must be {expected}, got {_toml_repr(v)}")


def _check_section(name: str, values: dict[str, Any], source: Path) -> None:
    """Unknown keys, wrong types and nonsense values of a section read elsewhere, checked at load time."""
    if name == "plan":
        _check_plan(values, source)
        return
    types = _section_types(name)
    if types is None:
        return
    unknown = set(values) - set(types)
    if unknown:
        raise _unknown_keys(unknown, types, name, source)
    lenient = {"trigger", "blacklist", "replace"} if name in ("tag", "caption") else set()
    for k, v in values.items():
        try:
            _check_type(v, types[k], lenient_list=k in lenient)
        except TypeError as exc:
            raise CurateError(f"{k} in {_where(name, source)} must be {exc}, got {_toml_repr(v)}") from None
    check_values(name, values, source)
    if name in ("tag", "caption"):
        from .stages.captions import CAPTION_KEYS, make_config

        try:
            make_config({k: v for k, v in values.items() if k in CAPTION_KEYS or name == "caption"})
        except CurateError as exc:
            raise CurateError(f"{exc.message} (in {_where(name, source)})") from None


@dataclass(frozen=True)
class Config:
    scan: ScanConfig = field(default_factory=ScanConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # sections owned by other stages

    @classmethod
    def load(cls, path: str | Path | None) -> Config:
        """Read a TOML file; a missing default file gives the defaults. Unknown sections/keys are errors."""
        if path is None:
            return cls()
        p = Path(path)
        if not p.exists():
            return cls()
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8-sig"))  # a BOM, as Windows editors write
        except UnicodeDecodeError:
            raise CurateError(f"cannot parse {p}: it is not UTF-8 text; save it as UTF-8") from None
        except tomllib.TOMLDecodeError as exc:
            raise CurateError(f"cannot parse {p}: {exc}; fix the TOML syntax") from None
        except OSError as exc:
            raise CurateError(f"cannot read {p}: {exc.strerror or exc}") from None
        parts: dict[str, Any] = {}
        extra = {}
        for section, values in data.items():
            if section not in SECTIONS:
                if not isinstance(values, dict):
                    owner = [s for s, c in SECTIONS.items() if c is not None and section in _field_types(c)]
                    hint = f"put it under [{owner[0]}]" if owner else "put it under a [section]"
                    raise CurateError(f"{section} in {p} is not inside a section; {hint}")
                raise CurateError(
                    f"unknown section [{section}] in {p}; {_did_you_mean(section, SECTIONS, brackets=True)}"
                )
            if not isinstance(values, dict):
                raise CurateError(f"[{section}] in {p} must be a table")
            cls_ = SECTIONS[section]
            if cls_ is not None:
                parts[section] = _coerce(cls_, values, section, p)
            else:
                _check_section(section, values, p)
                extra[section] = values
        return cls(**parts, extra=extra)

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.extra.get(name, {}))


def override(obj: T, **changes: Any) -> T:
    """Return ``obj`` with the non-None ``changes`` applied (CLI flags over file values)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return obj
    out = dataclasses.replace(obj, **changes)  # type: ignore[type-var]
    section = {ScanConfig: "scan", FilterConfig: "filter", DedupeConfig: "dedupe"}.get(type(obj))
    if section:
        check_values(section, out)
    return out
