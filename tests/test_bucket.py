"""Buckets equal the published sd-scripts rules; tables below were worked out by hand from those rules."""

from __future__ import annotations

import pytest

from curate.errors import CurateError
from curate.stages.bucket import (
    BucketSettings,
    assign_bucket,
    bucket_images,
    bucket_no_upscale,
    make_buckets,
    place,
    report_section,
    stored_settings,
)
from tests.export_helpers import fresh_copy

# resolution 512, min 256, max 1024, step 64 (sd-scripts defaults): area 262144
BUCKETS_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]  # fmt: skip

# resolution 1024, min 256, max 2048, step 64 (the usual SDXL settings): area 1048576
BUCKETS_1024 = [
    (256, 2048), (320, 2048), (384, 2048), (448, 2048), (512, 1856), (512, 1920), (512, 1984), (512, 2048),
    (576, 1664), (576, 1728), (576, 1792), (640, 1536), (640, 1600), (704, 1408), (704, 1472), (768, 1280),
    (768, 1344), (832, 1216), (896, 1152), (960, 1088),
    (1024, 1024),
    (1088, 960), (1152, 896), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 256),
    (2048, 320), (2048, 384), (2048, 448), (2048, 512),
]  # fmt: skip


def test_bucket_lists_match_hand_tables():
    assert make_buckets(512) == BUCKETS_512
    assert make_buckets(1024, 256, 2048, 64) == BUCKETS_1024
    # 1024 with max 1024: widths 256..1024 only; height capped at 1024 for narrow widths.
    b = make_buckets(1024, 256, 1024, 64)
    assert (1024, 1024) in b and (256, 1024) in b and (1024, 256) in b and max(max(x) for x in b) == 1024
    assert len(b) == 1 + 2 * 12  # square + 12 distinct portrait/landscape pairs (widths 256..960)


@pytest.mark.parametrize(
    "res,size,bucket,resized",
    [
        (1024, (1024, 1024), (1024, 1024), (1024, 1024)),
        (1024, (1920, 1080), (1344, 768), (1365, 768)),  # ar 1.778: 1.75 beats 1.667 / 2.0
        (1024, (3000, 2000), (1216, 832), (1248, 832)),  # ar 1.5: 1.4615 beats 1.667
        (1024, (800, 1200), (832, 1216), (832, 1248)),  # ar 0.667: 0.684; upscaled x1.04
        (1024, (512, 512), (1024, 1024), (1024, 1024)),  # not a bucket: nearest aspect, upscaled x2
        (1024, (704, 1408), (704, 1408), (704, 1408)),  # exactly a bucket: used as is
        (512, (768, 512), (640, 384), (640, 427)),  # ar 1.5: 1.667 beats 1.286
        (512, (512, 768), (384, 640), (427, 640)),
        (512, (1000, 250), (1024, 256), (1024, 256)),
        (512, (300, 300), (512, 512), (512, 512)),
    ],
)
def test_assignment_and_resize(res, size, bucket, resized):
    buckets = BUCKETS_512 if res == 512 else BUCKETS_1024
    assert assign_bucket(*size, buckets) == bucket
    pl = place(*size, BucketSettings(res, 256, 1024 if res == 512 else 2048, 64), buckets)
    assert pl.bucket == bucket and pl.resized == resized
    assert pl.upscaled == (pl.scale > 1)


def test_crop_loss_and_upscale_numbers():
    pl = place(1920, 1080, BucketSettings(1024, 256, 2048, 64))
    assert pl.crop_loss == pytest.approx(1 - 1344 / 1365, abs=1e-9)
    assert not pl.upscaled
    pl = place(800, 1200, BucketSettings(1024, 256, 2048, 64))
    assert pl.scale == pytest.approx(1.04) and pl.upscaled
    assert pl.crop_loss == pytest.approx(1 - 1216 / 1248, abs=1e-9)


@pytest.mark.parametrize(
    "size,bucket,resized",
    [
        ((800, 600), (768, 576), (800, 600)),  # small enough: never scaled, floored to the step
        ((4000, 3000), (1088, 832), (1109, 832)),  # shrunk to the area; height rounding keeps aspect better
        ((1024, 1024), (1024, 1024), (1024, 1024)),
        ((2048, 2048), (1024, 1024), (1024, 1024)),
        ((100, 50), (64, 0), (100, 50)),  # below one step: an empty bucket (reported as a warning)
    ],
)
def test_no_upscale(size, bucket, resized):
    assert bucket_no_upscale(*size, 1024, 64) == (bucket, resized)


def test_bad_settings_are_user_errors():
    with pytest.raises(CurateError, match="at least the resolution"):
        make_buckets(1024, 256, 512, 64)
    with pytest.raises(CurateError, match="multiple of 8"):
        make_buckets(512, 256, 1024, 60)


def test_bucket_stage_stores_buckets_and_reports(tmp_path_factory, tmp_path):
    d, _ = fresh_copy(tmp_path_factory, tmp_path / "ds")
    with d:
        from PIL import Image

        Image.new("RGB", (1000, 250), (200, 40, 40)).save(tmp_path / "ds" / "panorama.png")
        d.scan()
        rep = bucket_images(d.manifest, BucketSettings(512, 256, 1024, 64))
        recs = d.kept()
        assert all(r.bucket == rep.placements[r.path].bucket for r in recs)
        for r in recs:
            assert r.bucket == place(r.width, r.height, BucketSettings(512, 256, 1024, 64)).bucket
        assert sum(rep.counts.values()) == len(recs) == 37
        assert stored_settings(d.manifest) == BucketSettings(512, 256, 1024, 64)
        # The lone panorama (aspect 4) sits alone in the 1024x256 bucket: a wasted-batch warning.
        assert rep.placements["panorama.png"].bucket == (1024, 256)
        assert rep.small_buckets == {(1024, 256): 1}
        assert any("1024x256 (1)" in w for w in rep.warnings)
        html = report_section(d.manifest)
        assert "Buckets (" in html and "512x512" in html
        # At 1024 every image is smaller than its bucket: all upscaled, and a warning says so.
        rep = bucket_images(d.manifest, BucketSettings(1024, 256, 2048, 64))
        assert len(rep.upscaled) == 37 and any("upscaled" in w for w in rep.warnings)
        rep = bucket_images(d.manifest, BucketSettings(1024, 256, 2048, 64, no_upscale=True))
        assert not rep.upscaled
        assert all(
            pl.bucket[0] <= pl.resized[0] and pl.bucket[1] <= pl.resized[1] for pl in rep.placements.values()
        )
