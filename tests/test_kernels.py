"""trainer_bridge.kernels: norms in the input dtype under autocast, and the SDPA backend switch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer_bridge.kernels import bf16_norms, set_attention_backend


def test_bf16_norms_keep_bf16_and_match_fp32_norms():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(), nn.Conv2d(32, 8, 1))
    net = net.to(torch.bfloat16)
    ln = nn.LayerNorm(8).to(torch.bfloat16)
    x = torch.randn(2, 4, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = ln(net(x).permute(0, 2, 3, 1))
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    assert bf16_norms(net) == 1 and bf16_norms(ln) == 1
    assert net.state_dict().keys() == sd.keys()  # the checkpoint does not change
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ln(net(x).permute(0, 2, 3, 1))
        inner = net[1](net[0](x))
    assert inner.dtype == torch.bfloat16  # (CUDA autocast would give fp32 here without the switch)
    rel = (out.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 1e-2, rel  # the same normalisation, rounded to bf16 once more
    # outside autocast and on fp32 inputs the switched modules are the plain ones
    y = torch.randn(2, 32, 4, 4)
    g = nn.GroupNorm(8, 32)
    bf16_norms(g)
    assert torch.equal(g(y), nn.functional.group_norm(y, 8, g.weight, g.bias, g.eps))


def test_bf16_norms_pass_gradients_to_lora():
    from trainer_bridge.lora import LoRAModule

    torch.manual_seed(0)
    base = nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1)).to(torch.bfloat16)
    base.requires_grad_(False)
    lora = LoRAModule(base[2], 4, 4)
    nn.init.normal_(lora.lora_up.weight)
    base[2] = lora
    bf16_norms(base)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = base(torch.randn(2, 16, 8, 8, dtype=torch.bfloat16)).float().pow(2).mean()
    loss.backward()
    assert lora.lora_down.weight.grad is not None and lora.lora_down.weight.grad.abs().sum() > 0


def test_attention_backend_names():
    try:
        for name in ("flash", "cudnn", "auto"):
            assert set_attention_backend(name) == name
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        with pytest.raises(ValueError, match="one of auto, flash, efficient, cudnn"):
            set_attention_backend("xformers")
    finally:
        set_attention_backend("auto")


def test_channels_last_unet_matches_and_stays_channels_last():
    from diffusers import UNet2DConditionModel

    from trainer_bridge.kernels import channels_last

    torch.manual_seed(0)
    cfg = dict(sample_size=8, cross_attention_dim=32, attention_head_dim=4, block_out_channels=(32, 64),
               norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))  # fmt: skip
    unet = UNet2DConditionModel(**cfg).eval()
    x, t, h = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 7, 32)
    with torch.no_grad():
        ref = unet(x, t, h).sample
    seen = []
    assert channels_last(unet) == 6  # down 1 x 2 layers, mid 1, up 1 x 3 layers
    blk = unet.down_blocks[0].attentions[0]
    blk.register_forward_hook(
        lambda m, i, o: seen.append(o[0].is_contiguous(memory_format=torch.channels_last))
    )
    with torch.no_grad():
        out = unet(x.to(memory_format=torch.channels_last), t, h).sample
    assert seen == [True]  # the block's output was not copied back to NCHW
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_train_config_norms_option():
    from trainer_bridge.config import TrainConfig, TrainError

    assert TrainConfig().norms == "auto"
    assert TrainConfig(norms="fp32").norms == "fp32"
    with pytest.raises(TrainError, match="norms must be 'auto' or 'fp32'"):
        TrainConfig(norms="bf16")


def test_summary_table_says_how_the_steps_ran():
    from curate.commands.train import _step_kind

    assert _step_kind({"step": "graph", "norms": "bf16", "compile": False}) == "CUDA graphs, bf16 norms"
    assert _step_kind({"step": "graph", "norms": "fp32", "compile": "regional"}) == (
        "CUDA graphs, fp32 norms, regional compile"
    )
    assert _step_kind({"step": "plain", "norms": "none", "compile": False}) == "plain"
