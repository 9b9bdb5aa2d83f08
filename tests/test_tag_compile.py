"""`curate tag --compile`: after ``warm`` no batch compiles again (partial last batches are padded to the warmed
size, bigger ones run in pieces), and the compiled tagger stores the scores of the eager one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

import tests.tiny_wd14 as tiny_wd14
from curate import Dataset
from curate.models import wd14
from curate.stages import tag as tag_stage
from curate.stages.tag import TagConfig, load_scores, model_key, tag_images

pytest.importorskip("timm")
torch = pytest.importorskip("torch")
pytest.importorskip("torchvision.io")

from tests.test_tag_decode import _fresh_cache, timm_dir  # noqa: E402, F401  (pytest fixtures: tiny timm tagger)


@pytest.fixture()
def graphs(monkeypatch):
    """torch.compile with a backend that counts the graphs dynamo hands it (and runs them eagerly: fast)."""
    built: list[tuple] = []

    def counting(gm, example_inputs):
        built.append(tuple(example_inputs[0].shape))  # the image batch (the weights follow it)
        return gm.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, **{**kw, "backend": counting}))
    torch._dynamo.reset()
    yield built
    torch._dynamo.reset()


@pytest.fixture()
def ds7(tmp_path):
    """7 JPEGs of several sizes: batches of 3 leave a partial last batch of 1."""
    root = tmp_path / "ds"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        w, h = 40 + 6 * i, 32 + 5 * (i % 3)
        base = rng.uniform(0, 255, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
        Image.fromarray(base).resize((w, h), Image.BILINEAR).save(root / f"{i}.jpg", quality=90)
    with Dataset.open(root) as ds:
        ds.scan()
    return root


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k].get(t, 0.0) - b[k].get(t, 0.0)) for k in a for t in a[k].keys() | b[k].keys())


@pytest.mark.parametrize("decode", ["cpu", "feed"])
def test_compiled_run_with_a_partial_last_batch_compiles_once(ds7, timm_dir, graphs, monkeypatch, decode):  # noqa: F811
    base = TagConfig(model=str(timm_dir), backend="torch", device="cpu", batch_size=3, workers=2, force=True)
    key = model_key(str(timm_dir))
    if decode == "feed":  # the nvJPEG feed's batches (device tensors built on other threads), on CPU
        monkeypatch.setattr(tag_stage, "decode_choice", lambda *a: ("gpu", "forced for the test"))
    with Dataset.open(ds7) as ds:
        eager_run = tag_images(ds.manifest, base)
        eager = load_scores(ds.manifest, key)
        assert graphs == []  # the eager tagger compiles nothing
        run = tag_images(ds.manifest, dataclasses.replace(base, compile=True))
        compiled = load_scores(ds.manifest, key)
    assert eager_run.inferred == run.inferred == 7 and run.batch_size == 3
    assert ("torchvision on cpu (7)" in run.decode) == (decode == "feed")
    # one graph, for the warmed batch of 3 (the model's input is NCHW float at 32 x 32); the last batch of 1
    # was padded to 3, so nothing compiled while tagging
    assert graphs == [(3, 3, 32, 32)], graphs
    assert wd14.load_tagger(str(timm_dir), "cpu", "torch", compile=True).recompiles == 0
    assert not any("compiled" in n for n in run.notices), run.notices
    assert "compiled" in run.runtime
    assert _worst(eager, compiled) <= 2e-4  # stored scores are rounded to 4 places
    # where the loop waited (decode, model, store) is part of the tagging time, model loading left out
    assert set(run.waits) == {"decode", "model", "store"} and min(run.waits.values()) >= 0
    assert sum(run.waits.values()) <= run.seconds - run.load_seconds + 0.01


def test_compiled_tagger_pads_splits_and_reports_a_recompile(timm_dir, graphs):  # noqa: F811
    tg = wd14.load_tagger(str(timm_dir), "cpu", "torch", compile=True)
    eager = wd14.load_tagger(str(timm_dir), "cpu", "torch")
    assert tg.recompiles == -1  # not warmed yet
    assert tg.warm(4) >= 0.0 and graphs == [(4, 3, 32, 32)] and tg.recompiles == 0
    assert tg.warm(4) == 0.0  # warmed already: nothing to do
    rng = np.random.default_rng(1)
    for n in (4, 1, 3, 9):  # smaller batches padded, a bigger one run as 4 + 4 + 1 (padded)
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        got, want = tg.predict(x), eager.predict(x)
        assert got.shape == (n, len(tiny_wd14.TAGS))
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(graphs) == 1 and tg.recompiles == 0
    with torch.inference_mode():  # a shape the warm-up never saw reaches the compiled net: counted, reported
        tg.net(torch.zeros((2, 3, 32, 32)))
    tg.check_recompiles()
    assert tg.recompiles == 1 and len(graphs) == 2
    assert tg.notices == [
        "torch.compile compiled 1 more graph(s) while tagging (TORCH_LOGS=recompiles says why)"
    ]


def test_warm_leaves_no_compile_workers_behind(timm_dir, graphs, monkeypatch):  # noqa: F811
    """inductor's compile-worker pool would otherwise boot, or idle, through the tagging (16 processes on 16
    cores); the tagger turns its eager start off and shuts it down after the warm-up compile."""
    import os

    psutil = pytest.importorskip("psutil")
    from torch._inductor import async_compile

    def kids() -> set[int]:
        return {p.pid for p in psutil.Process().children(recursive=True)}

    monkeypatch.delenv("TORCH_WARM_POOL", raising=False)
    # other tests in this process may have left helpers of their own: not this test's business
    before = kids()
    tg = wd14.load_tagger(str(timm_dir), "cpu", "torch", compile=True)
    assert os.environ["TORCH_WARM_POOL"] == "0"
    async_compile.AsyncCompile.process_pool()  # the pool a Triton compile on CUDA starts
    pool = kids() - before
    assert pool
    tg.warm(4)
    assert len(graphs) == 1 and not (kids() & pool)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_on_cuda_with_nvjpeg_feed_compiles_once_and_matches_eager(ds7, timm_dir):  # noqa: F811
    """The real thing: inductor on CUDA, the nvJPEG feed on its streams, the model on its own stream."""
    base = TagConfig(model=str(timm_dir), backend="torch", device="cuda", batch_size=3, workers=2, force=True)
    key = model_key(str(timm_dir))
    with Dataset.open(ds7) as ds:
        eager_run = tag_images(ds.manifest, base)
        eager = load_scores(ds.manifest, key)
        run = tag_images(ds.manifest, dataclasses.replace(base, compile=True))
        compiled = load_scores(ds.manifest, key)
    assert eager_run.gpu_decoded == run.gpu_decoded == 7 and run.inferred == 7
    assert wd14.load_tagger(str(timm_dir), "cuda", "torch", compile=True).recompiles == 0, run.notices
    assert _worst(eager, compiled) <= 0.01  # bf16 autocast both ways; inductor fuses differently
