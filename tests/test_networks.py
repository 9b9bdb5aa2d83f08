"""LyCORIS networks (LoHa, LoKr, DoRA, full, norms): train on tiny models, save in kohya keys, reload, load everywhere."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.keymaps.loaders import ignored_keys, module_names
from tests.test_trainer_train import tiny_config
from tests.trainer_fixtures import dataset, sd15_dir, sdxl_dir, tiny_sd15_pipeline  # noqa: F401
from trainer_bridge import TrainConfig, TrainError, train
from trainer_bridge import lycoris_net as LY
from trainer_bridge.export import load_lora, lora_info, save_lora

NETWORKS = ["loha", "lokr", "dora", "full"]


def _unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    h = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), h).sample


def _randomised_net(pipe, cfg: TrainConfig, seed: int):
    unet, te = copy.deepcopy(pipe.unet).eval(), copy.deepcopy(pipe.text_encoder).eval()
    net = LY.build(unet, [te], cfg, sdxl=False, train_te=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net, unet, te


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_sd15_pipeline(tmp_path_factory.mktemp("tok"))


@pytest.mark.slow
@pytest.mark.parametrize("network", [*NETWORKS, "locon-norms"])
def test_saved_file_reloads_and_loaders_ignore_no_key(network, pipe, tmp_path):
    kw = {"network": "locon", "train_norm": True} if network == "locon-norms" else {"network": network}
    cfg = TrainConfig(
        network_dim=4, network_alpha=2, conv_dim=4, conv_alpha=4, use_tucker=network == "loha", **kw
    )
    net, unet, _ = _randomised_net(pipe, cfg, seed=1)
    sd = net.state_dict(torch.float32)
    path = save_lora(tmp_path / "n.safetensors", sd, {"ss_network_module": "lycoris.kohya",
                                                       "ss_network_args": LY.network_args(cfg)})  # fmt: skip
    tensors, meta = load_lora(path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == {"dora": "lora", "locon-norms": "locon"}.get(
        network, network
    )
    # kohya names; the tensors lycoris writes for this algorithm
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in {
        k.split(".")[0] for k in tensors
    }
    want = {
        "loha": "hada_w1_a",
        "lokr": "lokr_w1",
        "dora": "dora_scale",
        "full": "diff",
        "locon-norms": "w_norm",
    }
    assert any(k.endswith("." + want[network]) for k in tensors), sorted(tensors)[:5]
    # reload into a fresh model: same tensors, the same forward pass, and not the base model's
    fresh_unet, fresh_te = copy.deepcopy(pipe.unet).eval(), copy.deepcopy(pipe.text_encoder).eval()
    fresh = LY.build(fresh_unet, [fresh_te], cfg, sdxl=False, train_te=True)
    fresh.load_state_dict(tensors)
    base, ours, back = _unet_out(pipe.unet), _unet_out(unet), _unet_out(fresh_unet)
    assert (ours - base).norm() / base.norm() > 1e-3
    assert torch.allclose(back, ours, atol=1e-5, rtol=1e-5)
    # ComfyUI's and A1111/Forge's loaders consume every key
    for loader in ("comfyui", "a1111"):
        assert ignored_keys(tensors, module_names(loader, pipe.unet, pipe.text_encoder)) == [], loader
    # a file with a key no module has is refused, as it would be partly ignored
    with pytest.raises(KeyError):
        fresh.load_state_dict({**tensors, "lora_unet_nope.alpha": torch.tensor(1.0)})


def test_key_check_can_fail(pipe):
    """The coverage helper flags names and tensor kinds the loaders skip (so the zero above means something)."""
    names = module_names("comfyui", pipe.unet, pipe.text_encoder)
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    t = torch.zeros(1)
    assert ignored_keys({f"{good}.hada_w1_a": t, f"{good}.alpha": t}, names) == []
    assert ignored_keys({f"{good}.weird": t}, names) == [f"{good}.weird"]
    assert ignored_keys({"lora_unet_down_blocks_0_attn.lora_up.weight": t}, names) != []
    te_norm = "lora_te_text_model_encoder_layers_0_layer_norm1.w_norm"
    assert ignored_keys({te_norm: t}, names) == [te_norm]  # ComfyUI maps only the CLIP attention / MLP layers


@pytest.mark.slow
@pytest.mark.parametrize("network", NETWORKS)
def test_each_network_trains(network, sd15_dir, dataset, tmp_path):  # noqa: F811
    r = train(tiny_config(sd15_dir, dataset, tmp_path / "o", epochs=2, network=network, conv_dim=4, conv_alpha=4,
                          rank_dropout=0.1, module_dropout=0.05 if network == "loha" else 0.0, preset="attn-mlp" if network == "loha" else "",
                          unet_lr=1e-3 if network == "full" else 1e-2))  # fmt: skip
    assert r.val_losses[-1] < 0.97 * r.val_losses[0], (
        r.val_losses
    )  # fixed noise and timesteps: no batch noise
    info = lora_info(r.lora_path)
    assert info["network_module"] == "lycoris.kohya"
    args = info["network_args"]
    assert args["algo"] == ("lora" if network == "dora" else network) and args["rank_dropout"] == "0.1"
    assert args.get("dora_wd") == ("True" if network == "dora" else None)
    if network == "loha":  # attn-mlp: transformer layers only, no resnet convs
        assert args["preset"] == "attn-mlp"
        assert not any("resnets" in k for k in load_lora(r.lora_path)[0])


@pytest.mark.slow
def test_block_dims_give_each_block_its_rank(pipe):
    n = LY.n_blocks(pipe.unet)  # tiny model: 2 levels x 3 + mid + 2 x 3 = 13 (SD1.5: 25)
    assert n == 13
    dims = [4] * n
    dims[1] = 2  # IN01 = down_blocks.0.*.0
    dims[n // 2] = 8  # MID
    cfg = TrainConfig(network="loha", network_dim=4, block_dims=dims, block_alphas=[1.0] * n)
    net = LY.build(copy.deepcopy(pipe.unet), [], cfg, sdxl=False, train_te=False)
    sd = net.state_dict()
    assert sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_b"].shape[0] == 2
    assert sd["lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q.hada_w1_b"].shape[0] == 4
    assert sd["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_b"].shape[0] == 8
    assert float(sd["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]) == 1.0
    with pytest.raises(TrainError, match="block_dims has 25 values; sd15 takes 13"):
        LY.build(copy.deepcopy(pipe.unet), [], TrainConfig(network="loha", block_dims=[4] * 25), False, False)


@pytest.mark.slow
def test_sdxl_lokr_uses_sgm_names(sdxl_dir, dataset, tmp_path):  # noqa: F811
    r = train(tiny_config(sdxl_dir, dataset, tmp_path / "o", epochs=2, network="lokr", train_norm=True,
                          text_encoder_lr=1e-3))  # fmt: skip
    names = {k.split(".")[0] for k in load_lora(r.lora_path)[0]}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_input_blocks_1_0_in_layers_0" in names  # resnet norm1 (train_norm)
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    assert not any(s in n for n in names for s in ("down_blocks", "mid_block", "up_blocks", "conv_in"))


def test_bad_network_options_are_one_line_cli_errors(tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    for opt, msg in [("network=lohaa", "network must be one of"), ("preset=attn", "preset must be one of"),
                     ("rank_dropout=1.5", "rank_dropout must be in")]:  # fmt: skip
        res = CliRunner().invoke(app, ["train", str(tmp_path), "--set", opt])
        assert res.exit_code != 0 and msg in res.output, res.output
        assert "Traceback" not in res.output


def test_clip_skip_matches_diffusers_penultimate_layer(pipe):
    from trainer_bridge.data import encode_prompts

    prompts = ["a photo of sks", "red"]
    with torch.no_grad():
        last, _ = encode_prompts([pipe.tokenizer], [pipe.text_encoder], prompts, "cpu")
        ours, _ = encode_prompts([pipe.tokenizer], [pipe.text_encoder], prompts, "cpu", clip_skip=2)
        # independent: the same encoder with its last layer removed gives the penultimate layer, normed
        short = copy.deepcopy(pipe.text_encoder)
        enc = getattr(short, "text_model", short).encoder
        enc.layers = enc.layers[:-1]
        theirs = short(
            pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        )[0]
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (ours - last).norm() / last.norm() > 0.05


@pytest.mark.parametrize("network", ["loha", "lokr", "full"])
def test_diffusers_refuses_loha_lokr_and_full_files(network, pipe, tmp_path):
    """diffusers (0.42) converts kohya files with lora_down/lora_up keys only (its LoKr converters are for
    Flux2 and Z-Image): `load_lora_weights` raises on hada_* / lokr_* / diff keys. When this test fails, diffusers
    loads them: check the output against ours and update docs/networks.md."""
    cfg = TrainConfig(network=network, network_dim=4, network_alpha=2)
    net, _, _ = _randomised_net(pipe, cfg, seed=1)
    path = save_lora(
        tmp_path / "n.safetensors", net.state_dict(torch.float32), {"ss_network_module": "lycoris.kohya"}
    )
    with pytest.raises(ValueError, match="not been correctly renamed"):
        copy.deepcopy(pipe).load_lora_weights(str(path))


def test_diffusers_loads_dora_files_but_not_as_lycoris_applies_them(pipe, tmp_path):
    """DoRA files load in diffusers (dora_scale becomes peft's magnitude vector), but its UNet output is not the one
    lycoris (and so ComfyUI / A1111) computes from the same file: measured 0.80 relative to the LoRA's effect."""
    cfg = TrainConfig(network="dora", network_dim=4, network_alpha=2)
    net, unet, _ = _randomised_net(pipe, cfg, seed=1)
    path = save_lora(
        tmp_path / "n.safetensors", net.state_dict(torch.float32), {"ss_network_module": "lycoris.kohya"}
    )
    p = copy.deepcopy(pipe)
    p.load_lora_weights(str(path))
    ours, base = _unet_out(unet), _unet_out(pipe.unet)
    assert float((_unet_out(p.unet) - ours).norm() / (ours - base).norm()) > 0.1
