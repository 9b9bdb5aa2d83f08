"""CLIP on CUDA: bf16 weights, worker pipeline with pinned memory, same answers as fp32 on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.clip_helpers import make_tiny_model, pattern  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_bf16_pipeline_matches_cpu(tmp_path):
    from curate.models.clip import load_clip
    from curate.stages.embed import encode_paths

    folder = make_tiny_model(tmp_path / "tiny")
    for k in range(64):
        pattern(k % 8, size=100 + 7 * k, seed=k).save(tmp_path / f"{k:03d}.jpg", quality=90)
    paths = sorted(str(p) for p in tmp_path.glob("*.jpg"))
    gpu = load_clip(str(folder), None, None)  # auto -> cuda
    cpu = load_clip(str(folder), None, "cpu")
    assert gpu.device == "cuda" and gpu.dtype in (torch.bfloat16, torch.float16)
    assert cpu.dtype == torch.float32 and gpu is not cpu
    ok_g, (eg,) = encode_paths(paths, [gpu], batch_size=16, workers=4)
    ok_c, (ec,) = encode_paths(paths, [cpu], batch_size=16, workers=0)
    assert ok_g.all() and ok_c.all()
    cos = (eg * ec).sum(1)
    assert cos.min() > 0.995, cos.min()  # bf16 vs fp32 on the same crops
    assert np.allclose(np.linalg.norm(eg, axis=1), 1, atol=1e-3)


def test_gpu_exact_pairs_match_faiss_flat():
    from curate.stages.similarity import exact_pairs, exact_pairs_torch, similar_pairs

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40000, 512)).astype(np.float32)
    x[30000:] = x[:10000] + rng.normal(scale=0.1, size=(10000, 512))  # cos ~0.995
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a = exact_pairs(x, 0.9)
    b = exact_pairs_torch(x, 0.9, "cuda")
    assert len(a[0]) >= 9000
    assert set(zip(a[0].tolist(), a[1].tolist(), strict=True)) == set(
        zip(b[0].tolist(), b[1].tolist(), strict=True)
    )
    assert similar_pairs(x, 0.9, device="cuda").index == "exact-gpu"


def test_nvjpeg_path_matches_cpu_path_and_isolates_corrupt_jpegs(tmp_path, monkeypatch):
    """Byte-reading workers + batched nvJPEG decode + GPU resize/crop vs the CPU decode path."""
    from curate.models.clip import load_clip
    from curate.stages import embed
    from tests.test_clip import mixed_set, photo

    folder = make_tiny_model(tmp_path / "tiny")
    files = mixed_set(tmp_path / "imgs")  # plain, grey, progressive, PNG, rotated, CMYK, truncated, junk
    for k in range(40):
        photo(300 + 17 * k, 520 - 9 * k, k).save(tmp_path / "imgs" / f"z{k:02d}.jpg", quality=90)
    paths = sorted(str(p) for p in (tmp_path / "imgs").iterdir())
    gpu = load_clip(str(folder), None, "cuda")
    cpu = load_clip(str(folder), None, "cpu")
    assert embed._resolve_gpu_decode(None, [gpu]) == "cuda"  # auto: on for a CUDA model
    decoded = []
    real = embed._decode_jpegs
    monkeypatch.setattr(
        embed, "_decode_jpegs", lambda d, dev: decoded.append((len(d), str(dev))) or real(d, dev)
    )
    ok_g, (eg,) = embed.encode_paths(paths, [gpu], batch_size=16, workers=4)
    ok_c, (ec,) = embed.encode_paths(paths, [cpu], batch_size=16, workers=0, gpu_decode=False)
    assert sum(n for n, _ in decoded) == 43 and {d for _, d in decoded} == {"cuda"}
    assert np.array_equal(ok_g, ok_c)
    bad = [Path(p).name for p, o in zip(paths, ok_g, strict=True) if not o]
    assert bad == ["g_trunc.jpg", "h_junk.jpg"]
    cos = (eg[ok_g] * ec[ok_g]).sum(1)
    assert cos.min() > 0.995, cos.min()
    # nvJPEG itself: a corrupt stream in a batch costs only its own slot
    good = torch.frombuffer(bytearray(files["i_base.jpg"].read_bytes()), dtype=torch.uint8)
    junk = torch.frombuffer(bytearray(files["h_junk.jpg"].read_bytes()), dtype=torch.uint8)
    out = real([good, junk, good], "cuda")
    assert out[1] is None and out[0].is_cuda and out[0].shape == (3, 200, 300)
    ref = torch.from_numpy(np.asarray(photo(300, 200, 6))).permute(2, 0, 1).float()
    assert (out[2].cpu().float() - ref).abs().mean() < 6  # JPEG q85 vs its source
    # a corrupt file that passes the header check goes to nvJPEG, fails there, and is marked not ok
    monkeypatch.setattr(embed, "jpeg_gpu_size", lambda data: (1, 1))
    sel = [str(files[n]) for n in ("a_base.jpg", "h_junk.jpg", "i_base.jpg", "d.png")]
    ok, (e,) = embed.encode_paths(sel, [gpu], workers=0, gpu_decode=True)
    assert ok.tolist() == [True, False, True, True]  # the PNG fails nvJPEG, then decodes on the CPU
    assert not e[1].any() and np.allclose(np.linalg.norm(e[[0, 2, 3]], axis=1), 1, atol=1e-3)
