"""The nvJPEG-style path (decode to a tensor, pad/resize/crop with torch ops) against the PIL reference path:
pixels within a few levels, scores within a small tolerance. Run on CPU tensors here, on CUDA in the gpu test."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import tests.tiny_wd14 as tiny_wd14
from curate.models import wd14

pytest.importorskip("timm")
torch = pytest.importorskip("torch")
tvio = pytest.importorskip("torchvision.io")

from curate.models.wd_torch import gpu_batch, prepare_tensor  # noqa: E402

SIZES = [(50, 30), (20, 41), (32, 32), (64, 64), (120, 64), (33, 90), (300, 200)]


def _jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(base).resize((w, h), Image.BILINEAR).save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    wd14._CACHE.clear()
    folder = tiny_wd14.build_timm(tmp_path_factory.mktemp("wd") / "tagger")
    yield wd14.load_tagger(str(folder), "cpu", "torch")
    wd14._CACHE.clear()


def test_tensor_preprocessing_matches_pil_pixels_and_scores(tagger):
    datas = [_jpeg(w, h, i) for i, (w, h) in enumerate(SIZES)]
    ref = np.stack([tagger.preprocess_image(Image.open(io.BytesIO(d)).convert("RGB")) for d in datas])
    tens = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    got, ok = gpu_batch(tagger, tens)
    got = got.numpy()
    assert ok == [True] * len(datas) and got.shape == ref.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - ref.astype(int))
    # a square image already at the model size (32): only the JPEG decoders' rounding can differ
    assert tagger.size == 32 and diff[2].max() <= 2
    # pad: the white border lands on the same pixels
    assert (got[0, :2] == 255).all() and (ref[0, :2] == 255).all()
    # resize: antialiased torch bicubic vs PIL bicubic stays within a few levels on average
    assert diff.mean() < 2.0, diff.mean()
    ps_ref, ps_got = tagger.predict(ref), tagger.predict(got)
    assert np.abs(ps_ref - ps_got).max() < 0.02
    assert np.abs(ps_ref - ps_got).mean() < 0.005


def test_identity_sizes_and_bad_bytes(tagger):
    img = torch.randint(0, 255, (3, tagger.size, tagger.size), dtype=torch.uint8)
    out = prepare_tensor(img, tagger.size, tagger.size)
    assert torch.equal(out, img.permute(1, 2, 0))
    good = torch.frombuffer(bytearray(_jpeg(40, 30, 1)), dtype=torch.uint8)
    bad = torch.frombuffer(bytearray(b"\xff\xd8not a jpeg at all" * 4), dtype=torch.uint8)
    batch, ok = gpu_batch(tagger, [good, bad])
    assert ok == [True, False] and batch.shape[0] == 2


@pytest.mark.gpu
def test_nvjpeg_batch_matches_cpu_path(tagger, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    gt = wd14.load_tagger(str(tagger.model), "cuda", "torch", "fp32")
    datas = [torch.frombuffer(bytearray(_jpeg(w, h, i)), dtype=torch.uint8) for i, (w, h) in enumerate(SIZES)]
    cpu, _ = gpu_batch(tagger, datas)
    gpu, ok = gpu_batch(gt, datas)
    assert all(ok)
    assert np.abs(gpu.cpu().numpy().astype(int) - cpu.numpy().astype(int)).mean() < 2.0
