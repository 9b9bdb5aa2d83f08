"""GPU: a few hundred bf16 steps of SD1.5- and SDXL-sized random-init UNets with our LoRA step stay finite."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("case,steps,bs,size", [("sd15", 300, 2, 64), ("sdxl", 200, 1, 64)])
def test_bf16_lora_steps_stay_finite(case, steps, bs, size):
    """SD1.5 at 512 px, SDXL's full UNet at 512 px latents (64x64) to keep the run short."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import train_step as B

    cfg = B.SD15 if case == "sd15" else B.SDXL
    unet, fwd, opt, params = B.build(cfg, 32, channels_last=False, compile_=False)
    x, h, added = B.batch(cfg, bs, channels_last=False, size=size)
    gen = torch.Generator("cuda").manual_seed(0)
    losses = []
    for i in range(steps):
        loss = B.step(fwd, opt, params, x, h, added, gen)
        if i % 50 == 0 or i == steps - 1:
            losses.append(loss.detach())
    losses = torch.stack(losses)
    assert torch.isfinite(losses).all(), losses
    assert all(torch.isfinite(p).all() for p in params)
    assert max(p.abs().max().item() for p in params[1::2]) > 0  # lora_up moved off its zero init


def _tiny_setup(family, tmp_path):
    from tests.trainer_fixtures import make_dataset, tiny_sd15_pipeline, tiny_sdxl_pipeline

    (tiny_sdxl_pipeline if family == "sdxl" else tiny_sd15_pipeline)(tmp_path / "tok").save_pretrained(
        tmp_path / "m"
    )
    data = make_dataset(tmp_path / "ds")
    return dict(model_family=family, base=str(tmp_path / "m"), data=str(data), resolution=64, min_bucket_reso=32,
                max_bucket_reso=128, bucket_reso_steps=16, batch_size=2, network_dim=4, network_alpha=4,
                network_train_ff=True, conv_dim=4, conv_alpha=4, unet_lr=1e-2, log_every_n_steps=4,
                mixed_precision="bf16", flip_aug=True, text_encoder_lr=1e-3 if family == "sdxl" else 0.0)  # fmt: skip


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_train_end_to_end_bf16(family, tmp_path):
    """The whole loop on CUDA: bf16 autocast, fused AdamW, cached latents/embeddings, validation, samples."""
    from trainer_bridge import TrainConfig, train
    from trainer_bridge.export import load_lora

    common = _tiny_setup(family, tmp_path)
    r = train(TrainConfig(**common, output_dir=str(tmp_path / "a"), epochs=6, sample_every_n_steps=12,
                          sample_prompts=["sks"], sample_steps=2))  # fmt: skip
    assert (
        r.steps == 24
        and all(torch.isfinite(torch.tensor(r.losses)))
        and all(torch.isfinite(torch.tensor(r.val_losses)))
    )
    assert r.losses[-1] < r.losses[0], r.losses
    tensors, _ = load_lora(r.lora_path)
    assert all(torch.isfinite(v.float()).all() for v in tensors.values())
    assert (tmp_path / "a" / "sample" / "lora_000024_00.png").is_file()


@pytest.mark.slow
def test_train_compiled_bf16(tmp_path):
    """compile = true: the UNet forward goes through torch.compile (about a minute of compilation per shape)."""
    from trainer_bridge import TrainConfig, train

    # one bucket and full batches: a single training graph (+ one no-grad graph for validation)
    setup = {**_tiny_setup("sd15", tmp_path), "enable_bucket": False}
    c = train(TrainConfig(**setup, output_dir=str(tmp_path / "b"), max_steps=6, compile=True))
    assert c.steps == 6 and all(torch.isfinite(torch.tensor(c.losses)))
