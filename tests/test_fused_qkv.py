"""The fused q/k/v LoRA down-projection (trainer_bridge/fused_qkv.py) computes what the three LoRAs compute."""

from __future__ import annotations

import pytest
import torch

from bench.compile_time import TINY


def _unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    from trainer_bridge.lora import inject_unet, lora_parameters

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY).requires_grad_(False)
    mods = inject_unet(unet, 4, 2)
    for m in mods:
        torch.nn.init.normal_(m.lora_up.weight, std=0.05)  # off zero: lora_down gets a gradient too
    params = lora_parameters(mods)
    for p in params:
        p.requires_grad_(True)
    return unet.train(), params


def _loss_and_grads(unet, params, x, t, h):
    loss = unet(x, t, h).sample.square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return loss.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_matches_separate_loras(dtype):
    """Same weights, same input: loss and every LoRA gradient agree; only the 6 self-attentions are fused."""
    from trainer_bridge.fused_qkv import FusedQKVLoRAProcessor, fuse_qkv_lora

    unet, params = _unet()
    gen = torch.Generator().manual_seed(1)
    x, h = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 8, 32, generator=gen)
    t = torch.tensor([10, 900])
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        want, want_g = _loss_and_grads(unet, params, x, t, h)
        assert fuse_qkv_lora(unet) == 6  # attn1 of 2 down + 1 mid + 3 up transformer blocks
        assert fuse_qkv_lora(unet) == 0  # already fused
        fused = [
            m for m in unet.modules() if isinstance(getattr(m, "processor", None), FusedQKVLoRAProcessor)
        ]
        assert all(not m.is_cross_attention for m in fused)
        got, got_g = _loss_and_grads(unet, params, x, t, h)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    assert want_g[0].abs().max() > 0 and want_g[1].abs().max() > 0  # real gradients for down and up
    torch.testing.assert_close(got, want, **tol)
    for g, w in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g, w, **tol)
