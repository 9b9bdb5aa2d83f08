"""`--decode auto|gpu|cpu`: the decision, the CPU path unchanged when forced, and the nvJPEG feed's per-file
fallbacks (run here on CPU tensors through torchvision's CPU JPEG decoder; on CUDA in the gpu tests)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

import tests.tiny_wd14 as tiny_wd14
from curate import Dataset
from curate.errors import CurateError
from curate.models import wd14
from curate.stages import tag as tag_stage
from curate.stages.tag import TagConfig, decode_choice, load_scores, model_key, tag_images

pytest.importorskip("timm")
torch = pytest.importorskip("torch")
pytest.importorskip("torchvision.io")


def _img(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BILINEAR)


@pytest.fixture(scope="module")
def timm_dir(tmp_path_factory):
    return tiny_wd14.build_timm(tmp_path_factory.mktemp("wd") / "tagger", onnx=False)


@pytest.fixture(autouse=True)
def _fresh_cache():
    wd14._CACHE.clear()
    yield
    wd14._CACHE.clear()


BASELINE_JPEGS = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]


@pytest.fixture()
def mixed(tmp_path):
    """5 baseline JPEGs, a progressive and an EXIF-rotated JPEG, two PNGs and one JPEG broken after the scan."""
    root = tmp_path / "ds"
    root.mkdir()
    for i, name in enumerate(BASELINE_JPEGS):
        _img(64 + 8 * i, 48, i).save(root / name, quality=90)
    _img(70, 50, 10).save(root / "prog.jpg", quality=90, progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    _img(80, 40, 11).save(root / "rotated.jpg", quality=90, exif=exif)
    _img(50, 30, 12).save(root / "p.png")
    _img(33, 60, 13).convert("RGBA").save(root / "q.png")
    _img(60, 60, 14).save(root / "broken.jpg", quality=90)
    with Dataset.open(root) as ds:
        ds.scan()
    data = (root / "broken.jpg").read_bytes()
    (root / "broken.jpg").write_bytes(data[:200] + b"\x00" * 50)  # header intact, data gone, no EOI
    return root


def test_decode_choice_table():
    def never() -> bool:
        raise AssertionError("nvJPEG probed where it cannot be used")

    assert decode_choice("auto", "torch", "cuda:0", lambda: True)[0] == "gpu"
    assert decode_choice("gpu", "torch", "cuda:1", lambda: True) == (
        "gpu",
        "--decode gpu: nvJPEG for JPEG files",
    )
    for mode in ("cpu", "threads", "processes"):
        assert decode_choice(mode, "torch", "cuda:0", never) == ("cpu", f"--decode {mode}")
    where, why = decode_choice("auto", "onnx", "cuda", never)
    assert where == "cpu" and "onnx backend" in why
    assert decode_choice("auto", "torch", "cpu", never)[0] == "cpu"
    where, why = decode_choice("auto", "torch", "cuda:0", lambda: False)
    assert where == "cpu" and "nvJPEG" in why
    with pytest.raises(CurateError, match="--decode gpu needs the torch backend on a CUDA device"):
        decode_choice("gpu", "torch", "cpu", never)
    with pytest.raises(CurateError, match="--decode cpu"):
        decode_choice("gpu", "torch", "cuda:0", lambda: False)
    with pytest.raises(CurateError, match="use auto, gpu or cpu"):
        decode_choice("nvjpeg", "torch", "cuda:0", never)


def test_cli_decode_cpu_gives_todays_scores_and_gpu_on_cpu_is_one_line_error(mixed, timm_dir):
    from typer.testing import CliRunner

    from curate.cli import app

    r = CliRunner()
    args = ["tag", str(mixed), "--model", str(timm_dir), "--backend", "torch", "--device", "cpu", "--json"]
    res = r.invoke(app, args)
    assert res.exit_code == 0, res.output
    run = json.loads(res.stdout)["run"]
    assert run["inferred"] == 9 and [p for p, _ in run["failed"]] == ["broken.jpg"]
    assert run["decode"].startswith("threads x") and run["gpu_decoded"] == 0
    with Dataset.open(mixed) as ds:
        default = load_scores(ds.manifest, model_key(str(timm_dir)))
    res = r.invoke(app, [*args, "--decode", "cpu", "--force"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["run"]["decode_why"] == "--decode cpu"
    with Dataset.open(mixed) as ds:
        assert load_scores(ds.manifest, model_key(str(timm_dir))) == default and len(default) == 9
    res = r.invoke(app, [*args, "--decode", "gpu", "--force"])
    assert res.exit_code == 2 and "--decode gpu needs the torch backend on a CUDA device" in res.output
    assert "Traceback" not in res.output
    res = r.invoke(app, [*args, "--decode", "fast"])
    assert res.exit_code != 0 and "use auto, gpu or cpu" in res.output


def test_gpu_feed_falls_back_per_file_and_matches_the_cpu_path(mixed, timm_dir, monkeypatch):
    """The nvJPEG feed on CPU tensors: baseline JPEGs through torchvision's decoder, the rest through PIL."""
    base = TagConfig(model=str(timm_dir), backend="torch", device="cpu", batch_size=3, workers=2, force=True)
    key = model_key(str(timm_dir))
    with Dataset.open(mixed) as ds:
        cpu_run = tag_images(ds.manifest, dataclasses.replace(base, decode="cpu"))
        cpu = load_scores(ds.manifest, key)
        monkeypatch.setattr(tag_stage, "decode_choice", lambda *a: ("gpu", "forced for the test"))
        run = tag_images(ds.manifest, base)
        gpu = load_scores(ds.manifest, key)
        by_path = {r.path: r.sha256 for r in ds.kept()}
    assert cpu_run.inferred == run.inferred == 9
    assert [p for p, _ in run.failed] == [p for p, _ in cpu_run.failed] == ["broken.jpg"]
    # the 5 baseline JPEGs went to the JPEG tensor decoder; progressive, EXIF-rotated and PNGs to PIL
    assert run.gpu_decoded == 5 and run.decode == "torchvision on cpu (5) + threads x 2 (4)"
    assert gpu.keys() == cpu.keys()
    for name in ("prog.jpg", "rotated.jpg", "p.png", "q.png"):
        assert gpu[by_path[name]] == cpu[by_path[name]], name  # the very same CPU path
    worst = 0.0
    for name in BASELINE_JPEGS:
        a, b = cpu[by_path[name]], gpu[by_path[name]]
        # a score under the 0.05 floor is not stored: read it as the other side's score capped at the floor
        both = a.keys() | b.keys()
        worst = max(
            worst,
            *(abs(a.get(t, min(0.05, b.get(t, 0.0))) - b.get(t, min(0.05, a.get(t, 0.0)))) for t in both),
        )
        # torch's antialiased bicubic vs PIL's filter: a few levels per pixel, the same tags above 0.35
        assert {t for t, p in a.items() if p >= 0.35} == {t for t, p in b.items() if p >= 0.35}, name
    print("worst score difference, tensor path vs PIL path:", worst)
    assert worst < 0.02, worst
