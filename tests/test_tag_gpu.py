"""GPU runs of the captioner (bf16/fp16 on CUDA) and the tagger (whatever onnxruntime providers exist)."""

from __future__ import annotations

from difflib import SequenceMatcher

import numpy as np
import pytest
from PIL import Image

import tests.tiny_blip as tiny_blip
import tests.tiny_wd14 as tiny_wd14

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture()
def ds_path(tmp_path):
    from curate import Dataset

    root = tmp_path / "ds"
    root.mkdir()
    for i in range(6):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 50, 3), dtype=np.uint8)).save(root / f"g{i}.png")
    with Dataset.open(root) as ds:
        ds.scan()
    return root


def test_blip_on_cuda_half_precision_batched_equals_unbatched(ds_path, tmp_path):
    from curate import Dataset
    from curate.models.blip import load_blip
    from curate.stages.caption import load_nl_captions

    model = tiny_blip.build(tmp_path / "blip")
    _, net, dtype = load_blip(str(model), "cuda", "auto")
    assert next(net.parameters()).is_cuda and dtype in (torch.bfloat16, torch.float16)
    with Dataset.open(ds_path) as ds:
        out = ds.caption(
            model=str(model), device="cuda", dtype="fp32", batch_size=6, num_beams=1, max_length=10
        )
        assert out.run.generated == 6
        batched = load_nl_captions(ds.manifest)
        ds.caption(
            model=str(model),
            device="cuda",
            dtype="fp32",
            batch_size=1,
            num_beams=1,
            max_length=10,
            force=True,
        )
        unbatched = load_nl_captions(ds.manifest)
        # Not bitwise: on CUDA a batch of 6 and a batch of 1 run different GEMM/conv kernels (other reduction
        # orders, TF32 convs), and this random tiny BLIP has near-flat logits, so a near-tie can flip a greedy
        # token even in fp32 (the H200 run: 'grass with with with with with' vs the same + 'with with'). Batching
        # must not mix images up or change captions wholesale: most are identical, all share most tokens.
        same = sum(batched[k] == unbatched[k] for k in batched)
        sim = [SequenceMatcher(None, batched[k].split(), unbatched[k].split()).ratio() for k in batched]
        print(f"fp32 batched vs unbatched: {same} of 6 identical, token similarity {min(sim):.2f} at worst")
        assert batched.keys() == unbatched.keys() and same >= 4 and min(sim) >= 0.6
        half = ds.caption(
            model=str(model), device="cuda", batch_size=6, num_beams=3, max_length=10, force=True
        )
        assert half.run.generated == 6 and all(
            isinstance(t, str) for t in load_nl_captions(ds.manifest).values()
        )


def test_tagger_auto_device_matches_reference(ds_path, tmp_path):
    from curate import Dataset
    from curate.models import wd14
    from curate.stages.tag import load_scores, model_key

    model = tiny_wd14.build(tmp_path / "tagger")
    with Dataset.open(ds_path) as ds:
        ds.tag(model=str(model), device="auto")
        tagger = wd14.load_tagger(str(model), "auto")
        print("onnxruntime providers:", tagger.session.get_providers())
        stored = load_scores(ds.manifest, model_key(str(model)))
        names = [n for n, _ in tiny_wd14.TAGS]
        for rec in ds.kept():
            x = wd14.preprocess(Image.open(ds_path / rec.path).convert("RGB"), tiny_wd14.SIZE)[None]
            ref = tiny_wd14.reference_probs(x)[0]
            for n, p in stored[rec.sha256].items():
                assert abs(p - ref[names.index(n)]) < 1e-3


def test_torch_backend_on_cuda_matches_cpu_onnx(ds_path, tmp_path):
    """auto picks torch on a GPU for a timm folder; bf16 autocast scores stay close to the fp32 ONNX ones."""
    from curate import Dataset
    from curate.models import wd14
    from curate.models.wd_torch import TorchTagger
    from curate.stages.tag import load_scores, model_key

    model = tiny_wd14.build_timm(tmp_path / "v3")
    wd14._CACHE.clear()
    with Dataset.open(ds_path) as ds:
        run = ds.tag(model=str(model)).run
        assert run.backend == "torch" and run.device.startswith("cuda") and run.inferred == 6, run
        assert "autocast" in run.runtime and run.batch_size >= 8
        on_gpu = load_scores(ds.manifest, model_key(str(model)))
        ds.tag(model=str(model), backend="onnx", device="cpu", force=True)
        on_cpu = load_scores(ds.manifest, model_key(str(model)))
    worst = max(abs(p - on_cpu[sha].get(n, 0.0)) for sha, sc in on_gpu.items() for n, p in sc.items())
    print("bf16 vs fp32 onnx, worst score difference:", worst)
    assert worst < 0.03
    files = wd14.locate(str(model))
    fp32 = TorchTagger(files, device="cuda", dtype="fp32")
    onnx_t = wd14.load_tagger(str(model), "cpu", "onnx")
    imgs = [Image.open(p) for p in sorted(ds_path.glob("*.png"))]
    x = np.stack([fp32.preprocess_image(im) for im in imgs])
    diff = np.abs(fp32.predict(x) - onnx_t.predict(x[..., ::-1].astype(np.float32))).max()
    print("fp32 cuda vs onnx cpu:", diff)
    assert diff < 2e-3  # cuDNN may run the patch conv in TF32
    bf16 = TorchTagger(files, device="cuda", dtype="bf16")
    assert bf16.dtype == "bf16 weights" and next(bf16.net.parameters()).dtype == torch.bfloat16
    diff = np.abs(bf16.predict(x) - onnx_t.predict(x[..., ::-1].astype(np.float32))).max()
    print("bf16 weights vs onnx cpu:", diff)
    assert diff < 0.05


def test_cli_explain_device_names_cuda(ds_path, tmp_path):
    import json

    from typer.testing import CliRunner

    from curate.cli import app
    from curate.models import wd14

    model = tiny_wd14.build_timm(tmp_path / "v3")
    wd14._CACHE.clear()
    res = CliRunner().invoke(app, ["tag", str(ds_path), "--model", str(model), "--explain-device", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    print(d)
    assert (
        d["backend"] == "torch"
        and d["device"].startswith("cuda")
        and torch.cuda.get_device_name(0) in d["runtime"]
    )
