"""GPU: latents cached in batches on the device equal the one-at-a-time CPU path; a CUDA `curate train` writes and
reuses both caches and reports its timings; the e2e bench's real-size SD1.5 runs a short training."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.trainer_fixtures import _vae, make_dataset, tiny_sd15_pipeline, tiny_sdxl_pipeline
from trainer_bridge import TrainConfig, train
from trainer_bridge import data as D

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_batched_latents_on_cuda_equal_cpu_one_at_a_time(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rng = np.random.default_rng(0)
    items = []
    for i in range(9):
        p = tmp_path / f"{i}.png"
        w, h = ((64, 64), (96, 64), (64, 96))[i % 3]
        Image.fromarray(rng.uniform(0, 255, (5, 5, 3)).astype(np.uint8)).resize((w, h), Image.BILINEAR).save(
            p
        )
        items.append(D.Item(p, "", D.Subset(tmp_path), (w, h), ((64, 64), (80, 48), (48, 80))[i % 3]))
    flips = [i % 2 == 0 for i in range(9)]
    vae = _vae(1).eval()
    ref = D.encode_latents(items, vae, "cpu", None, "v", flips, batch_size=1)
    got = D.encode_latents(
        items, vae.to("cuda"), torch.device("cuda"), tmp_path / "c", "v", flips, batch_size=4
    )
    for (a, af, ac), (b, bf, bc) in zip(got, ref, strict=True):
        assert a.device.type == "cpu" and ac == bc
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
        if bf is not None:
            torch.testing.assert_close(af, bf, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cuda_train_writes_and_reuses_both_caches(family, tmp_path):
    (tiny_sdxl_pipeline if family == "sdxl" else tiny_sd15_pipeline)(tmp_path / "tok").save_pretrained(
        tmp_path / "m"
    )
    data = make_dataset(tmp_path / "ds", n=8)
    cfg = TrainConfig(base=str(tmp_path / "m"), data=str(data), output_dir=str(tmp_path / "o"), resolution=64,
                      min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16, batch_size=2, network_dim=4,
                      network_alpha=4, epochs=4, log_every_n_steps=2, mixed_precision="bf16")  # fmt: skip
    one = train(cfg).timings
    # 8 train + 2 val images; captions "sks, photo, tag0, red", "... tag1, red", "sks, photo" (val) and ""
    assert one["latents_encoded"] == 10 and one["te_encoded"] == 4
    two = train(cfg).timings
    assert two["latents_encoded"] == 0 and two["te_encoded"] == 0 and two["te_cached"] == one["te_encoded"]
    assert two["steady_img_s"] and two["steady_img_s"] > 0 and two["total_s"] > two["train_s"]
    assert len(list((tmp_path / "o" / "cache" / "te").glob("*.safetensors"))) == one["te_encoded"]


def test_e2e_bench_real_size_sd15_short(tmp_path):
    """Real-size random SD1.5, 16 images, 40 steps: the script's JSON lines, and a ratio to the bench step."""
    spec = importlib.util.spec_from_file_location(
        "e2e_train", Path(__file__).parents[1] / "bench" / "e2e_train.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    head, run, summary = bench.main(["--images", "16", "--steps", "40", "--workdir", str(tmp_path)])
    assert run["latents_encoded"] == 16 and run["te_encoded"] == 17 and run["steps"] == 40
    assert run["steady_img_s"] > 0 and summary["bench_step_img_s"] > 0 and summary["ratio"] > 0
