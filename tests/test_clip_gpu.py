"""CLIP on CUDA: bf16 weights, worker pipeline with pinned memory, same answers as fp32 on CPU."""

from __future__ import annotations

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
