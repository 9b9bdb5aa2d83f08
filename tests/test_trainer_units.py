"""Fast unit tests of the trainer's parts: loss weighting, LoRA math, config, buckets, captions, optimizers."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from trainer_bridge import TrainConfig, TrainError
from trainer_bridge import data as D
from trainer_bridge import lora as L
from trainer_bridge.loss import diffusion_loss, min_snr_weight, snr
from trainer_bridge.train import build_optimizer, build_scheduler

# SD's scaled-linear schedule in float64, written out independently of diffusers
BETAS = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
ALPHAS = np.cumprod(1 - BETAS)


def test_min_snr_weights_match_closed_form():
    t = torch.tensor([0, 10, 100, 250, 500, 999])
    ac = torch.tensor(ALPHAS)
    s = snr(ac, t).numpy()
    expect_snr = ALPHAS[t.numpy()] / (1 - ALPHAS[t.numpy()])
    np.testing.assert_allclose(s, expect_snr, rtol=1e-12)
    assert s[0] == pytest.approx(1175.4, rel=1e-3) and s[-1] == pytest.approx(
        0.004682, rel=1e-3
    )  # written down
    gamma = 5.0
    w_eps = min_snr_weight(torch.tensor(s), gamma, v_prediction=False).numpy()
    w_v = min_snr_weight(torch.tensor(s), gamma, v_prediction=True).numpy()
    np.testing.assert_allclose(w_eps, np.minimum(expect_snr, gamma) / expect_snr, rtol=1e-12)
    np.testing.assert_allclose(w_v, np.minimum(expect_snr, gamma) / (expect_snr + 1), rtol=1e-12)
    assert w_eps[-1] == 1.0 and w_eps[0] == pytest.approx(5 / 1175.4, rel=1e-3)


class _Out:
    def __init__(self, sample):
        self.sample = sample


def test_diffusion_loss_targets_and_weighting():
    """With a UNet that predicts zero, the loss is E[target^2] weighted per sample: checks noising, v target, SNR."""
    ac = torch.tensor(ALPHAS, dtype=torch.float32)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([5, 400, 990])
    seen = {}

    def zero_unet(noisy, timesteps, cond, **kw):
        seen["noisy"] = noisy
        return _Out(torch.zeros_like(noisy))

    g = torch.Generator()
    a = ac[t].view(3, 1, 1, 1)
    for v_pred in (False, True):
        got = diffusion_loss(
            zero_unet, x0, None, None, ac, g, noise=noise, timesteps=t, v_prediction=v_pred, min_snr_gamma=5.0
        )
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if v_pred else noise
        per = (target**2).mean(dim=(1, 2, 3))
        w = min_snr_weight(snr(ac, t), 5.0, v_pred)
        assert got.item() == pytest.approx((per * w).mean().item(), rel=1e-5)
        assert torch.allclose(seen["noisy"], a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_noise_options_and_timestep_range():
    ac = torch.tensor(ALPHAS, dtype=torch.float32)
    seen = {}

    def unet(noisy, timesteps, cond, **kw):
        seen["t"] = timesteps
        return _Out(torch.zeros_like(noisy))

    x0 = torch.zeros(64, 4, 16, 16)
    diffusion_loss(
        unet, x0, None, None, ac, torch.Generator().manual_seed(0), min_timestep=200, max_timestep=300
    )
    assert seen["t"].min() >= 200 and seen["t"].max() < 300
    # the loss with x0 = 0 and a zero prediction is E[noise^2]: ~1 plain, ~1 + offset^2 with a noise offset
    plain = diffusion_loss(unet, x0, None, None, ac, torch.Generator().manual_seed(0)).item()
    offset = diffusion_loss(
        unet, x0, None, None, ac, torch.Generator().manual_seed(0), noise_offset=0.5
    ).item()
    multires = diffusion_loss(unet, x0, None, None, ac, torch.Generator().manual_seed(0), multires_iterations=3,
                              multires_discount=0.5, rng=random.Random(0)).item()  # fmt: skip
    assert plain == pytest.approx(1.0, abs=0.02) and offset == pytest.approx(1.25, abs=0.1)
    assert multires == pytest.approx(1.0, abs=0.01)  # multires noise is renormalised to unit std


@pytest.mark.parametrize(
    "layer", [torch.nn.Linear(16, 24), torch.nn.Conv2d(16, 24, 3, padding=1), torch.nn.Conv2d(16, 24, 1)]
)
def test_lora_module_adds_its_dense_delta(layer):
    torch.manual_seed(0)
    m = L.LoRAModule(layer, rank=4, alpha=2.0)
    torch.nn.init.normal_(m.lora_up.weight)
    x = torch.randn(2, 16) if isinstance(layer, torch.nn.Linear) else torch.randn(2, 16, 6, 6)
    fn = (
        torch.nn.functional.linear
        if isinstance(layer, torch.nn.Linear)
        else lambda x, w: torch.nn.functional.conv2d(x, w, padding=layer.padding)
    )
    assert m.base_layer is layer  # wrapped, not copied
    assert torch.allclose(m(x) - layer(x), fn(x, m.delta_weight()), atol=1e-5)
    assert m.scale == 0.5


def test_scale_weight_norms_caps_each_module():
    torch.manual_seed(0)
    mods = [L.LoRAModule(torch.nn.Linear(32, 32), 4, 4) for _ in range(3)]
    for m, s in zip(mods, (0.01, 1.0, 3.0), strict=True):
        torch.nn.init.normal_(m.lora_up.weight, std=s)
    before = [m.delta_weight().norm().item() for m in mods]
    n_scaled, _ = L.scale_weight_norms(mods, max_norm=1.0)
    after = [m.delta_weight().norm().item() for m in mods]
    assert before[0] < 1.0 and before[2] > 1.0
    assert int(n_scaled) == sum(b > 1.0 for b in before)
    assert after[0] == pytest.approx(before[0]) and max(after) == pytest.approx(1.0, rel=1e-4)


def test_config_from_toml_with_overrides(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text(
        '[train]\nmodel_family = "sdxl"\nunet_lr = 1\nnetwork_dim = 8\nsample_prompts = ["a cat"]\n[other]\nx = 1\n'
    )
    cfg = TrainConfig.from_toml(p, ["network_dim=16", "optimizer=prodigy", "flip_aug=true"])
    assert (cfg.model_family, cfg.unet_lr, cfg.network_dim, cfg.optimizer, cfg.flip_aug) == (
        "sdxl",
        1.0,
        16,
        "prodigy",
        True,
    )
    assert cfg.sample_prompts == ["a cat"] and isinstance(cfg.unet_lr, float)
    with pytest.raises(TrainError, match="unknown training option"):
        cfg.override({"learning_rate": 1})
    with pytest.raises(TrainError, match="network_dim must be int"):
        cfg.override(["network_dim=big"])
    with pytest.raises(TrainError, match="model_family"):
        cfg.override({"model_family": "sd3"})
    with pytest.raises(TrainError, match="config file not found"):
        TrainConfig.from_toml(tmp_path / "missing.toml")


def test_bucket_sampler_is_seeded_and_single_bucket():
    buckets = [(64, 64)] * 5 + [(80, 48)] * 3
    repeats = [2] * 5 + [1] * 3
    s = D.BucketBatchSampler(buckets, repeats, batch_size=2, seed=3)
    e0, e0b, e1 = s.epoch(0), s.epoch(0), s.epoch(1)
    assert e0 == e0b and e0 != e1
    for batches in (e0, e1):
        assert all(len({buckets[i] for i in b}) == 1 for b in batches)
        flat = sorted(i for b in batches for i in b)
        assert flat == sorted([i for i in range(5) for _ in range(2)] + [5, 6, 7])
    assert len(s) == 5 + 2


def test_buckets_and_center_crop(tmp_path):
    make_buckets, assign_bucket = D.bucket_fns()
    buckets = make_buckets(64, 32, 128, 16)
    assert (64, 64) in buckets and all(w * h <= 64 * 64 and w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    assert assign_bucket(96, 64, buckets) == (80, 48)
    arr = np.zeros((64, 96, 3), np.uint8)
    arr[:3] = (
        255  # a white band on the top edge: cropped away (96x64 -> cover 80x53 -> crop 2 rows off the top)
    )
    Image.fromarray(arr).save(tmp_path / "a.png")
    x, (top, left) = D.load_image(tmp_path / "a.png", (80, 48))
    assert tuple(x.shape) == (3, 48, 80) and (top, left) == (2, 0)
    assert x[:, 0].max() < 0.6 and x[:, -1].max() == -1.0 and x.min() == -1.0
    xf, _ = D.load_image(tmp_path / "a.png", (80, 48), flip=True)
    assert torch.equal(xf, x.flip(-1))


def test_caption_shuffle_keep_tokens_and_dropout():
    rng = random.Random(0)
    cap = "sks, photo, a, b, c, d, e"
    outs = {D.process_caption(cap, 2, True, 0.0, rng) for _ in range(20)}
    assert len(outs) > 5 and all(o.startswith("sks, photo, ") for o in outs)
    assert all(sorted(o.split(", ")) == sorted(cap.split(", ")) for o in outs)
    assert D.process_caption(cap, 2, True, 1.0, rng) == ""
    assert D.process_caption(cap, 0, False, 0.0, rng) == cap


def test_kohya_dataset_toml(tmp_path):
    img = tmp_path / "imgs"
    img.mkdir()
    Image.new("RGB", (64, 64)).save(img / "x.png")
    (img / "x.caption").write_text("sks")
    p = tmp_path / "ds.toml"
    p.write_text(
        "[general]\nshuffle_caption = true\nkeep_tokens = 1\n[[datasets]]\nresolution = 768\nbatch_size = 4\n"
        "enable_bucket = true\nmin_bucket_reso = 320\nmax_bucket_reso = 1280\nbucket_reso_steps = 64\n"
        '[[datasets.subsets]]\nimage_dir = "imgs"\nnum_repeats = 3\ncaption_extension = ".caption"\nflip_aug = true\n'
    )
    spec = D.read_dataset(TrainConfig(data=str(p)))
    assert (spec.resolution, spec.batch_size, spec.min_bucket_reso, spec.max_bucket_reso) == (
        768,
        4,
        320,
        1280,
    )
    (sub,) = spec.subsets
    assert (sub.image_dir, sub.num_repeats, sub.keep_tokens, sub.shuffle_caption, sub.flip_aug) == (
        img,
        3,
        1,
        True,
        True,
    )
    (item,) = D.list_items(spec.subsets, spec)
    assert item.caption == "sks" and item.bucket == (768, 768)


def test_optimizers_and_schedulers():
    for name in ("adamw", "prodigy", "adafactor"):
        p = torch.nn.Parameter(torch.ones(4))
        lr = 1.0 if name == "prodigy" else 1e-3  # prodigy's lr is a multiplier on its own estimate
        opt = build_optimizer(name, [{"params": [p], "lr": lr}], lr, 0.0, "cpu")
        p.grad = torch.ones(4)
        before = p.detach().clone()
        opt.step()
        assert not torch.equal(before, p.detach()), name
    with pytest.raises(TrainError, match="adamw8bit needs a CUDA GPU"):
        build_optimizer("adamw8bit", [{"params": [p]}], 1e-3, 0.0, "cpu")
    with pytest.raises(TrainError, match="unknown optimizer 'lion'"):
        build_optimizer("lion", [{"params": [p]}], 1e-3, 0.0, "cpu")
    lrs = {}
    for sched in (
        "constant",
        "constant_with_warmup",
        "cosine",
        "cosine_with_restarts",
        "linear",
        "polynomial",
    ):
        opt = torch.optim.SGD([p], lr=1.0)
        s = build_scheduler(TrainConfig(lr_scheduler=sched, lr_warmup_steps=2), opt, total_steps=10)
        seq = []
        for _ in range(10):
            seq.append(s.get_last_lr()[0])
            opt.step()
            s.step()
        lrs[sched] = seq
    assert lrs["constant"] == [1.0] * 10
    assert lrs["constant_with_warmup"][:3] == [0.0, 0.5, 1.0] and lrs["linear"][-1] == pytest.approx(0.125)
    assert lrs["cosine"][2] == 1.0 and lrs["cosine"][-1] < 0.05
    with pytest.raises(TrainError, match="unknown lr_scheduler"):
        build_scheduler(TrainConfig(lr_scheduler="warp"), torch.optim.SGD([p], lr=1.0), 10)


def test_example_plan_loads():
    from pathlib import Path

    cfg = TrainConfig.from_toml(Path(__file__).parents[1] / "examples" / "train_lora.toml")
    assert (cfg.model_family, cfg.network_dim, cfg.network_alpha, cfg.lr_scheduler) == (
        "sd15",
        32,
        16.0,
        "cosine",
    )
