"""kohya-ss/sd-scripts layout: ``img/<repeats>_<trigger> <class>/`` with caption files, plus a dataset TOML.

The TOML uses only keys that sd-scripts' ``ConfigSanitizer`` accepts, at the level it accepts them:
caption options in ``[general]``, resolution and bucket options per ``[[datasets]]``, folder and
repeats per ``[[datasets.subsets]]``. sd-scripts can only carve a validation set out at random
(``validation_split``), which would leak near-duplicates, so our grouped validation split goes to
``val/`` with its own ``dataset_val.toml`` instead of ``validation_split``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomli_w

from ..errors import CurateError
from ..io import atomic_write_text
from ..manifest import Manifest
from ..stages.bucket import BucketSettings
from .common import ExportResult, check_target, collect, resolve_settings, staging, write_images

CAPTION_EXTENSION = ".txt"
TOML_HEADER = "# Written by `curate export --format kohya`. Train with: --dataset_config {name}\n"


def folder_name(repeats: int, trigger: str | None, class_word: str | None) -> str:
    words = " ".join(w for w in (trigger, class_word) if w)
    return f"{repeats}_{words or 'images'}"


def dataset_config(
    subsets: list[dict[str, Any]],
    settings: BucketSettings,
    *,
    keep_tokens: int,
    shuffle_caption: bool,
    flip_aug: bool,
) -> dict[str, Any]:
    """A dataset config sd-scripts' loader accepts (see tests/test_export.py for the schema check)."""
    return {
        "general": {
            "caption_extension": CAPTION_EXTENSION,
            "shuffle_caption": shuffle_caption,
            "keep_tokens": keep_tokens,
            "flip_aug": flip_aug,
        },
        "datasets": [
            {
                "resolution": settings.resolution,
                "enable_bucket": True,
                "min_bucket_reso": settings.min_size,
                "max_bucket_reso": settings.max_size,
                "bucket_reso_steps": settings.step,
                "bucket_no_upscale": settings.no_upscale,
                "subsets": subsets,
            }
        ],
    }


def export_kohya(
    manifest: Manifest,
    out: Path,
    *,
    repeats: int = 10,
    trigger: str | None = None,
    class_word: str | None = None,
    settings: BucketSettings | None = None,
    resize: bool = False,
    link: bool = True,
    flip_aug: bool = False,
    shuffle_caption: bool | None = None,
) -> ExportResult:
    """Write the kohya layout and dataset TOML(s) to ``out`` (which must not exist or be empty)."""
    if repeats < 1:
        raise CurateError(f"--repeats must be at least 1, got {repeats}")
    for w in (trigger, class_word):
        if w is not None and ("/" in w or "\\" in w or not w.strip()):
            raise CurateError(f"{w!r} cannot be part of a folder name; use letters, digits and spaces")
    out = Path(out)
    check_target(out, manifest.root)
    items, warnings = collect(manifest, trigger, class_word)
    settings = resolve_settings(manifest, settings, warnings)
    if shuffle_caption is None:  # tag lists shuffle well; sentences do not
        shuffle_caption = sum(1 for it in items if not (it.rec.caption or "").strip()) > len(items) / 2
    keep_tokens = 1 if trigger else 0
    res = ExportResult(out.resolve(), "kohya", warnings=warnings)
    class_tokens = " ".join(w for w in (trigger, class_word) if w) or None
    records = []
    with staging(out) as tmp:
        for split, top, n_rep in (("train", "img", repeats), ("val", "val", 1)):
            chosen = [it for it in items if it.split == split]
            if not chosen:
                continue
            rel = Path(top) / folder_name(n_rep, trigger, class_word)
            (tmp / rel).mkdir(parents=True)
            names = write_images(chosen, tmp / rel, res, resize=settings if resize else None, link=link)
            for it, name in zip(chosen, names, strict=True):
                if it.caption:
                    (tmp / rel / (Path(name).stem + CAPTION_EXTENSION)).write_text(it.caption + "\n", "utf-8")
                records.append({"file": str(rel / name), "source": it.rec.path, "sha256": it.rec.sha256,
                                "split": split, "caption": it.caption,
                                "bucket": list(it.rec.bucket) if it.rec.bucket else None})  # fmt: skip
            subset: dict[str, Any] = {"image_dir": str(res.out / rel), "num_repeats": n_rep}
            if class_tokens:
                subset["class_tokens"] = class_tokens
            cfg = dataset_config(
                [subset],
                settings,
                keep_tokens=keep_tokens,
                shuffle_caption=shuffle_caption if split == "train" else False,
                flip_aug=flip_aug if split == "train" else False,
            )
            name = "dataset.toml" if split == "train" else "dataset_val.toml"
            atomic_write_text(tmp / name, TOML_HEADER.format(name=name) + tomli_w.dumps(cfg))
            res.files.append(name)
            setattr(res, split, len(chosen))
        atomic_write_text(
            tmp / "curate_export.json", json.dumps({"format": "kohya", "images": records}, indent=1)
        )
    return res
