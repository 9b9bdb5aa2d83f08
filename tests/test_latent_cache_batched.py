"""Latent caching in batches of one bucket shape: the same latents as one image at a time, the same cache files and
keys (content hash, VAE id, bucket; flipped copies), bounded batch sizes, and a second run that encodes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.trainer_fixtures import _vae
from trainer_bridge import data as D
from trainer_bridge.config import TrainError


def _items(root: Path) -> list[D.Item]:
    """7 images over 3 buckets (5 in 64x64, so batches of 2 split it 2 + 2 + 1), each with its bucket set."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(3)
    sub = D.Subset(root)
    sizes = [(64, 64), (96, 64), (64, 64), (64, 96), (64, 64), (70, 70), (64, 64)]
    buckets = [(64, 64), (80, 48), (64, 64), (48, 80), (64, 64), (64, 64), (64, 64)]
    items = []
    for i, ((w, h), b) in enumerate(zip(sizes, buckets, strict=True)):
        low = rng.uniform(0, 255, (5, 5, 3)).astype(np.uint8)
        p = root / f"img{i}.png"
        Image.fromarray(low).resize((w, h), Image.BILINEAR).save(p)
        items.append(D.Item(p, f"caption {i}", sub, (w, h), b))
    return items


def _one_at_a_time(items, vae, flips):
    """The reference: every image (and its mirror) decoded and encoded alone, as the trainer did before."""
    sf = vae.config.scaling_factor
    out = []
    for it, fl in zip(items, flips, strict=True):
        got = []
        for flip in (False, True) if fl else (False,):
            x, crop = D.load_image(it.path, it.bucket, flip=flip)
            with torch.no_grad():
                got.append(vae.encode(x[None]).latent_dist.mode()[0] * sf)
        out.append((got[0], got[1] if fl else None, crop))
    return out


@pytest.fixture(scope="module")
def vae():
    return _vae(1).eval()


def test_batched_equals_one_at_a_time_and_caches(vae, tmp_path):
    items = _items(tmp_path / "img")
    flips = [i % 2 == 0 for i in range(len(items))]
    ref = _one_at_a_time(items, vae, flips)
    shapes = []
    encode = vae.encode

    def spy(x, *a, **k):
        shapes.append(tuple(x.shape))
        return encode(x, *a, **k)

    vae.encode = spy
    try:
        stats: dict = {}
        got = D.encode_latents(
            items, vae, "cpu", tmp_path / "cache", "vid1", flips, batch_size=2, stats=stats
        )
    finally:
        del vae.encode
    assert stats == {"latents_encoded": 7, "latents_cached": 0, "latents_pruned": 0}
    # one bucket shape per batch, at most 2 images, buckets in order (w x h: 48x80, 64x64, 80x48);
    # 64x64 holds 5 images, 4 of them flipped: 9 encodes -> batches of 2, 2, 2, 2, 1
    assert shapes == [(1, 3, 80, 48)] + [(2, 3, 64, 64)] * 4 + [(1, 3, 64, 64), (1, 3, 48, 80)], shapes
    for (lat, lat_f, crop), (r, r_f, r_crop) in zip(got, ref, strict=True):
        assert crop == r_crop
        torch.testing.assert_close(lat, r, atol=2e-5, rtol=1e-4)
        if r_f is None:
            assert lat_f is None
        else:
            torch.testing.assert_close(lat_f, r_f, atol=2e-5, rtol=1e-4)
            assert (lat_f - lat).abs().max() > 1e-3  # a real mirror, not the same latent twice
    # the cache as before: <content hash>_<vae id>_<w>x<h>.safetensors, flipped copies where flip_aug is on
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 7 and not list((tmp_path / "cache").glob("*.tmp"))
    for it, fl, (lat, _, crop) in zip(items, flips, got, strict=True):
        f = tmp_path / "cache" / f"{D.content_hash(it.path)}_vid1_{it.bucket[0]}x{it.bucket[1]}.safetensors"
        t = load_file(str(f))
        assert ("latent_flipped" in t) == fl and tuple(t["crop"].tolist()) == crop
        torch.testing.assert_close(t["latent"], lat)

    # a second run reads every latent from the cache (no VAE call), also read-only as DDP ranks > 0 do
    vae.encode = None  # type: ignore[assignment]  # any encode would fail
    try:
        stats = {}
        again = D.encode_latents(items, vae, "cpu", tmp_path / "cache", "vid1", flips, stats=stats)
        ro = D.encode_latents(items, vae, "cpu", tmp_path / "cache", "vid1", flips, read_only=True)
    finally:
        del vae.encode
    assert stats == {"latents_encoded": 0, "latents_cached": 7, "latents_pruned": 0}
    for a, b, c in zip(got, again, ro, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and a[2] == b[2] == c[2]


def test_cache_keys_invalidate(vae, tmp_path):
    items = _items(tmp_path / "img")[:3]
    flips = [False] * 3
    cache = tmp_path / "cache"
    D.encode_latents(items, vae, "cpu", cache, "vidA", flips)
    stats: dict = {}
    # another VAE id: everything re-encoded beside the old files, which that VAE's pruning leaves alone
    D.encode_latents(items, vae, "cpu", cache, "vidB", flips, stats=stats)
    assert stats["latents_encoded"] == 3 and stats["latents_pruned"] == 0
    assert len(list(cache.glob("*_vidB_*"))) == 3 and len(list(cache.glob("*_vidA_*"))) == 3
    # flip_aug turned on: the cached file has no mirror, so that image is encoded again (both latents), in place
    D.encode_latents(items, vae, "cpu", cache, "vidA", [True, False, False], stats=stats)
    assert stats == {"latents_encoded": 1, "latents_cached": 2, "latents_pruned": 0}
    # the image's bytes changed: a new content hash, a new file; another bucket: a new file; the two old ones go
    old = {f.name for f in cache.glob("*_vidA_*")}
    Image.new("RGB", (64, 64), (200, 10, 10)).save(items[0].path)
    items[2].bucket = (48, 80)
    D.encode_latents(items, vae, "cpu", cache, "vidA", flips, stats=stats)
    assert stats == {"latents_encoded": 2, "latents_cached": 1, "latents_pruned": 2}
    now = {f.name for f in cache.glob("*_vidA_*")}
    assert len(now) == 3 and len(old & now) == 1 and len(list(cache.glob("*_vidB_*"))) == 3
    with pytest.raises(TrainError, match="latent cache miss"):
        D.encode_latents(items, vae, "cpu", cache, "vidC", flips, read_only=True)


def test_latent_batch_size_by_area():
    assert D.latent_batch_size((512, 512)) == 16
    assert D.latent_batch_size((1024, 1024)) == 4
    assert D.latent_batch_size((768, 512)) == 10
    assert D.latent_batch_size((2048, 2048)) == 1
    assert D.latent_batch_size((64, 64)) == 64  # capped
    assert D.latent_batch_size((1024, 1024), 7) == 7  # latent_batch_size = 7 wins


def test_vae_id_changes_with_weights(vae):
    a = D.vae_id(vae, "base")
    other = _vae(5).eval()
    assert D.vae_id(other, "base") != a and D.vae_id(vae, "other") != a and D.vae_id(vae, "base") == a


def test_bad_latent_batch_size_is_one_line():
    from trainer_bridge import TrainConfig

    with pytest.raises(TrainError, match="latent_batch_size must be >= 1"):
        TrainConfig(latent_batch_size=-2)
