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
