"""Images smaller than the training resolution: `curate plan` and `curate train` say how many and by how
much they are enlarged, and `--no-upscale` (sd-scripts' bucket_no_upscale) trains them at their own size,
carried into the dataset TOML and the LoRA's metadata. Folders built in tmp_path, the CLI through CliRunner,
the trainer on the tiny SD1.5 model of tests/trainer_fixtures.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

from curate.cli import app
from tests.test_roundtrip_train import TINY, picture
from tests.trainer_fixtures import sd15_dir  # noqa: F401  (pytest fixture)

run = CliRunner().invoke
SIZES = {"tiny": (64, 64), "small": (200, 140), "big0": (640, 640), "big1": (768, 512)}


def _dataset(root: Path) -> Path:
    for i, (stem, (w, h)) in enumerate(SIZES.items()):
        picture(root / f"{stem}.png", w, h, i)
        (root / f"{stem}.txt").write_text(f"mychar, tag{i}")
    assert run(app, ["scan", str(root)]).exit_code == 0
    return root


def test_plan_warns_about_small_images_and_no_upscale_writes_the_option(tmp_path: Path):
    ds = _dataset(tmp_path / "ds")
    r = run(app, ["plan", str(ds), "--json", "--out", str(tmp_path / "a.toml")])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    s = p["small_images"]
    assert (s["count"], s["of"], s["resolution"], s["no_upscale"], s["upscaled"]) == (2, 4, 512, False, 2)
    assert s["worst"] == {"path": "tiny.png", "size": [64, 64], "bucket": [512, 512]}
    assert s["worst_scale"] == 8.0  # 64 px enlarged to the 512 px square bucket
    (msg,) = [w for w in p["warnings"] if "smaller than" in w]
    assert msg.startswith("2 of 4 image(s) are smaller than the 512 px training resolution")
    assert "x8.00" in msg and "tiny.png" in msg and "--no-upscale" in msg
    assert "bucket_no_upscale" not in p["train"]
    r = run(app, ["plan", str(ds)])  # the table's warnings show it too
    assert "smaller than the 512 px" in " ".join(r.output.split()), r.output

    r = run(app, ["plan", str(ds), "--json", "--no-upscale", "--out", str(tmp_path / "b.toml")])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["train"]["bucket_no_upscale"] is True
    assert not [w for w in p["warnings"] if "smaller than" in w]
    s = p["small_images"]
    assert (s["count"], s["no_upscale"], s["upscaled"], s["worst_scale"]) == (2, True, 0, 1.0)
    assert s["smallest"]["bucket"] == [64, 64]
    assert tomllib.loads((tmp_path / "b.toml").read_text())["train"]["bucket_no_upscale"] is True


def test_trainer_no_upscale_buckets_and_crops_as_sd_scripts(tmp_path: Path):
    """bucket_no_upscale: a smaller image keeps its size and is centre-cropped to a multiple of the step;
    a larger one shrinks to the resolution's area (sd-scripts' BucketManager.select_bucket)."""
    from trainer_bridge import TrainConfig
    from trainer_bridge import data as D

    sub = tmp_path / "ds" / "1_x"
    for i, (stem, (w, h)) in enumerate(SIZES.items()):
        picture(sub / f"{stem}.png", w, h, i)
    cfg = TrainConfig(data=str(tmp_path / "ds"), resolution=256, bucket_no_upscale=True)
    spec = D.read_dataset(cfg, "sd15")
    items = {it.path.stem: it for it in D.list_items(spec.subsets, spec)}
    got = {k: (it.bucket, it.resized) for k, it in items.items()}
    assert got == {
        "tiny": ((64, 64), (64, 64)),
        "small": ((192, 128), (200, 140)),
        "big0": ((256, 256), (256, 256)),
        # 256² area at 3:2 is 313.5x209: rounding the height to 192 keeps the aspect better (288x192, 1.5)
        # than rounding the width to 256 (256x128, 2.0); the bucket floors 288 to 256
        "big1": ((256, 192), (288, 192)),
    }
    x, crop = D.load_image(items["small"].path, items["small"].bucket, resized=items["small"].resized)
    assert tuple(x.shape) == (3, 128, 192) and crop == (6, 4)  # (140-128)//2, (200-192)//2: no resize
    note, info = D.small_images_warning(list(items.values()), spec)
    assert info["count"] == 2 and info["upscaled"] == 0 and "at their own size" in note
    spec_up = D.read_dataset(TrainConfig(data=str(tmp_path / "ds"), resolution=256), "sd15")
    note, info = D.small_images_warning(D.list_items(spec_up.subsets, spec_up), spec_up)
    assert info["worst_scale"] == 4.0 and "x4.00" in note  # 64 px into the 256 px bucket


@pytest.mark.slow
def test_train_warns_then_no_upscale_reaches_toml_and_lora(tmp_path: Path, sd15_dir):  # noqa: F811
    from safetensors import safe_open

    ds = _dataset(tmp_path / "ds")
    sets = [a for s in (*TINY, "max_steps=1", "resolution=256") for a in ("--set", s)]
    base = ["train", str(ds), "--base", str(sd15_dir), "--json", *sets]
    r = run(app, [*base, "--output-dir", str(tmp_path / "up")])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    (msg,) = [w for w in res["warnings"] if "smaller than" in w]
    # named as in the dataset, not by the export's file names
    assert msg.startswith("2 of 4 image(s) are smaller than the 256 px") and "tiny.png" in msg, msg
    assert res["small_images"]["worst_scale"] == 4.0
    with safe_open(res["lora"], "pt") as f:
        assert f.metadata()["ss_bucket_no_upscale"] == "False"

    r = run(app, [*base, "--output-dir", str(tmp_path / "nu"), "--no-upscale"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert not [w for w in res["warnings"] if "smaller than" in w]
    assert res["small_images"]["no_upscale"] is True
    toml = tomllib.loads((tmp_path / "nu" / "data" / "dataset.toml").read_text())
    assert toml["datasets"][0]["bucket_no_upscale"] is True
    with safe_open(res["lora"], "pt") as f:
        meta = f.metadata()
    assert meta["ss_bucket_no_upscale"] == "True"
    buckets = sorted(tuple(b["resolution"]) for b in json.loads(meta["ss_bucket_info"])["buckets"].values())
    assert buckets == [(64, 64), (192, 128), (256, 192), (256, 256)]
    r = run(app, ["lora-info", res["lora"], "--json"])
    assert json.loads(r.stdout)["bucket_no_upscale"] == "True"
