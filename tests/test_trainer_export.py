"""The exported LoRA file: kohya key names, loads unmodified in diffusers with the predicted effect, round-trips."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.trainer_fixtures import tiny_sd15_pipeline, tiny_sdxl_pipeline
from trainer_bridge import lora as L
from trainer_bridge.export import load_lora, lora_info, model_hashes, save_lora


def _randomise(mods: list[L.LoRAModule], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in mods:
            m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape, generator=g) * 0.2)
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.2)


@torch.no_grad()
def _merged(model: torch.nn.Module, mods: list[L.LoRAModule]) -> torch.nn.Module:
    """A copy of the base model with every LoRA delta added into the base weights (our own prediction)."""
    merged = copy.deepcopy(model)
    by_name = {m.kohya_name: m for m in mods}
    for mod in merged.modules():
        if isinstance(mod, L.LoRAModule):
            mod.base_layer.weight += by_name[mod.kohya_name].delta_weight()
            mod.lora_up.weight.zero_()
    return merged


def _unet_inputs(unet, sdxl: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    h = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if sdxl:
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 32, generator=g),
            "time_ids": torch.rand(2, 6, generator=g) * 64,
        }
    return x, t, h, kw


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lora_file_loads_in_diffusers_with_predicted_effect(family, tmp_path):
    sdxl = family == "sdxl"
    pipe = (tiny_sdxl_pipeline if sdxl else tiny_sd15_pipeline)(tmp_path / "tok")
    tes = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else [pipe.text_encoder]
    ours_unet, ours_tes = copy.deepcopy(pipe.unet).eval(), [copy.deepcopy(te) for te in tes]
    mods = L.inject_unet(ours_unet, rank=4, alpha=2, ff=True, conv_dim=4, conv_alpha=8, sdxl=sdxl)
    prefixes = ["lora_te1", "lora_te2"] if sdxl else ["lora_te"]
    for te, prefix in zip(ours_tes, prefixes, strict=True):
        mods += L.inject_text_encoder(te, prefix, rank=4, alpha=4)
    _randomise(mods, seed=1)
    path = save_lora(tmp_path / "x.safetensors", L.lora_state_dict(mods, torch.float32),
                     {"ss_network_dim": 4, "ss_network_alpha": "2", "ss_network_module": "networks.lora"})  # fmt: skip

    # kohya's naming: diffusers module paths for SD1.5; sgm/LDM block names for SDXL
    tensors, meta = load_lora(path)
    if sdxl:
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
        assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0.lora_up.weight" in tensors
        assert "lora_unet_output_blocks_2_1_transformer_blocks_0_ff_net_0_proj.alpha" in tensors
        assert (
            "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in tensors
        )  # down_blocks.0.resnets.0.conv1
        assert (
            "lora_unet_input_blocks_3_0_op.lora_down.weight" in tensors
        )  # down_blocks.0.downsamplers.0.conv
        assert "lora_unet_output_blocks_2_2_conv.lora_down.weight" in tensors  # up_blocks.0.upsamplers.0.conv
        assert "lora_unet_output_blocks_0_0_skip_connection.lora_down.weight" in tensors
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
        assert "lora_te2_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in tensors
        assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in tensors)
    else:
        assert (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
        )
        assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in tensors
        assert "lora_unet_up_blocks_1_attentions_2_proj_out.alpha" in tensors
        assert "lora_unet_down_blocks_0_resnets_1_conv2.lora_down.weight" in tensors
        assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_down.weight" in tensors
    assert tensors[
        "lora_unet_"
        + ("input_blocks_1_0_in_layers_2" if sdxl else "down_blocks_0_resnets_0_conv1")
        + ".lora_down.weight"
    ].shape == (4, 32, 3, 3)
    assert float(tensors[next(k for k in tensors if k.endswith("attn1_to_q.alpha"))]) == 2.0
    assert (
        float(
            tensors[next(k for k in tensors if k.endswith("conv1.alpha") or k.endswith("in_layers_2.alpha"))]
        )
        == 8.0
    )
    assert meta["ss_network_dim"] == "4" and meta["sshs_model_hash"] == model_hashes(tensors, meta)[0]

    # our own loader round-trips exactly
    fresh_unet = copy.deepcopy(pipe.unet)
    fresh = L.inject_unet(fresh_unet, rank=4, alpha=1, ff=True, conv_dim=4, conv_alpha=1, sdxl=sdxl)
    fresh_tes = [copy.deepcopy(te) for te in tes]
    for te, prefix in zip(fresh_tes, prefixes, strict=True):
        fresh += L.inject_text_encoder(te, prefix, rank=4, alpha=1)
    L.load_lora_state_dict(fresh, tensors)
    assert L.lora_state_dict(fresh, torch.float32).keys() == tensors.keys()
    for k, v in L.lora_state_dict(fresh, torch.float32).items():
        assert torch.equal(v, tensors[k]), k

    # diffusers loads the file unmodified; its UNet / text encoder outputs equal our merged-weight prediction
    x, t, h, kw = _unet_inputs(pipe.unet, sdxl)
    with torch.no_grad():
        before = pipe.unet(x, t, h, **kw).sample
        predicted = _merged(ours_unet, mods).eval()(x, t, h, **kw).sample
        ids = pipe.tokenizer(
            ["a photo of sks"], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        te_before = [te(ids)[0] for te in tes]
        te_pred = [_merged(te, mods)(ids)[0] for te in ours_tes]
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        after = pipe.unet(x, t, h, **kw).sample
        te_after = [te(ids)[0] for te in tes]
    change = (predicted - before).norm() / before.norm()
    assert change > 0.05, "the LoRA should visibly change the UNet output"
    assert (after - predicted).norm() / (predicted - before).norm() < 1e-3
    for b, p, a in zip(te_before, te_pred, te_after, strict=True):
        assert (p - b).norm() / b.norm() > 0.01
        assert (a - p).norm() / (p - b).norm() < 1e-3
    # and diffusers' own scale=0 switch returns the base output
    pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[0.0] * len(pipe.get_active_adapters()))
    with torch.no_grad():
        assert torch.allclose(pipe.unet(x, t, h, **kw).sample, before, atol=1e-5)


def test_sgm_names_for_sdxl_blocks():
    n = 2  # SDXL: layers_per_block = 2
    cases = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0": "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
        "mid_block.attentions.0.transformer_blocks.3.attn1.to_k": "lora_unet_middle_block_1_transformer_blocks_3_attn1_to_k",
        "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_v": "lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_v",
        "up_blocks.1.attentions.0.proj_in": "lora_unet_output_blocks_3_1_proj_in",
        "down_blocks.0.resnets.1.conv2": "lora_unet_input_blocks_2_0_out_layers_3",
        "mid_block.resnets.1.conv1": "lora_unet_middle_block_2_in_layers_2",
        "down_blocks.1.downsamplers.0.conv": "lora_unet_input_blocks_6_0_op",
        "up_blocks.1.upsamplers.0.conv": "lora_unet_output_blocks_5_2_conv",
        "up_blocks.2.resnets.2.conv_shortcut": "lora_unet_output_blocks_8_0_skip_connection",
    }
    for path, want in cases.items():
        assert L.kohya_name("lora_unet", path, n) == want


def test_lora_info_reports_metadata(tmp_path):
    mod = L.LoRAModule(torch.nn.Linear(8, 8), rank=2, alpha=1)
    mod.kohya_name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    meta = {"ss_network_dim": 2, "ss_network_alpha": "1", "ss_base_model_version": "sd_v1", "ss_unet_lr": 0.0001,
            "ss_tag_frequency": {"2_subject": {"sks": 4, "red": 3}, "1_other": {"red": 2}}}  # fmt: skip
    path = save_lora(tmp_path / "a.safetensors", L.lora_state_dict([mod]), meta)
    info = lora_info(path)
    assert (info["rank"], info["alpha"], info["base_model"], info["unet_lr"]) == (2, 1.0, "sd_v1", "0.0001")
    assert info["top_tags"] == [("red", 5), ("sks", 4)]
    assert info["unet_modules"] == 1 and info["text_encoder_modules"] == 0
    assert (
        load_lora(path)[1]["ss_tag_frequency"] == '{"2_subject": {"sks": 4, "red": 3}, "1_other": {"red": 2}}'
    )
