"""Exports: kohya folders + a dataset TOML sd-scripts accepts, and an imagefolder HF datasets loads."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import tomllib
from PIL import Image

from curate.errors import CurateError
from curate.export import common as common_mod
from curate.stages.bucket import BucketSettings, assign_bucket, bucket_images, make_buckets
from tests.export_helpers import fresh_copy

# -- sd-scripts' dataset config schema (library/config_util.py, ConfigSanitizer), re-expressed ---------
NUM = (int, float)
TWO_FLOATS = "two floats"
INT_OR_TWO_INTS = "int or two ints"
SUBSET_ASCENDABLE = {
    "color_aug": bool, "face_crop_aug_range": TWO_FLOATS, "flip_aug": bool, "num_repeats": int,
    "random_crop": bool, "shuffle_caption": bool, "keep_tokens": int, "keep_tokens_separator": str,
    "secondary_separator": str, "caption_separator": str, "enable_wildcard": bool, "token_warmup_min": int,
    "token_warmup_step": NUM, "caption_prefix": str, "caption_suffix": str, "custom_attributes": dict,
    "resize_interpolation": str,
}  # fmt: skip
DO_SUBSET_ASCENDABLE = {"caption_dropout_every_n_epochs": int, "caption_dropout_rate": NUM,
                        "caption_tag_dropout_rate": NUM}  # fmt: skip
DB_SUBSET_ASCENDABLE = {"caption_extension": str, "class_tokens": str, "cache_info": bool}
DB_SUBSET_DISTINCT = {"image_dir": str, "is_reg": bool, "alpha_mask": bool}  # image_dir is Required
DATASET_ASCENDABLE = {
    "batch_size": int, "bucket_no_upscale": bool, "bucket_reso_steps": int, "enable_bucket": bool,
    "max_bucket_reso": int, "min_bucket_reso": int, "validation_seed": int, "validation_split": float,
    "resolution": INT_OR_TWO_INTS, "network_multiplier": float, "resize_interpolation": str,
}  # fmt: skip
# DreamBooth-style dataset with dropout support (what train_network.py builds).
DB_SUBSET = {**SUBSET_ASCENDABLE, **DB_SUBSET_DISTINCT, **DB_SUBSET_ASCENDABLE, **DO_SUBSET_ASCENDABLE}
DB_DATASET = {**DATASET_ASCENDABLE, **SUBSET_ASCENDABLE, **DB_SUBSET_ASCENDABLE, **DO_SUBSET_ASCENDABLE}
GENERAL = {**DATASET_ASCENDABLE, **SUBSET_ASCENDABLE, **DB_SUBSET_ASCENDABLE, **DO_SUBSET_ASCENDABLE}


def _check_value(where: str, value, kind) -> None:
    if kind == TWO_FLOATS:
        assert isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value), where
    elif kind == INT_OR_TWO_INTS:
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok |= isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)
        assert ok, where
    elif kind is int:
        assert type(value) is int, f"{where} must be int, got {value!r}"
    elif kind is float:
        assert type(value) is float, f"{where} must be float, got {value!r}"
    else:
        assert isinstance(value, kind) and not (kind == NUM and isinstance(value, bool)), (
            f"{where}: {value!r}"
        )


def _check_buckets(where: str, ds: dict, general: dict, step_multiple: int) -> None:
    """sd-scripts' dataset checks (train_util: adjust_min_max_bucket_reso_by_steps, verify_bucket_reso_steps)."""
    get = lambda k, default: ds.get(k, general.get(k, default))  # noqa: E731
    res = get("resolution", None)
    assert res is not None, f"{where}: resolution is required"
    lo, hi = (res, res) if isinstance(res, int) else (min(res), max(res))
    if not get("enable_bucket", False):
        return
    mn, mx, step = get("min_bucket_reso", 256), get("max_bucket_reso", 1024), get("bucket_reso_steps", 64)
    assert mn % step == 0 and mx % step == 0, f"{where}: sd-scripts would round min/max to the step"
    assert mn <= lo, f"{where}: min_bucket_reso {mn} above resolution {lo}"
    assert hi <= mx, f"{where}: max_bucket_reso {mx} below resolution {hi}"
    assert step % step_multiple == 0, f"{where}: bucket_reso_steps {step} not divisible by {step_multiple}"


def validate_sd_scripts_config(cfg: dict, step_multiple: int = 64) -> None:
    """Raise AssertionError where sd-scripts' voluptuous schema or its dataset checks would fail.

    ``step_multiple``: 64 for train_network.py (SD1.5), 32 for sdxl_train_network.py.
    """
    assert set(cfg) <= {"general", "datasets"}, set(cfg)
    for k, v in cfg.get("general", {}).items():
        assert k in GENERAL, f"[general] {k} not allowed"
        _check_value(f"general.{k}", v, GENERAL[k])
    for ds in cfg["datasets"]:
        for k, v in ds.items():
            if k == "subsets":
                continue
            assert k in DB_DATASET, f"[[datasets]] {k} not allowed"
            _check_value(f"datasets.{k}", v, DB_DATASET[k])
        _check_buckets("[[datasets]]", ds, cfg.get("general", {}), step_multiple)
        assert any(not sub.get("is_reg", False) for sub in ds["subsets"]), "reg subsets alone train nothing"
        for sub in ds["subsets"]:
            assert "image_dir" in sub, "image_dir is required"
            assert "metadata_file" not in sub
            for k, v in sub.items():
                assert k in DB_SUBSET, f"[[datasets.subsets]] {k} not allowed"
                _check_value(f"subsets.{k}", v, DB_SUBSET[k])


def test_schema_checker_catches_mistakes():
    good = {
        "general": {"shuffle_caption": True},
        "datasets": [{"resolution": 512, "subsets": [{"image_dir": "x"}]}],
    }
    validate_sd_scripts_config(good)
    for bad in (
        {"general": {"min_bucket_reso": "256"}, "datasets": [{"subsets": [{"image_dir": "x"}]}]},
        {"datasets": [{"resolution": 512, "subsets": [{"num_repeats": 1}]}]},  # no image_dir
        {"datasets": [{"resolution": 512, "subsets": [{"image_dir": "x", "enable_bucket": True}]}]},  # dataset key
        {"datasets": [{"max_train_steps": 5, "subsets": [{"image_dir": "x"}]}]},
        {"datasets": [{"resolution": 512, "enable_bucket": True, "min_bucket_reso": 768,
                       "subsets": [{"image_dir": "x"}]}]},  # min above the resolution
        {"datasets": [{"resolution": 512, "enable_bucket": True, "min_bucket_reso": 200,
                       "subsets": [{"image_dir": "x"}]}]},  # not a multiple of the step
        {"datasets": [{"resolution": 512, "enable_bucket": True, "bucket_reso_steps": 32,
                       "subsets": [{"image_dir": "x"}]}]},  # SD1.5 needs steps of 64
        {"datasets": [{"resolution": 512, "subsets": [{"image_dir": "x", "is_reg": True}]}]},
        {"datasets": [{"resolution": 512, "subsets": [{"image_dir": "x", "is_reg": "yes"}]}]},
    ):  # fmt: skip
        with pytest.raises(AssertionError):
            validate_sd_scripts_config(bad)


# -- fixtures ----------------------------------------------------------------------------------------
def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def prepared(tmp_path_factory, tmp_path):
    """A scanned, split (20%, seed 0), bucketed (512) dataset; half captioned, half tagged."""
    d, fams = fresh_copy(tmp_path_factory, tmp_path / "ds")
    d.split(0.2, 0)
    bucket_images(d.manifest, BucketSettings(512, 256, 1024, 64))
    updates = []
    for k, r in enumerate(d.kept()):
        if k % 2:
            updates.append((r.sha256, {"caption": f"a photo of a woman, picture {k}"}))
        else:
            updates.append(
                (
                    r.sha256,
                    {"tags": ["1girl", "long_hair", "^_^", "mychar"] if k % 4 == 0 else ["1girl", "smile"]},
                )
            )
    d.manifest.update_images(updates)
    sources = {p: _sha(p) for p in (tmp_path / "ds").rglob("*") if p.is_file() and ".curate" not in p.parts}
    yield d, fams, sources
    d.close()


def test_kohya_export_layout_captions_toml(prepared, tmp_path):
    d, fams, sources = prepared
    out = tmp_path / "out"
    res = d.export(out, "kohya", repeats=10, trigger="mychar", class_word="woman")
    kept = {r.sha256: r for r in d.kept()}
    n_val = sum(1 for r in kept.values() if r.split == "val")
    assert (res.train, res.val) == (36 - n_val, n_val) and n_val > 0
    train_dir, val_dir = out / "img" / "10_mychar woman", out / "val" / "1_mychar woman"
    imgs = sorted(p for p in train_dir.iterdir() if p.suffix != ".txt")
    assert len(imgs) == res.train and len(list(val_dir.glob("*.txt"))) == n_val
    # Captions: one line, trigger first, not doubled; tags with underscores become words.
    for p in imgs:
        text = p.with_suffix(".txt").read_text("utf-8")
        assert text.endswith("\n") and text.count("\n") == 1 and text.startswith("mychar, ")
        assert text.count("mychar") == 1 and "long_hair" not in text
    manifest = json.loads((out / "curate_export.json").read_text())
    caps = {m["sha256"]: m["caption"] for m in manifest["images"]}
    tagged = next(r for r in kept.values() if r.tags and "long_hair" in r.tags)
    assert caps[tagged.sha256] == "mychar, 1girl, long hair, ^_^"
    sentence = next(r for r in kept.values() if r.caption)
    assert caps[sentence.sha256] == f"mychar, {sentence.caption}"
    # No planted family is split between img/ and val/.
    side = {m["source"]: m["split"] for m in manifest["images"]}
    for paths in fams.values():
        assert len({side[p] for p in paths}) == 1
    # Files are copies (or reflinks) of the sources: same bytes, never the same inode; sources untouched.
    src_by_sha = {r.sha256: d.root / r.path for r in kept.values()}
    for m in manifest["images"]:
        assert os.stat(out / m["file"]).st_ino != os.stat(src_by_sha[m["sha256"]]).st_ino
        assert _sha(out / m["file"]) == m["sha256"]
    assert res.copied + res.reflinked == 36 and res.linked == res.reencoded == 0
    assert {p: _sha(p) for p in sources} == sources

    # The TOML parses (tomllib and the `toml` package sd-scripts uses) and fits sd-scripts' schema.
    text = (out / "dataset.toml").read_text()
    cfg = tomllib.loads(text)
    import toml

    assert toml.loads(text) == cfg
    validate_sd_scripts_config(cfg)
    ds0 = cfg["datasets"][0]
    assert ds0["resolution"] == 512 and ds0["enable_bucket"] is True
    assert (ds0["min_bucket_reso"], ds0["max_bucket_reso"], ds0["bucket_reso_steps"]) == (256, 1024, 64)
    assert ds0["bucket_no_upscale"] is False
    sub = ds0["subsets"][0]
    assert sub["image_dir"] == str(train_dir.resolve()) and Path(sub["image_dir"]).is_dir()
    assert sub["num_repeats"] == 10 and sub["class_tokens"] == "mychar woman"
    assert cfg["general"] == {
        "caption_extension": ".txt",
        "shuffle_caption": False,
        "keep_tokens": 1,
        "flip_aug": False,
    }
    val = tomllib.loads((out / "dataset_val.toml").read_text())
    validate_sd_scripts_config(val)
    assert val["datasets"][0]["subsets"][0]["num_repeats"] == 1
    assert "validation_split" not in val["datasets"][0]  # a random re-split would leak near-duplicates


def test_export_refuses_to_overwrite_and_is_atomic(prepared, tmp_path, monkeypatch):
    d, _, sources = prepared
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(CurateError, match="never overwrites"):
        d.export(busy, "kohya")
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(CurateError, match="inside the dataset"):
        d.export(d.root / "export", "kohya")
    calls = {"n": 0}
    real = common_mod.write_image

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(common_mod, "write_image", failing)
    with pytest.raises(OSError):
        d.export(tmp_path / "half", "kohya")
    assert not (tmp_path / "half").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".half")]
    assert {p: _sha(p) for p in sources} == sources
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(common_mod, "write_image", real)
    assert d.export(empty, "kohya").train > 0  # an empty folder is fine


def test_resize_writes_bucket_sized_images_the_trainer_keeps(prepared, tmp_path):
    d, _, _ = prepared
    out = tmp_path / "out"
    res = d.export(out, "kohya", repeats=2, trigger="mychar", resize=True)
    assert res.resized == 36
    buckets = make_buckets(512, 256, 1024, 64)
    m = json.loads((out / "curate_export.json").read_text())
    for item in m["images"]:
        with Image.open(out / item["file"]) as im:
            assert list(im.size) == item["bucket"]
            assert assign_bucket(*im.size, buckets) == im.size  # no further resize or crop in the trainer


def test_exif_rotated_images_are_written_upright(prepared, tmp_path):
    d, _, _ = prepared
    img = Image.new("RGB", (300, 200), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(d.root / "rotated.jpg", "JPEG", exif=exif.tobytes())
    d.scan()
    out = tmp_path / "out"
    res = d.export(out, "kohya", trigger="mychar")
    m = json.loads((out / "curate_export.json").read_text())
    item = next(i for i in m["images"] if i["source"] == "rotated.jpg")
    assert item["file"].endswith(".png") and res.reencoded == 1
    with Image.open(out / item["file"]) as im:
        assert im.size == (200, 300)  # sd-scripts ignores EXIF orientation, so we bake it in


@pytest.mark.slow
def test_diffusers_export_loads_in_hf_datasets(prepared, tmp_path):
    import datasets

    d, _, _ = prepared
    out = tmp_path / "hf"
    res = d.export(out, "diffusers", trigger="mychar")
    assert res.files == ["train/metadata.jsonl", "validation/metadata.jsonl"]
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "cache"))
    assert set(loaded) == {"train", "validation"}
    assert (loaded["train"].num_rows, loaded["validation"].num_rows) == (res.train, res.val)
    want = {}
    for split in ("train", "validation"):
        for line in (out / split / "metadata.jsonl").read_text().splitlines():
            row = json.loads(line)
            with Image.open(out / split / row["file_name"]) as im:
                want[(split, im.size)] = want.get((split, im.size), set()) | {row["text"]}
    for split in ("train", "validation"):
        for row in loaded[split]:
            assert row["text"].startswith("mychar")
            assert row["text"] in want[(split, row["image"].size)]


def test_caption_rules():
    from curate.export.common import make_caption
    from curate.manifest import ImageRecord

    r = ImageRecord("0" * 64, "p.png", ["p.png"], 1, "PNG", "RGB", 8, 8)
    assert make_caption(r, "mychar", "woman") == "mychar woman"  # nothing else: kohya's class_tokens fallback
    assert make_caption(r) == ""
    r.caption = "a photo of mychar\nat the beach"
    assert make_caption(r, "mychar") == "a photo of mychar at the beach"  # named already; one line
    r.caption, r.tags = None, ["smile", "mychar", "short_hair"]
    assert make_caption(r, "mychar") == "mychar, smile, short hair"
    r.tags = ["smile"]
    assert make_caption(r, "mychar") == "mychar, smile"
