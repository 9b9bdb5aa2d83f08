"""Training data: kohya folders / dataset TOML -> bucketed items -> cached latents and text embeddings on the device.

Latents are cached on disk as safetensors keyed by content hash + VAE id + bucket size, so re-running a training
(or resuming one) never re-encodes an image. Everything the step needs then lives on the device.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from trainer_bridge.config import TrainConfig, TrainError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


# ---------------------------------------------------------------- buckets


def bucket_fns():
    """(make_buckets, assign_bucket): the same kohya rules `curate bucket` reports."""
    from curate.stages.bucket import assign_bucket, make_buckets

    return make_buckets, assign_bucket


# ---------------------------------------------------------------- dataset discovery


@dataclass
class Subset:
    image_dir: Path
    num_repeats: int = 1
    caption_extension: str = ".txt"
    keep_tokens: int = 0
    shuffle_caption: bool = False
    flip_aug: bool = False
    is_reg: bool = (
        False  # regularization images (prior preservation), balanced and weighted as sd-scripts does
    )
    class_tokens: str | None = None  # the caption of an image without a caption file


@dataclass
class Item:
    path: Path
    caption: str
    subset: Subset
    size: tuple[int, int] = (0, 0)  # original (w, h)
    bucket: tuple[int, int] = (0, 0)  # (w, h)
    # bucket_no_upscale: the size before the crop (None: the image is scaled to cover the bucket)
    resized: tuple[int, int] | None = None


@dataclass
class DatasetSpec:
    subsets: list[Subset]
    val_subsets: list[Subset] = field(default_factory=list)
    resolution: int = 512
    batch_size: int = 1
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    notes: list[str] = field(default_factory=list)  # what was chosen and why, printed by the trainer


def _folder_subsets(root: Path, cfg: TrainConfig, notes: list[str] | None = None) -> list[Subset]:
    """<repeats>_<class tokens>/ folders (sd-scripts' folder layout), else the folder itself with num_repeats.
    A 0_<name>/ folder is skipped, as sd-scripts skips a repeat count below 1 (a warning in ``notes``)."""
    subs = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        m = re.fullmatch(r"(\d+)_(.+)", d.name)
        if m and int(m[1]) < 1:
            if notes is not None:
                notes.append(
                    f"warning: {d.name}/ has 0 repeats, so sd-scripts skips it and so does this run: its images "
                    f"are not trained on; rename it {d.name.replace('0_', '10_', 1)} (N_name, N >= 1) to use them"
                )
            continue
        if m:
            subs.append(Subset(d, int(m[1]), ".txt", cfg.keep_tokens, cfg.shuffle_caption, cfg.flip_aug,
                               class_tokens=m[2]))  # fmt: skip
    if not subs and any(p.suffix.lower() in IMAGE_EXTS for p in root.iterdir()):
        subs.append(Subset(root, cfg.num_repeats, ".txt", cfg.keep_tokens, cfg.shuffle_caption, cfg.flip_aug))
    return subs


def _pin_class_tokens(s: Subset) -> str:
    """A <N>_<class tokens>/ folder trained as is, with shuffle_caption and keep_tokens = 0: when every caption
    there starts with the class tokens (kohya's own captions for the folder), pin them (keep_tokens = 1), as
    `curate export` does per subset; else leave it and say how many captions lack them. A note, or ""."""
    if not (s.shuffle_caption and s.keep_tokens == 0 and s.class_tokens):
        return ""
    caps = [c for p in sorted(s.image_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTS
            if (c := read_caption(p, s.caption_extension)) is not None]  # fmt: skip
    want = s.class_tokens.strip().lower()
    lacking = sum(c.split(",")[0].strip().lower() != want for c in caps)
    if caps and not lacking:
        s.keep_tokens = 1
        return f"{s.image_dir.name}: every caption starts with {s.class_tokens!r}: keep_tokens = 1 there"
    if caps:
        return (
            f"warning: {s.image_dir.name}: {lacking} of {len(caps)} caption(s) do not start with "
            f"{s.class_tokens!r}, so keep_tokens = 0 there and shuffle_caption moves it"
        )
    return ""


def _read_toml(path: Path) -> dict:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TrainError(f"{path} is not valid TOML: {e}") from None
    if not doc.get("datasets"):
        raise TrainError(f"{path} has no [[datasets]] table")
    return doc


def _toml_subsets(path: Path, doc: dict, cfg: TrainConfig) -> list[tuple[Subset, bool]]:
    """(subset, is_val) for every [[datasets.subsets]] of a kohya dataset-config TOML."""
    general = doc.get("general", {})
    out = []
    for d in doc["datasets"]:
        for s in d.get("subsets", []):
            o = {**general, **{k: v for k, v in d.items() if k != "subsets"}, **s}
            if "image_dir" not in o:
                raise TrainError(f"{path}: a [[datasets.subsets]] entry has no image_dir")
            img_dir = Path(o["image_dir"]).expanduser()
            if not img_dir.is_absolute() and not img_dir.is_dir():
                img_dir = path.parent / img_dir  # kohya resolves from the CWD; fall back to the TOML's folder
            try:
                sub = Subset(img_dir, int(o.get("num_repeats", 1)), str(o.get("caption_extension", ".txt")),
                             int(o.get("keep_tokens", cfg.keep_tokens)),
                             bool(o.get("shuffle_caption", cfg.shuffle_caption)), bool(o.get("flip_aug", cfg.flip_aug)),
                             bool(o.get("is_reg", False)), o.get("class_tokens"))  # fmt: skip
            except (TypeError, ValueError):
                raise TrainError(f"{path}: a subset of {img_dir} has a value of the wrong type") from None
            if sub.num_repeats < 1:
                continue  # sd-scripts ignores such a subset too
            out.append((sub, bool(o.get("is_val", False))))
    return out


def _val_subsets(path: Path, cfg: TrainConfig) -> list[Subset]:
    """Validation subsets from a folder or a dataset TOML (one pass per image, no reg subsets)."""
    if path.is_file():
        subs = [s for s, _ in _toml_subsets(path, _read_toml(path), cfg) if not s.is_reg]
    elif path.is_dir():
        subs = _folder_subsets(path, cfg)
    else:
        raise TrainError(f"validation data not found: {path} (val_data is a folder or a dataset TOML)")
    for s in subs:
        s.num_repeats, s.flip_aug, s.shuffle_caption = 1, False, False
    return subs


def bucket_settings(cfg: TrainConfig, family: str, opt: dict, spec: DatasetSpec) -> None:
    """Resolution and bucket options: TrainConfig (--set, training TOML) > the dataset TOML > the family default.

    The dataset TOML's bucket sizes only count when its resolution is the one trained at; checked as sd-scripts does."""
    from trainer_bridge.config import FAMILY_RESOLUTION

    toml_res = opt.get("resolution")
    if isinstance(toml_res, list):
        toml_res = max(toml_res)
    if cfg.resolution:
        res, why = cfg.resolution, "set in the training config"
    elif toml_res:
        res, why = int(toml_res), "from the dataset TOML"
    else:
        res, why = FAMILY_RESOLUTION[family or "sd15"], f"the {family or 'sd15'} default"
    same = toml_res is None or int(toml_res) == res
    steps = cfg.bucket_reso_steps or int(opt.get("bucket_reso_steps", 64))
    if steps % 8:
        raise TrainError(f"bucket_reso_steps {steps} must be a multiple of 8 (the VAE downscale); use 64")
    lo = cfg.min_bucket_reso or (int(opt["min_bucket_reso"]) if same and "min_bucket_reso" in opt else 0)
    hi = cfg.max_bucket_reso or (int(opt["max_bucket_reso"]) if same and "max_bucket_reso" in opt else 0)
    lo = lo or max(steps, min(256, res))
    hi = hi or 2 * res
    lo, hi = lo - lo % steps, hi + (-hi % steps)  # sd-scripts rounds them to the step the same way
    spec.resolution, spec.min_bucket_reso, spec.max_bucket_reso, spec.bucket_reso_steps = res, lo, hi, steps
    # as sd-scripts: bucket_no_upscale needs bucketing (it is dropped without enable_bucket)
    spec.bucket_no_upscale = spec.enable_bucket and (
        cfg.bucket_no_upscale or opt.get("bucket_no_upscale") is True
    )
    if spec.enable_bucket and lo > res:
        raise TrainError(
            f"min_bucket_reso {lo} is above the resolution {res} (sd-scripts refuses this too); "
            f"set min_bucket_reso <= {res} or a larger resolution"
        )
    if spec.enable_bucket and hi < res:
        raise TrainError(
            f"max_bucket_reso {hi} is below the resolution {res} (sd-scripts refuses this too); "
            f"set max_bucket_reso >= {res} or a smaller resolution"
        )
    note = f"resolution {res} ({why})"
    if spec.bucket_no_upscale:
        note += f", bucket_no_upscale (buckets follow image sizes, step {steps}; no image is enlarged)"
    elif spec.enable_bucket:
        note += f", buckets {lo}-{hi} step {steps}"
    if not same:
        note += f"; the dataset TOML's resolution {toml_res} and its bucket sizes are not used"
    spec.notes.append(note)


def read_dataset(cfg: TrainConfig, family: str = "") -> DatasetSpec:
    """Read a kohya-layout folder or a kohya dataset-config TOML (+ its validation set) into a DatasetSpec."""
    if not cfg.data:
        raise TrainError("no training data given: set `data` to a kohya folder or a dataset TOML")
    data = Path(cfg.data).expanduser()
    if not data.exists():
        raise TrainError(f"training data not found: {data}")
    spec = DatasetSpec([], [], 0, cfg.batch_size, cfg.enable_bucket)
    opt: dict = {}
    if data.is_file():
        doc = _read_toml(data)
        opt = {**doc.get("general", {}), **doc["datasets"][0]}  # bucket settings come from the first dataset
        for k in ("batch_size", "enable_bucket"):
            if k in opt:
                setattr(spec, k, opt[k])
        for sub, is_val in _toml_subsets(data, doc, cfg):
            (spec.val_subsets if is_val else spec.subsets).append(sub)
    else:
        spec.subsets = _folder_subsets(data, cfg, spec.notes)
        spec.notes += [n for s in spec.subsets if (n := _pin_class_tokens(s))]
    bucket_settings(cfg, family or cfg.model_family, opt, spec)
    if not spec.subsets and any("0 repeats" in n for n in spec.notes):
        raise TrainError(
            f"nothing to train in {data}: its folders have 0 repeats (0_<name>/), which sd-scripts skips; "
            "rename them N_<name> with N >= 1 (e.g. 10_<name>)"
        )
    if not spec.subsets:
        raise TrainError(
            f"no images found in {data} (expected <repeats>_<name>/ folders with images + .txt captions)"
        )
    if not any(not s.is_reg for s in spec.subsets):
        raise TrainError(f"{data} has only regularization (is_reg) subsets; add a training subset")
    if cfg.val_data:
        spec.val_subsets = _val_subsets(Path(cfg.val_data).expanduser(), cfg)
        if not spec.val_subsets:
            raise TrainError(f"no images found in the validation data {cfg.val_data}")
        spec.notes.append(f"validation set: {cfg.val_data}")
    elif data.is_file() and not spec.val_subsets and not data.stem.endswith("_val"):
        sibling = data.with_name(
            f"{data.stem}_val{data.suffix}"
        )  # dataset.toml -> dataset_val.toml (curate export)
        if sibling.is_file():
            spec.val_subsets = _val_subsets(sibling, cfg)
            spec.notes.append(f"validation set: {sibling}")
    elif data.is_dir() and not spec.val_subsets:
        for cand in (data / "val", data / "validation", data.parent / "val", data.parent / "validation"):
            if cand.is_dir() and cand != data:
                spec.val_subsets = _val_subsets(cand, cfg)
                break
    for s in spec.subsets + spec.val_subsets:
        if not s.image_dir.is_dir():
            raise TrainError(f"image_dir not found: {s.image_dir}")
    return spec


def read_caption(path: Path, ext: str) -> str | None:
    """The caption file's first line, stripped (as sd-scripts reads it); None when there is no caption file.

    A UTF-8 BOM (Windows editors) is dropped, as `curate export` drops it: sd-scripts would read it into the
    first tag, which then matches no class token or trigger."""
    cap = path.with_suffix(ext)
    if not cap.is_file():
        return None
    try:
        lines = cap.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise TrainError(f"caption file {cap} is not UTF-8 text; re-save it as UTF-8") from None
    return lines[0].strip() if lines else ""


def list_items(subsets: list[Subset], spec: DatasetSpec) -> list[Item]:
    """All images of the subsets with their captions, original sizes and buckets.

    An image without a caption file gets its subset's class_tokens (sd-scripts' DreamBooth rule), else ""."""
    from PIL import Image

    from curate.stages.bucket import bucket_no_upscale

    make_buckets, assign_bucket = bucket_fns()
    if spec.enable_bucket:
        buckets = make_buckets(
            spec.resolution, spec.min_bucket_reso, spec.max_bucket_reso, spec.bucket_reso_steps
        )
    else:
        buckets = [(spec.resolution, spec.resolution)]
    items = []
    for s in subsets:
        for p in sorted(s.image_dir.iterdir()):
            if p.suffix.lower() not in IMAGE_EXTS:
                continue
            caption = read_caption(p, s.caption_extension)
            if caption is None:
                caption = s.class_tokens or ""
            try:
                with Image.open(p) as im:
                    w, h = im.size
                    if (im.getexif() or {}).get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotation swaps the sides
                        w, h = h, w
            except OSError:
                raise TrainError(f"cannot read image {p}") from None
            if spec.bucket_no_upscale:
                bucket, resized = bucket_no_upscale(w, h, spec.resolution, spec.bucket_reso_steps)
                if 0 in bucket:
                    raise TrainError(
                        f"{p} ({w}x{h}) has a side under the bucket step {spec.bucket_reso_steps} px, so "
                        "bucket_no_upscale gives it a bucket side of 0 (sd-scripts fails on it too): remove it, "
                        "enlarge it, or train without bucket_no_upscale"
                    )
                items.append(Item(p, caption, s, (w, h), bucket, resized))
            else:
                items.append(Item(p, caption, s, (w, h), assign_bucket(w, h, buckets)))
    return items


def epoch_repeats(items: list[Item]) -> list[int]:
    """How often each item is seen per epoch: a training image its subset's num_repeats; regularization images
    as sd-scripts' DreamBoothDataset balances them: in order, each reg image with its repeats until they reach the
    training images x repeats, then one more repeat each, round-robin (reg images past that point are not used)."""
    reps = [0 if it.subset.is_reg else it.subset.num_repeats for it in items]
    n_train = sum(reps)
    reg = [i for i, it in enumerate(items) if it.subset.is_reg]
    n, first = 0, True
    while reg and n < n_train:
        for i in reg:
            if first:
                reps[i] = items[i].subset.num_repeats
                n += reps[i]
            else:
                reps[i] += 1
                n += 1
            if n >= n_train:
                break
        first = False
    return reps


def dataset_dirs(items: list[Item], reg: bool) -> dict[str, dict[str, int]]:
    """{subset folder name: {n_repeats, img_count}} as sd-scripts' ss_dataset_dirs / ss_reg_dataset_dirs."""
    out: dict[str, dict[str, int]] = {}
    seen: dict[int, str] = {}
    for it in items:
        if it.subset.is_reg != reg:
            continue
        key = seen.get(id(it.subset))
        if key is None:
            key, i = it.subset.image_dir.name, 2
            while key in out:  # the same folder name twice: "name (2)", as sd-scripts
                key, i = f"{it.subset.image_dir.name} ({i})", i + 1
            seen[id(it.subset)] = key
            out[key] = {"n_repeats": it.subset.num_repeats, "img_count": 0}
        out[key]["img_count"] += 1
    return out


def subsets_metadata(items: list[Item]) -> list[dict]:
    """Per subset, what its captions really got (keep_tokens, shuffle, flip), as sd-scripts' ss_datasets subsets."""
    out: dict[int, dict] = {}
    for it in items:
        s = it.subset
        entry = out.setdefault(id(s), {
            "img_count": 0, "num_repeats": s.num_repeats, "color_aug": False, "flip_aug": s.flip_aug,
            "random_crop": False, "shuffle_caption": s.shuffle_caption, "keep_tokens": s.keep_tokens,
            "image_dir": s.image_dir.name, "class_tokens": s.class_tokens, "is_reg": s.is_reg,
        })  # fmt: skip
        entry["img_count"] += 1
    return list(out.values())


def export_sources(data: str) -> dict[Path, str]:
    """Exported image -> the dataset file it came from, from the curate_export.json beside a dataset TOML."""
    path = Path(data).expanduser()
    record = path.parent / "curate_export.json" if path.is_file() else path / "curate_export.json"
    try:
        images = json.loads(record.read_text(encoding="utf-8")).get("images") or []
        return {(record.parent / im["file"]).resolve(): str(im["source"]) for im in images}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def small_images_warning(
    items: list[Item], spec: DatasetSpec, sources: dict[Path, str] | None = None
) -> tuple[str, dict | None]:
    """The warning (or, with bucket_no_upscale, the note) about training images smaller than the resolution;
    images are named as in the dataset when ``sources`` (export_sources) knows them."""
    from curate.errors import CurateError
    from curate.stages.bucket import BucketSettings, small_images, small_images_message

    if not spec.enable_bucket:
        return "", None
    sources = sources or {}

    def name(it: Item) -> str:
        return sources.get(it.path.resolve()) or str(it.path.relative_to(it.subset.image_dir.parent))

    sizes = {name(it): it.size for it in items if not it.subset.is_reg}
    try:
        settings = BucketSettings(spec.resolution, spec.min_bucket_reso, spec.max_bucket_reso,
                                  spec.bucket_reso_steps, spec.bucket_no_upscale)  # fmt: skip
    except CurateError:  # sizes curate's checks refuse but the trainer took: no report rather than no run
        return "", None
    info = small_images(sizes, settings)
    if info is None:
        return "", None
    return small_images_message(info, "--no-upscale (--set bucket_no_upscale=true)"), info


# ---------------------------------------------------------------- captions


def process_caption(caption: str, keep_tokens: int, shuffle: bool, dropout: float, rng: random.Random) -> str:
    """kohya caption handling: shuffle comma-separated tags after the first keep_tokens; drop the caption."""
    if dropout and rng.random() < dropout:
        return ""
    if shuffle:
        tags = [t.strip() for t in caption.split(",")]
        head, tail = tags[:keep_tokens], tags[keep_tokens:]
        rng.shuffle(tail)
        caption = ", ".join(head + tail)
    return caption


def tag_frequency(items: list[Item]) -> dict[str, dict[str, int]]:
    """{subset folder name: {tag: count}} over train and reg subsets, lower-cased, as sd-scripts' ss_tag_frequency."""
    out: dict[str, dict[str, int]] = {}
    for it in items:
        freq = out.setdefault(it.subset.image_dir.name, {})
        for tag in (t.strip().lower() for t in it.caption.split(",")):
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return out


# ---------------------------------------------------------------- images and latents


def load_image(
    path: Path, bucket: tuple[int, int], flip: bool = False, resized: tuple[int, int] | None = None
):
    """Image -> (tensor [3,h,w] in [-1,1], crop (top, left)): resize to cover the bucket (or to ``resized``,
    bucket_no_upscale's size: the image's own when it is smaller than the resolution), then center-crop."""
    import numpy as np
    import torch
    from PIL import Image

    from curate.io import DecodeError, open_rgb
    from curate.stages.bucket import resized_size

    try:  # the same decode as the scan: EXIF orientation, transparency on white, CMYK / 16-bit converted
        im = open_rgb(path)
    except (OSError, DecodeError) as exc:
        raise TrainError(f"cannot read image {path}: {exc}") from None
    bw, bh = bucket
    nw, nh = resized or resized_size(im.width, im.height, bucket)  # the size `curate bucket` reports
    im = im.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    im = im.crop((left, top, left + bw, top + bh))
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1
    return x, (top, left)


def _config_of(config: dict) -> dict:
    """A model config without the path it was loaded from (`_name_or_path`: "sd15" and "/abs/sd15" are one model),
    so a resume (which records absolute paths) or another working folder still hits the caches."""
    return {k: v for k, v in config.items() if k != "_name_or_path"}


def vae_id(vae, base_name: str) -> str:
    """A short id of the VAE (config + a weight fingerprint), part of the latent cache key."""
    import torch

    h = hashlib.sha256(json.dumps(_config_of(dict(vae.config)), sort_keys=True, default=str).encode())
    h.update(base_name.encode())
    with torch.no_grad():
        for p in list(vae.parameters())[:4]:
            h.update(p.detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:12]


def content_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:20]


def latent_batch_size(bucket: tuple[int, int], setting: int = 0) -> int:
    """Images per VAE encode for a bucket: `setting` when > 0, else 16 at 512², 4 at 1024² (the same pixels per
    batch, so the encoder's peak memory stays about the same whatever the bucket), at most 64."""
    if setting > 0:
        return setting
    return max(1, min(64, (16 * 512 * 512) // (bucket[0] * bucket[1])))


def _prefetch(fn, args: list, window: int):
    """fn(*a) for each a of args, in order, computed ahead by a small thread pool (PIL decodes and resizes
    without the GIL); at most `window` results are held, so host memory stays bounded."""
    import os
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) - 1))) as pool:
        pending: deque = deque()
        todo = iter(args)
        for a in todo:
            pending.append(pool.submit(fn, *a))
            if len(pending) >= window:
                break
        while pending:
            res = pending.popleft().result()
            for a in todo:
                pending.append(pool.submit(fn, *a))
                break
            yield res


def _cache_progress(console, description: str, total: int):
    """A rich progress bar of images with their rate (images/s); hidden when console is None or nothing is to do."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        disable=console is None or total == 0,
    )
    return progress, progress.add_task(description, total=total, rate="")


def _tick(progress, task, done: int, t0: float, unit: str = "images") -> None:
    import time

    dt = time.perf_counter() - t0
    progress.update(task, completed=done, rate=f"{done / dt:.1f} {unit}/s" if dt > 0 else "")


def prune_latent_cache(cache_dir: Path, vid: str, keep: set[Path]) -> int:
    """Remove the cache's own latent files for this VAE id (vid) that this run did not use: images deleted or
    changed since they were encoded, or encoded at a bucket this run no longer has. Files of another vid (another
    VAE or base model), files named otherwise (the te/ folder, a user's notes) and files without the cache's
    tensors are left alone. Returns how many were removed."""
    ours = re.compile(
        rf"[0-9a-f]{{20}}_{re.escape(vid)}_[0-9]+x[0-9]+(_r[0-9]+x[0-9]+)?\.safetensors"
    )  # encode_latents' names
    return _prune_cache(cache_dir, ours, keep, lambda sf: {"latent", "crop"} <= set(sf.keys()))


def _prune_cache(cache_dir: Path, name: re.Pattern, keep: set[Path], ours) -> int:
    """Unlink the files of cache_dir (not in keep) whose name fully matches `name` and for which ours(safe_open
    handle) is true; files that do not read as safetensors are not ours to judge. Returns how many went."""
    from safetensors import SafetensorError, safe_open

    removed = 0
    for f in sorted(cache_dir.iterdir()):
        if f in keep or not name.fullmatch(f.name) or not f.is_file():
            continue
        try:
            with safe_open(str(f), "pt") as sf:
                mine = ours(sf)
        except (SafetensorError, OSError):
            continue  # not readable as the cache writes them: not ours to judge
        if mine:
            f.unlink(missing_ok=True)
            removed += 1
    return removed


def encode_latents(items: list[Item], vae, device, cache_dir: Path | None, vid: str, flip: list[bool],
                   read_only: bool = False, batch_size: int = 0, console=None,
                   stats: dict | None = None):  # fmt: skip
    """Per item: (latent, flipped latent or None, crop). Reads/writes the disk cache when cache_dir is set.

    The images not in the cache are encoded in batches of one bucket (same h x w), latent_batch_size() images
    per VAE call (batch_size > 0 overrides it), through pinned host memory, in the VAE's dtype under no_grad;
    a flipped copy is the decoded image mirrored (no second decode). stats gets encoded / cached counts and, once
    the cache holds every latent of this run, latents_pruned: this VAE's files no item used (prune_latent_cache).
    read_only: every latent must come from the cache (DDP ranks > 0 read what rank 0 wrote; they never encode)."""
    import time

    import torch
    from safetensors.torch import load_file, save_file

    sf = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out: list = [None] * len(items)
    files: list[Path | None] = [None] * len(items)
    if cache_dir:
        cache_dir.mkdir(parents=True, exist_ok=True)
    todo = []
    for k, (it, want_flip) in enumerate(zip(items, flip, strict=True)):
        bw, bh = it.bucket
        own = f"_r{it.resized[0]}x{it.resized[1]}" if it.resized else ""  # bucket_no_upscale: another crop
        f = cache_dir / f"{content_hash(it.path)}_{vid}_{bw}x{bh}{own}.safetensors" if cache_dir else None
        files[k] = f
        if f is not None and f.is_file():
            t = load_file(str(f))
            if not want_flip or "latent_flipped" in t:
                crop = tuple(int(v) for v in t["crop"].tolist())
                out[k] = (t["latent"], t.get("latent_flipped") if want_flip else None, crop)
                continue
        if read_only:
            raise TrainError(f"latent cache miss for {it.path} in {cache_dir}: rank 0 should have written it")
        todo.append(k)
    if stats is not None:
        stats.update(latents_encoded=len(todo), latents_cached=len(items) - len(todo))

    def prune() -> None:
        if cache_dir and not read_only:
            pruned = prune_latent_cache(cache_dir, vid, {f for f in files if f is not None})
            if stats is not None:
                stats["latents_pruned"] = pruned

    if not todo:
        prune()
        return out
    # jobs (item, flipped) grouped by bucket, then cut into batches of one shape
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for k in todo:
        by_bucket.setdefault(items[k].bucket, []).append(k)
    order = [k for b in sorted(by_bucket) for k in by_bucket[b]]
    batches = []
    for b in sorted(by_bucket):
        jobs = [(k, fl) for k in by_bucket[b] for fl in ((False, True) if flip[k] else (False,))]
        n = latent_batch_size(b, batch_size)
        batches += [jobs[i : i + n] for i in range(0, len(jobs), n)]
    biggest = max(len(b) for b in batches)
    images = _prefetch(lambda k: load_image(items[k].path, items[k].bucket, resized=items[k].resized), [(k,) for k in order],
                       window=2 * biggest + 8)  # fmt: skip
    pin = device is not None and torch.device(device).type == "cuda"
    dtype = vae.dtype
    loaded: dict[int, tuple] = {}  # decoded images whose jobs are not all done yet
    done: dict[int, dict] = {}
    progress, task = _cache_progress(console, "caching latents", len(todo))
    t0, n_done = time.perf_counter(), 0
    with progress:
        for jobs in batches:
            xs = []
            for k, fl in jobs:
                if k not in loaded:
                    loaded[k] = next(images)
                x = loaded[k][0]
                xs.append(torch.flip(x, dims=[-1]) if fl else x)
            x = torch.stack(xs)
            if pin:
                x = x.pin_memory()
            with torch.no_grad():
                lat = vae.encode(x.to(device, dtype, non_blocking=pin)).latent_dist.mode()
                lat = ((lat.float() - shift) * sf).cpu()
            for (k, fl), one in zip(jobs, lat, strict=True):
                if not torch.isfinite(one).all():
                    raise TrainError(
                        f"VAE produced NaN/inf latents for {items[k].path}; use an fp32-safe VAE"
                    )
                done.setdefault(k, {})["latent_flipped" if fl else "latent"] = one.clone(
                    memory_format=torch.contiguous_format
                )
                if len(done[k]) < (2 if flip[k] else 1):
                    continue
                tensors = done.pop(k)
                crop = loaded.pop(k)[1]
                tensors["crop"] = torch.tensor(crop)
                if files[k] is not None:
                    tmp = files[k].with_suffix(".tmp")
                    save_file(tensors, str(tmp))
                    tmp.replace(files[k])  # atomic
                out[k] = (tensors["latent"], tensors.get("latent_flipped"), crop)
                n_done += 1
                _tick(progress, task, n_done, t0)
    prune()
    return out


def encode_prompts(tokenizers: list, text_encoders: list, prompts: list[str], device, clip_skip: int = 0):
    """CLIP conditioning: SD1.5 last hidden state (clip_skip >= 2: that layer from the end, through the final
    layer norm, as sd-scripts and A1111 do); SDXL penultimate states of both encoders + pooled CLIP-G."""
    import torch

    hs, pooled = [], None
    for i, (tok, te) in enumerate(zip(tokenizers, text_encoders, strict=True)):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids  # fmt: skip
        # a pageable host->device copy waits for the whole GPU queue (per micro-step when the text encoders are not
        # cached): copy from pinned memory without blocking instead
        cuda = torch.device(device).type == "cuda"
        ids = ids.pin_memory().to(device, non_blocking=True) if cuda else ids.to(device)
        if len(text_encoders) == 1 and clip_skip >= 2:
            h = te(ids, output_hidden_states=True).hidden_states[-clip_skip]
            clip = getattr(te, "module", te)  # DDP-wrapped while training
            hs.append(getattr(clip, "text_model", clip).final_layer_norm(h))
        elif len(text_encoders) == 1:
            hs.append(te(ids)[0])
        else:
            o = te(ids, output_hidden_states=True)
            hs.append(o.hidden_states[-2])
            if i == 1:
                pooled = o.text_embeds
    return torch.cat(hs, dim=-1), pooled


# ---------------------------------------------------------------- text-encoder output cache


def te_id(tokenizers: list, text_encoders: list, base_name: str, clip_skip: int, dtype) -> str:
    """A short id of what turns a caption into an embedding: tokenizers (class, length, vocab, a probe's ids),
    text encoders (config + a slice of every weight), clip_skip and the output dtype; part of the TE cache key."""
    import torch

    h = hashlib.sha256(f"{base_name}|clip_skip={clip_skip}|{dtype}".encode())
    for tok, te in zip(tokenizers, text_encoders, strict=True):
        probe = tok(["a photo of sks, 1girl, red"], truncation=True).input_ids[0]
        h.update(f"{type(tok).__name__}|{tok.model_max_length}|{len(tok)}|{probe}".encode())
        clip = getattr(te, "module", te)
        h.update(json.dumps(_config_of(clip.config.to_dict()), sort_keys=True, default=str).encode())
        with torch.no_grad():
            for p in clip.parameters():
                flat = p.detach().reshape(-1)
                h.update(torch.cat([flat[:32], flat[-32:]]).float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


TE_CACHE_NAME = re.compile(r"[0-9a-f]{24}\.safetensors")  # what encode_text_cached names its files


def prune_text_cache(cache_dir: Path, tid: str, keep: set[Path]) -> int:
    """Remove the cache's own entries for this text-encoder id (tid) that this run did not use: captions edited
    or gone since they were encoded. Files of another tid (another base model, clip_skip or dtype), files
    named otherwise and files without the cache's metadata are left alone. Returns how many were removed."""
    return _prune_cache(cache_dir, TE_CACHE_NAME, keep, lambda sf: (sf.metadata() or {}).get("te_id") == tid)


def encode_text_cached(tokenizers: list, text_encoders: list, captions: list[str], device, clip_skip: int,
                       cache_dir: Path | None, tid: str, dtype, autocast_dtype=None, batch_size: int = 32,
                       read_only: bool = False, console=None, stats: dict | None = None):  # fmt: skip
    """(embeddings [N, 77, D], pooled [N, 1280] or None) for the captions, in dtype on the device.

    Each distinct caption is encoded once, in batches, and kept in cache_dir as <sha256(tid + caption)>.safetensors
    (the caption text in its metadata), so a second run reads it and an edited caption gets a new key: its
    embedding is recomputed, the others are reused; entries of this tid for captions no longer here are then
    removed (prune_text_cache). stats gets te_encoded / te_cached (distinct captions) and te_pruned."""
    import time

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    unique = list(dict.fromkeys(captions))
    found: dict[str, tuple] = {}
    files = {}
    if cache_dir:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for c in unique:
            f = cache_dir / f"{hashlib.sha256(f'{tid}|{c}'.encode()).hexdigest()[:24]}.safetensors"
            files[c] = f
            if f.is_file():
                with safe_open(str(f), "pt") as sf:
                    if (sf.metadata() or {}).get("caption") == c:
                        found[c] = (
                            sf.get_tensor("emb"),
                            sf.get_tensor("pooled") if "pooled" in sf.keys() else None,
                        )
    missing = [c for c in unique if c not in found]
    if missing and read_only:
        raise TrainError(f"text-encoder cache miss in {cache_dir}: rank 0 should have written it")
    if stats is not None:
        stats.update(te_encoded=len(missing), te_cached=len(unique) - len(missing))
    progress, task = _cache_progress(console, "caching text embeddings", len(missing))
    t0 = time.perf_counter()
    with progress, torch.no_grad():
        for i in range(0, len(missing), batch_size):
            chunk = missing[i : i + batch_size]
            with torch.autocast(torch.device(device).type, autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):  # fmt: skip
                emb, pooled = encode_prompts(tokenizers, text_encoders, chunk, device, clip_skip)
            emb = emb.to(dtype).cpu()
            pooled = pooled.to(dtype).cpu() if pooled is not None else None
            for j, c in enumerate(chunk):
                t = {"emb": emb[j].contiguous().clone()}
                if pooled is not None:
                    t["pooled"] = pooled[j].contiguous().clone()
                found[c] = (t["emb"], t.get("pooled"))
                if c in files:
                    tmp = files[c].with_suffix(".tmp")
                    save_file(t, str(tmp), metadata={"caption": c, "te_id": tid})
                    tmp.replace(files[c])  # atomic
            _tick(progress, task, i + len(chunk), t0, "captions")
    if cache_dir and not read_only:
        pruned = prune_text_cache(cache_dir, tid, set(files.values()))
        if stats is not None:
            stats["te_pruned"] = pruned
    emb_all = torch.stack([found[c][0] for c in captions]).to(device)
    has_pooled = found[captions[0]][1] is not None if captions else False
    pooled_all = torch.stack([found[c][1] for c in captions]).to(device) if has_pooled else None
    return emb_all, pooled_all


# ---------------------------------------------------------------- sampler


class BucketBatchSampler:
    """Every batch from one bucket; per-epoch order is a pure function of (seed, epoch), so resume is exact."""

    def __init__(
        self, buckets: list[tuple[int, int]], repeats: list[int], batch_size: int, seed: int
    ) -> None:
        self.buckets, self.repeats, self.batch_size, self.seed = buckets, repeats, batch_size, seed

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, (b, r) in enumerate(zip(self.buckets, self.repeats, strict=True)):
            by_bucket.setdefault(b, []).extend([i] * r)
        batches = []
        for b in sorted(by_bucket):
            idx = by_bucket[b]
            rng.shuffle(idx)
            batches += [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __len__(self) -> int:
        return len(self.epoch(0))
