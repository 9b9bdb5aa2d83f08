"""kohya-ss/sd-scripts layout: one ``img/<repeats>_<class tokens>/`` folder per concept, captions beside
the images, regularization images in ``reg/``, plus a dataset TOML.

The TOML uses only keys that sd-scripts' ``ConfigSanitizer`` accepts, at the level it accepts them:
caption options in ``[general]``, resolution and bucket options per ``[[datasets]]``, folder, repeats,
class tokens and ``is_reg`` per ``[[datasets.subsets]]``. sd-scripts can only carve a validation set
out at random (``validation_split``), which would leak near-duplicates, so our grouped validation split
goes to ``val/`` with its own ``dataset_val.toml`` (its header says how to use it with sd-scripts).

Input in kohya layout keeps its concepts: an image under a folder named ``<N>_<class tokens>`` (the
first such folder in its path) is exported into its own ``img/<N>_<class tokens>/`` with ``N``
repeats and those class tokens; other images use ``--repeats`` / ``--trigger`` / ``--class``. A
``0_<class tokens>`` folder is skipped by sd-scripts, so its images are left out, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import tomli_w
from PIL import Image

from ..errors import CurateError
from ..io import IMAGE_EXTENSIONS, STATE_DIR, atomic_write_text, iter_image_files, open_rgb
from ..manifest import Manifest
from ..stages.bucket import BucketSettings
from .common import (
    EXPORT_RECORD,
    PASSTHROUGH,
    PNG_LEVEL,
    ExportItem,
    ExportResult,
    caption_bytes,
    check_target,
    collect,
    link_mode,
    link_warning,
    looks_like_tags,
    make_caption,
    place_file,
    resolve_settings,
    staging,
    write_images,
)
from .fingerprint import EXPORT_VERSION, digest

CAPTION_EXTENSION = ".txt"
REG_CAPTION_EXTENSIONS = (".txt", ".caption")  # read beside regularization images
CONCEPT_RE = re.compile(r"^(\d+)_(.+)$")
# top folders that kohya users keep regularization images in (beside img/ or the concept folders)
REG_FOLDER_NAMES = {"reg", "regs", "regularization", "reg_images", "regularisation"}
TOML_HEADER = (
    "# Written by `curate export --format kohya`. Train with sd-scripts: train_network.py (SD1.5) or\n"
    "# sdxl_train_network.py (SDXL) --dataset_config {path}; or `curate train {path}`.\n"
)
VAL_TOML_HEADER = (
    "# Written by `curate export --format kohya`: the validation split (near-duplicates never cross it),\n"
    "# in the schema of dataset.toml. `curate train {train}` (and `curate train DATASET`) uses this file\n"
    "# as its validation set automatically: validation loss per epoch, in the log and tensorboard.\n"
    "# sd-scripts takes validation images only from its one --dataset_config, carved out by\n"
    "# `validation_split` (there is no option for a second config). To use this split there, append the\n"
    "# [[datasets]] table below (with its subsets) to dataset.toml and add `validation_split = 1.0` to it:\n"
    "# sd-scripts then validates on all of its images and trains on none of them. Leave --validation_split\n"
    "# unset: a random split of the training images would leak near-duplicates into validation.\n"
)


@dataclass(frozen=True)
class Concept:
    """A kohya concept folder ``<repeats>_<class tokens>``."""

    repeats: int
    tokens: str

    @property
    def folder(self) -> str:
        return f"{self.repeats}_{self.tokens}"


def _concept_folder(path: str) -> tuple[str, Concept] | None:
    """(folder path, concept) of the first folder of ``path`` named ``<N>_<class tokens>``, any N."""
    parts = PurePosixPath(path).parts[:-1]
    for k, part in enumerate(parts):
        m = CONCEPT_RE.match(part)
        if m and m[2].strip():
            return "/".join(parts[: k + 1]), Concept(int(m[1]), " ".join(m[2].split()))
    return None


def concept_of(path: str) -> Concept | None:
    """The concept of a dataset-relative path: its first folder named ``<N>_<class tokens>``, when N >= 1."""
    found = _concept_folder(path)
    return found[1] if found and found[1].repeats >= 1 else None


def zero_repeat_folder(path: str) -> str | None:
    """The folder of ``path`` named ``0_<class tokens>`` when that is its concept folder, else None.

    sd-scripts skips such a folder: ``generate_dreambooth_subsets_config_by_subdirs`` drops a subdirectory
    whose repeat count is below 1, and ``DreamBoothDataset`` ignores a subset with ``num_repeats < 1``; so its
    images are never trained on. Export and plan leave them out the same way and say so.
    """
    found = _concept_folder(path)
    return found[0] if found and found[1].repeats < 1 else None


def zero_repeat_warnings(paths: list[str]) -> list[str]:
    """One line per ``0_<name>`` folder among ``paths``: its images are left out, as sd-scripts does."""
    by_folder: dict[str, int] = {}
    for p in paths:
        folder = zero_repeat_folder(p)
        if folder is not None:
            by_folder[folder] = by_folder.get(folder, 0) + 1
    return [
        f"{folder}/ has 0 repeats, so sd-scripts skips it: its {n} image(s) are left out; "
        f"rename it {PurePosixPath(folder).name.replace('0_', '10_', 1)} (N_name, N >= 1) to train on them"
        for folder, n in sorted(by_folder.items())
    ]


def reg_inside_warnings(paths: list[str]) -> list[str]:
    """One line when some of ``paths`` lie under a ``reg/`` folder of the dataset: they train as training images."""
    inside = [
        p
        for p in paths
        if len(PurePosixPath(p).parts) > 1 and PurePosixPath(p).parts[0].lower() in REG_FOLDER_NAMES
    ]
    if not inside:
        return []
    top = PurePosixPath(inside[0]).parts[0]
    return [
        f"{len(inside)} image(s) under {top}/ in the dataset are exported as training images, not "
        f"regularization (e.g. {inside[0]}); move {top}/ out of the dataset and pass --reg FOLDER"
    ]


def folder_name(repeats: int, trigger: str | None, class_word: str | None) -> str:
    words = " ".join(w for w in (trigger, class_word) if w)
    return f"{repeats}_{words or 'images'}"


@dataclass
class RegImage:
    """One regularization image: its file, bytes' hash, concept folder and caption (if one lies beside it)."""

    source: Path
    rel: str  # relative to the reg folder
    sha256: str
    concept: Concept
    caption: str | None
    reencode: bool
    ext: str

    @property
    def name(self) -> str:
        return self.sha256[:16] + (".png" if self.reencode else (".jpg" if self.ext == ".jpeg" else self.ext))


@dataclass
class Subset:
    """One output folder and its ``[[datasets.subsets]]`` entry."""

    top: str  # img | val | reg
    folder: str
    repeats: int
    class_tokens: str | None
    items: list[ExportItem] = field(default_factory=list)
    reg: list[RegImage] = field(default_factory=list)
    # leading comma-separated tokens every caption here starts with (trigger / class tokens): pinned when shuffling
    keep_tokens: int = 0

    @property
    def rel(self) -> str:
        return f"{self.top}/{self.folder}"

    @property
    def is_reg(self) -> bool:
        return self.top == "reg"


@dataclass
class Layout:
    """Everything an export will write, computed without writing: the basis of its fingerprint."""

    subsets: list[Subset]
    settings: BucketSettings
    options: dict[str, Any]
    warnings: list[str]
    # the dataset TOML's keep_tokens: 1 with the export's --trigger, else the trigger words curate tag put first
    keep_tokens: int = 0

    def fingerprint(self) -> str:
        """SHA-256 over what reaches the trainer: files, captions, splits, folders, options, format version."""
        subs = []
        for s in self.subsets:
            subs.append({
                "dir": s.rel, "repeats": s.repeats, "class_tokens": s.class_tokens, "keep_tokens": s.keep_tokens,
                "images": sorted([it.rec.path, it.rec.sha256, it.caption, sorted(it.rec.flags),
                                  list(it.rec.bucket) if it.rec.bucket else None] for it in s.items),
                "reg": sorted([r.rel, r.sha256, r.caption] for r in s.reg),
            })  # fmt: skip
        return digest({
            "version": EXPORT_VERSION, "format": "kohya", "options": self.options, "subsets": subs,
            "keep_tokens": self.keep_tokens,
        })  # fmt: skip


# sha256 of reg files by (path, size, mtime_ns): a fingerprint and the export that follows read them once
_REG_SHA: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _REG_SHA:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _REG_SHA[key] = h.hexdigest()
    return _REG_SHA[key]


def _reg_caption_file(path: Path) -> Path | None:
    """The caption file beside a regularization image that holds text, if any."""
    for ext in REG_CAPTION_EXTENSIONS:
        cap = path.with_suffix(ext)
        if cap.is_file() and " ".join(cap.read_text("utf-8", errors="replace").split()):
            return cap
    return None


def _reg_caption(path: Path) -> str | None:
    cap = _reg_caption_file(path)
    return " ".join(cap.read_text("utf-8", errors="replace").split()) if cap else None


def load_reg(reg: Path, class_word: str | None, dataset_root: Path) -> tuple[list[RegImage], list[str]]:
    """Regularization images under ``reg``: ``<N>_<class>/`` folders (kohya layout), else repeats 1 and
    ``class_word``; unreadable image files are skipped with a warning."""
    reg = Path(reg).expanduser()
    if not reg.exists():
        raise CurateError(f"--reg {reg} does not exist; pass a folder of regularization images")
    if not reg.is_dir():
        raise CurateError(f"--reg {reg} is a file; pass the folder that holds the regularization images")
    real, root = reg.resolve(), dataset_root.resolve()
    if real == root or root in real.parents:
        raise CurateError(
            f"--reg {reg} is inside the dataset {root}: the scan would train on those images; move it out"
        )
    try:
        os.listdir(reg)
        files = list(iter_image_files(reg, exclude=(STATE_DIR,)))
    except OSError as exc:
        raise CurateError(f"cannot read --reg {reg}: {exc.strerror or exc}; check its permissions") from None
    if not files:
        raise CurateError(
            f"--reg {reg} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); check the folder"
        )
    default = Concept(1, class_word) if class_word else Concept(1, "")
    out, bad, seen, zero = [], [], set(), []
    for path in files:
        rel = path.relative_to(reg).as_posix()
        if zero_repeat_folder(rel) is not None:
            zero.append(rel)
            continue
        try:
            with Image.open(path) as im:
                orientation = im.getexif().get(0x0112, 1)
                mode, frames = im.mode, getattr(im, "n_frames", 1)
            sha = _sha256(path)
        except Exception:
            bad.append(rel)
            continue
        concept = concept_of(rel) or default
        if (concept, sha) in seen:
            continue  # the same bytes twice in one folder: once is enough
        seen.add((concept, sha))
        ext = path.suffix.lower()
        reencode = ext not in PASSTHROUGH or orientation not in (1, None) or mode not in ("RGB", "L")
        reencode |= frames > 1
        out.append(RegImage(path, rel, sha, concept, _reg_caption(path), reencode, ext))
    warnings = [f"--reg {w}" for w in zero_repeat_warnings(zero)]
    if bad:
        warnings.append(
            f"{len(bad)} file(s) in --reg are not readable images and were skipped (e.g. {bad[0]})"
        )
    if not out and zero and not bad:
        raise CurateError(
            f"--reg {reg}: every image is in a 0_<class> folder, which sd-scripts skips; rename it"
        )
    if not out:
        raise CurateError(f"--reg {reg}: none of its {len(files)} image files can be read; check the folder")
    if any(not r.caption and not r.concept.tokens for r in out):
        warnings.append(
            "some regularization images have no caption, concept folder or --class: they train on an empty "
            "caption; pass --class (e.g. --class woman) or use <N>_<class> folders"
        )
    return out, warnings


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


def _check_words(*words: str | None) -> None:
    for w in words:
        if w is not None and ("/" in w or "\\" in w or not w.strip()):
            raise CurateError(f"{w!r} cannot be part of a folder name; use letters, digits and spaces")


def kohya_layout(
    manifest: Manifest,
    *,
    repeats: int = 10,
    trigger: str | None = None,
    class_word: str | None = None,
    settings: BucketSettings | None = None,
    resize: bool = False,
    link: str | bool | None = None,
    flip_aug: bool = False,
    shuffle_caption: bool | None = None,
    reg: str | Path | None = None,
) -> Layout:
    """What :func:`export_kohya` would write, as subsets; nothing is written."""
    if repeats < 1:
        raise CurateError(f"--repeats must be at least 1, got {repeats}")
    _check_words(trigger, class_word)
    mode = link_mode(link)
    reg_images, reg_warnings = load_reg(Path(reg), class_word, manifest.root) if reg else ([], [])
    items, warnings = collect(manifest, trigger, class_word)
    warnings += zero_repeat_warnings([it.rec.path for it in items])
    items = [it for it in items if zero_repeat_folder(it.rec.path) is None]
    if not items:
        raise CurateError(
            "every kept image is in a 0_<name> folder, which sd-scripts skips (0 repeats); rename the folder "
            "N_<name> with N >= 1 (e.g. 10_<name>)"
        )
    warnings += reg_warnings
    settings = resolve_settings(manifest, settings, warnings)
    if shuffle_caption is None:  # tag lists shuffle well; sentences do not
        captioned = [it.caption for it in items if it.caption]
        shuffle_caption = sum(map(looks_like_tags, captioned)) > len(captioned) / 2 if captioned else True
    subsets: dict[str, Subset] = {}
    concept_folders: dict[str, bool] = {}  # subset -> its class tokens come from a <N>_<tokens> folder
    plain_tokens = " ".join(w for w in (trigger, class_word) if w) or None
    for it in items:
        concept = concept_of(it.rec.path)
        top = "img" if it.split == "train" else "val"
        if concept is not None:
            it.caption = make_caption(it.rec, trigger, concept.tokens)
            n = concept.repeats if top == "img" else 1
            key, tokens = f"{top}/{n}_{concept.tokens}", concept.tokens
        else:
            n = repeats if top == "img" else 1
            key, tokens = f"{top}/{folder_name(n, trigger, class_word)}", plain_tokens
        sub = subsets.setdefault(key, Subset(top, key.split("/", 1)[1], n, tokens))
        sub.items.append(it)
        concept_folders[key] = concept is not None
    warnings += reg_inside_warnings([it.rec.path for it in items])
    for r in reg_images:
        key = f"reg/{r.concept.folder if r.concept.tokens else '1_reg'}"
        sub = subsets.setdefault(
            key, Subset("reg", key.split("/", 1)[1], r.concept.repeats, r.concept.tokens or None)
        )
        sub.reg.append(r)
    order = {"img": 0, "reg": 1, "val": 2}
    ordered = sorted(subsets.values(), key=lambda s: (order[s.top], s.folder))
    options = {
        "repeats": repeats, "trigger": trigger, "class_word": class_word, "settings": asdict(settings),
        "resize": resize, "link": mode, "flip_aug": flip_aug, "shuffle_caption": shuffle_caption,
        "reg": str(Path(reg).expanduser().resolve()) if reg else None,
    }  # fmt: skip
    layout = Layout(ordered, settings, options, warnings)
    layout.keep_tokens = 1 if trigger else _stored_trigger_tokens(manifest, layout)
    words = [trigger] if trigger else _stored_trigger_words(manifest)
    for sub in ordered:
        if sub.items:
            warn = _pin_subset(sub, words, from_folder=concept_folders.get(sub.rel, False),
                               shuffled=shuffle_caption and sub.top == "img")  # fmt: skip
            if warn:
                warnings.append(warn)
    return layout


def _subset_entry(out: Path, sub: Subset, keep_tokens: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"image_dir": str(out / sub.top / sub.folder), "num_repeats": sub.repeats}
    if sub.class_tokens:
        entry["class_tokens"] = sub.class_tokens
    if not sub.is_reg and sub.keep_tokens != keep_tokens:  # sd-scripts reads keep_tokens per subset too
        entry["keep_tokens"] = sub.keep_tokens
    if sub.is_reg:
        entry["is_reg"] = True
    return entry


def _write_reg(r: RegImage, dest_dir: Path, mode: str) -> str:
    if r.reencode:
        open_rgb(r.source).save(dest_dir / r.name, "PNG", compress_level=PNG_LEVEL)
        return "reencoded"
    return place_file(r.source, dest_dir / r.name, mode)


def _stored_trigger_words(manifest: Manifest) -> list[str]:
    """The trigger words `curate tag --trigger` put first in every caption it built (none if it was not run)."""
    return [str(w).strip() for w in json.loads(manifest.get_meta("caption.trigger") or "[]")]


def _leading(caption: str | None, n: int) -> list[str]:
    """The first ``n`` comma-separated tokens, lower-cased (a folder ``10_MyChar`` pins ``mychar, ...``)."""
    return [p.strip().lower() for p in (caption or "").split(",")][:n]


def _pin_subset(sub: Subset, trigger: list[str], *, from_folder: bool, shuffled: bool) -> str | None:
    """Set ``sub.keep_tokens`` to the longest pin every caption of the subset starts with: the trigger words
    then the class tokens, the trigger words, or the class tokens (as kohya counts: comma-separated tokens).

    None, or (when captions shuffle and some caption lacks the pin a person would expect: a concept folder's
    class tokens or the trigger) one warning line naming the subset and how many captions lack it."""
    caps = [it.caption for it in sub.items]
    cls = [sub.class_tokens] if sub.class_tokens else []
    candidates = []
    for pin in (trigger + [w for w in cls if w not in trigger], trigger, cls):
        if pin and pin not in candidates:
            candidates.append(pin)
    best, best_n = None, -1
    for pin in candidates:
        want = [w.lower() for w in pin]
        n = sum(_leading(c, len(pin)) == want for c in caps)
        if n == len(caps):
            sub.keep_tokens = len(pin)
            return None
        if n > best_n:
            best, best_n = pin, n
    sub.keep_tokens = 0
    if not shuffled or best is None or not (trigger or from_folder):
        return None
    return (
        f"{sub.rel}: {len(caps) - best_n} of {len(caps)} caption(s) do not start with {', '.join(best)!r}, so "
        "keep_tokens = 0 there and shuffle_caption moves it; put it first in those captions to pin it"
    )


def _stored_trigger_tokens(manifest: Manifest, layout: Layout) -> int:
    """keep_tokens for the trigger words `curate tag --trigger` put first, when every caption still starts
    with them (so a shuffled caption keeps them first, as ``--trigger`` on export does); else 0."""
    words = _stored_trigger_words(manifest)
    caps = [it.caption for s in layout.subsets if not s.is_reg for it in s.items]
    if not words or not caps:
        return 0
    n = len(words)
    firsts = ([p.strip() for p in (c or "").split(",")][:n] for c in caps)
    return n if all(f == words for f in firsts) else 0


def export_kohya(
    manifest: Manifest,
    out: Path,
    *,
    replace: bool = False,
    layout: Layout | None = None,
    **options: Any,
) -> ExportResult:
    """Write the kohya layout and dataset TOML(s) to ``out`` (which must not exist or be empty).

    ``options`` are those of :func:`kohya_layout` (repeats, trigger, class_word, settings, resize, link,
    flip_aug, shuffle_caption, reg). ``replace``: ``out`` may be an earlier curate export, swapped
    for the new one atomically. ``layout``: one :func:`kohya_layout` already computed with these options
    (``curate train`` computes it for the fingerprint), so the files are not listed and checked twice.
    """
    out = Path(out)
    check_target(out, manifest.root, replace=replace)
    layout = layout or kohya_layout(manifest, **options)
    opts, settings = layout.options, layout.settings
    res = ExportResult(out.resolve(), "kohya", warnings=layout.warnings)
    warn = link_warning(opts["link"], manifest.root)
    if warn:
        res.warnings.append(warn)
    keep_tokens = layout.keep_tokens
    records: list[dict[str, Any]] = []
    reg_records: list[dict[str, Any]] = []
    with staging(out, replace=replace) as tmp:
        for sub in layout.subsets:
            (tmp / sub.rel).mkdir(parents=True)
            if sub.is_reg:
                for r in sub.reg:
                    how = _write_reg(r, tmp / sub.rel, opts["link"])
                    setattr(res, how, getattr(res, how) + 1)
                    if r.caption:
                        (tmp / sub.rel / (Path(r.name).stem + CAPTION_EXTENSION)).write_bytes(
                            caption_bytes(r.caption, _reg_caption_file(r.source))
                        )
                    reg_records.append({"file": f"{sub.rel}/{r.name}", "source": str(r.source), "sha256": r.sha256,
                                        "caption": r.caption})  # fmt: skip
                res.reg += len(sub.reg)
                continue
            names = write_images(sub.items, tmp / sub.rel, res, resize=settings if opts["resize"] else None,
                                 link=opts["link"])  # fmt: skip
            for it, name in zip(sub.items, names, strict=True):
                if it.caption:
                    (tmp / sub.rel / (Path(name).stem + CAPTION_EXTENSION)).write_bytes(
                        caption_bytes(it.caption, it.caption_file)
                    )
                records.append({"file": f"{sub.rel}/{name}", "source": it.rec.path, "sha256": it.rec.sha256,
                                "split": it.split, "caption": it.caption, "subset": sub.rel,
                                "bucket": list(it.rec.bucket) if it.rec.bucket else None})  # fmt: skip
            split = "val" if sub.top == "val" else "train"
            setattr(res, split, getattr(res, split) + len(sub.items))
        for split, name in (("train", "dataset.toml"), ("val", "dataset_val.toml")):
            chosen = [s for s in layout.subsets if (s.top == "val") == (split == "val")]
            if not any(s.items for s in chosen):
                continue  # reg images alone are no training set
            cfg = dataset_config(
                [_subset_entry(res.out, s, keep_tokens) for s in chosen],
                settings,
                keep_tokens=keep_tokens,
                shuffle_caption=opts["shuffle_caption"] if split == "train" else False,
                flip_aug=opts["flip_aug"] if split == "train" else False,
            )
            header = TOML_HEADER if split == "train" else VAL_TOML_HEADER
            text = header.format(path=res.out / name, train=res.out / "dataset.toml") + tomli_w.dumps(cfg)
            atomic_write_text(tmp / name, text)
            res.files.append(name)
        record = {
            "format": "kohya",
            "version": EXPORT_VERSION,
            "fingerprint": layout.fingerprint(),
            "dataset": str(manifest.root),
            "options": opts,
            "subsets": [{"dir": s.rel, "num_repeats": s.repeats, "class_tokens": s.class_tokens,
                         "keep_tokens": s.keep_tokens, "is_reg": s.is_reg, "images": len(s.items) + len(s.reg)} for s in layout.subsets],
            "images": records,
            "reg": reg_records,
        }  # fmt: skip
        atomic_write_text(tmp / EXPORT_RECORD, json.dumps(record, indent=1, ensure_ascii=False))
    return res
