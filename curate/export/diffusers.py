"""Hugging Face ``imagefolder`` layout: ``train/`` and ``validation/``, each with a metadata.jsonl.

``datasets.load_dataset("imagefolder", data_dir=out)`` gives a ``train`` and a ``validation`` split
with ``image`` and ``text`` columns, which is what the diffusers LoRA scripts read
(``--dataset_name out --caption_column text``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..manifest import Manifest
from ..stages.bucket import BucketSettings
from .common import (
    ExportResult,
    check_target,
    collect,
    link_mode,
    link_warning,
    resolve_settings,
    staging,
    write_images,
)

SPLIT_DIRS = {"train": "train", "val": "validation"}


def zero_repeat_notes(paths: list[str]) -> list[str]:
    """One line per ``0_<name>`` folder: sd-scripts would skip it, but this format has no repeat counts, so its
    images are exported like the others (the person may have meant them left out)."""
    from collections import Counter

    from .kohya import zero_repeat_folder

    folders = Counter(f for f in map(zero_repeat_folder, paths) if f is not None)
    return [
        f"{folder}/ has 0 repeats (sd-scripts would skip it), but the diffusers format has no repeat counts: its "
        f"{n} image(s) are exported like the others; `curate reject` them or move them out to leave them out"
        for folder, n in sorted(folders.items())
    ]


def export_diffusers(
    manifest: Manifest,
    out: Path,
    *,
    trigger: str | None = None,
    class_word: str | None = None,
    settings: BucketSettings | None = None,
    resize: bool = False,
    link: str | bool | None = None,
) -> ExportResult:
    """Write the imagefolder layout to ``out`` (which must not exist or be empty)."""
    out = Path(out)
    check_target(out, manifest.root)
    items, warnings = collect(manifest, trigger, class_word)
    warnings += zero_repeat_notes([it.rec.path for it in items])
    settings = resolve_settings(manifest, settings, warnings)
    res = ExportResult(out.resolve(), "diffusers", warnings=warnings)
    link = link_mode(link)
    warn = link_warning(link, manifest.root)
    if warn:
        res.warnings.append(warn)
    from ..stages.user_captions import jsonl_columns

    cache: dict = {}
    with staging(out) as tmp:
        for split, folder in SPLIT_DIRS.items():
            chosen = [it for it in items if it.split == split]
            if not chosen:
                continue
            (tmp / folder).mkdir()
            lines = []
            names = write_images(chosen, tmp / folder, res, resize=settings if resize else None, link=link)
            for it, name in zip(chosen, names, strict=True):
                extra = jsonl_columns(manifest.root, it.rec.path, cache)  # the user's other columns
                row = {"file_name": name, "text": it.caption, **extra}
                lines.append(json.dumps(row, ensure_ascii=False))
            (tmp / folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
            res.files.append(f"{folder}/metadata.jsonl")
            setattr(res, split, len(chosen))
    return res
