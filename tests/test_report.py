"""`curate report` through the CLI: kept gallery with captions, KEPT / DROPPED in words, histograms."""

from __future__ import annotations

import re
from html import unescape

import pytest
from PIL import ImageFilter
from typer.testing import CliRunner

from curate.cli import app
from curate.dataset import Dataset
from tests.images import textured

runner = CliRunner()


def _cards(page: str, cls: str) -> list[str]:
    return re.findall(rf'<figure class="[^"]*\b{cls}\b[^"]*">(.*?)</figure>', page, re.S)


@pytest.mark.slow
def test_report_gallery_duplicates_rejects_histograms(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    for i in range(3):
        textured(640, 640, seed=i).save(ds / f"k{i}.png")
    textured(640, 640, seed=0).resize((600, 600)).save(ds / "k0_copy.png")  # near duplicate of k0
    textured(640, 640, seed=7).filter(ImageFilter.GaussianBlur(12)).save(ds / "blur.png")
    textured(300, 300, seed=8).save(ds / "small.png")
    (ds / "curate.toml").write_text("[filter]\nmax_brightness = 0.9\n")  # rejects nothing: drawn from config
    (ds / "k1.txt").write_text("a photo of  my dog, on grass\n")
    out = tmp_path / "site" / "report.html"  # elsewhere: the thumbnails go beside it
    steps = (["scan"], ["filter"], ["dedupe"], ["split", "--val", "0.34", "--seed", "0"], ["bucket"])
    for cmd in (*([c[0], str(ds), *c[1:]] for c in steps), ["report", str(ds), "--out", str(out)]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 0, res.output
    page = out.read_text()
    thumbs = re.findall(r'<img src="(thumbs/[0-9a-f]+\.jpg)"', page)
    assert thumbs and all((out.parent / t).is_file() for t in thumbs)

    kept = _cards(page, "gallery")
    paths = sorted(re.search(r'class="path">(.*?)<', c).group(1) for c in kept)
    assert paths == ["k0.png", "k1.png", "k2.png"]
    k1 = next(c for c in kept if 'class="path">k1.png<' in c)
    assert re.search(r'class="caption">(.*?)</span>', k1).group(1) == "a photo of my dog, on grass"
    assert all('<span class="label">KEPT</span>' in c for c in kept)
    splits = [re.search(r"split: (\w+)<", c).group(1) for c in kept]
    assert sorted(splits) == ["train", "train", "val"]  # 3 kept images, --val 0.34
    with Dataset.open(ds, create=False) as d:
        buckets = {r.path: r.bucket for r in d.kept()}
    for c in kept:
        p = re.search(r'class="path">(.*?)<', c).group(1)
        assert f"bucket: {buckets[p][0]}x{buckets[p][1]}" in c

    dropped = [unescape(c) for c in _cards(page, "dup-dropped")]
    (keeper,) = _cards(page, "dup-kept")
    assert '<span class="label">KEPT</span>k0.png' in keeper  # 640x640 beats its 600x600 copy
    assert len(dropped) == 1 and "DROPPED — duplicate of k0.png</span>k0_copy.png" in dropped[0]
    assert "keeper wins on rule: more pixels" in dropped[0] and "link: pHash distance" in dropped[0]
    assert 'class="path">k0.png<' in page and 'class="path">k0_copy.png<' not in page

    rejects = {re.search(r"</span>([\w.]+)<br>", c).group(1): unescape(c) for c in _cards(page, "reject")}
    assert set(rejects) == {"blur.png", "small.png"}
    assert "DROPPED — too-small" in rejects["small.png"] and "score 300" in rejects["small.png"]
    assert "threshold 512" in rejects["small.png"]
    with Dataset.open(ds, create=False) as d:
        sharp = {r.path: r.scores["sharpness"] for r in d.manifest.images()}
    assert (
        "DROPPED — blurry" in rejects["blur.png"] and f"score {sharp['blur.png']:.1f}" in rejects["blur.png"]
    )
    assert "threshold 10.0" in rejects["blur.png"]

    svg = re.search(r'<svg class="hist" data-metric="sharpness".*?</svg>', page, re.S).group(0)
    bins = [(float(a), float(b), int(c)) for a, b, c in re.findall(
        r'data-lo="([^"]+)" data-hi="([^"]+)" data-count="(\d+)"', svg)]  # fmt: skip
    assert sum(c for *_, c in bins) == len(sharp) == 6
    for v in sharp.values():  # every planted score sits in a bin that counts it
        assert any(a - 1e-3 <= v <= b + 1e-3 and c for a, b, c in bins)
    assert 'class="threshold" data-value="10"' in svg
    side = re.search(r'<svg class="hist" data-metric="short side \(px\)".*?</svg>', page, re.S).group(0)
    counts = [int(c) for c in re.findall(r'data-count="(\d+)"', side)]
    assert counts[0] == 1 and counts[-1] == 4 and sum(counts) == 6  # 300; 600; 640 x 4 (axis 300..640)
    assert 'class="threshold" data-value="512"' in side
    bright = re.search(r'<svg class="hist" data-metric="brightness".*?</svg>', page, re.S).group(0)
    assert 'class="threshold" data-value="0.9"' in bright and 'data-value="0.05"' in bright
    assert ">KEPT<" in page and ">DROPPED — " in page
