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
KINDS = ("lora_up.weight", "lora_down.weight", "alpha", "dora_scale")  # a DoRA module's tensors


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
    if network == "dora":  # the trained file: dora_scale per input column, as ComfyUI and A1111 read it
        scales = [v for k, v in load_lora(r.lora_path)[0].items() if k.endswith(".dora_scale")]
        assert scales and all(v.shape[0] == 1 and v.shape[1] > 1 for v in scales)
        assert args["wd_on_output"] == "False"
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


def _dora_file(pipe, tmp_path, conv_dim: int = 0):
    cfg = TrainConfig(network="dora", network_dim=4, network_alpha=2, conv_dim=conv_dim, conv_alpha=4)
    net, unet, te = _randomised_net(pipe, cfg, seed=1)
    path = save_lora(tmp_path / "d.safetensors", net.state_dict(torch.float32),
                     {"ss_network_module": "lycoris.kohya", "ss_network_args": LY.network_args(cfg)})  # fmt: skip
    return net, unet, te, path


def _merged_by(formula, tensors: dict, model, prefix: str):
    """A copy of `model` with every module of the file merged by `formula` (a UI's DoRA rule), and the names."""
    model, done = copy.deepcopy(model), []
    for path, mod in model.named_modules():
        name = prefix + ("text_model." + path if prefix == "lora_te_" and not path.startswith("text_model.")
                         else path).replace(".", "_")  # fmt: skip
        if f"{name}.dora_scale" in tensors:
            t = {k: tensors[f"{name}.{k}"] for k in KINDS}
            with torch.no_grad():
                mod.weight.copy_(formula(mod.weight.float(), t["lora_up.weight"], t["lora_down.weight"],
                                         float(t["alpha"]), t["dora_scale"]))  # fmt: skip
            done.append(path)
    return model, done


@pytest.mark.parametrize("ui", ["comfyui", "a1111"])
def test_dora_file_merges_in_comfyui_and_a1111_as_lycoris_applies_it(ui, pipe, tmp_path):
    """dora_scale is written per input column ([1, in], lycoris wd_on_out=False), the one orientation ComfyUI
    (old and new) and A1111/Forge read as lycoris computes it: every merged weight equals lycoris' own to 1e-4."""
    from tests.keymaps.loaders import a1111_dora_weight, comfyui_dora_weight

    formula = {"comfyui": comfyui_dora_weight, "a1111": a1111_dora_weight}[ui]
    net, unet, te, path = _dora_file(pipe, tmp_path, conv_dim=4)
    tensors, meta = load_lora(path)
    assert json.loads(meta["ss_network_args"])["wd_on_output"] == "False"
    worst, n = 0.0, 0
    for m in net.modules:
        name = net.names[m.lora_name]
        base = m.org_weight.float()
        assert tensors[f"{name}.dora_scale"].shape == (1, base.shape[1], *[1] * (base.dim() - 2))
        t = [tensors[f"{name}.{k}"] for k in KINDS]
        with torch.no_grad():
            ours = m.get_merged_weight()[0].reshape(base.shape)
            theirs = formula(base, t[0], t[1], float(t[2]), t[3])
        worst, n = max(worst, float((theirs - ours).abs().max() / (ours - base).abs().max())), n + 1
    # n: the linears, 1x1 and 3x3 convs of the UNet, CLIP attention / MLP
    assert n > 50 and worst < 1e-4, (n, worst)
    # the whole UNet, merged by the UI's rule, gives lycoris' output
    merged, done = _merged_by(formula, tensors, pipe.unet, "lora_unet_")
    assert any("resnets" in p and p.endswith("conv1") for p in done)
    ours, base = _unet_out(unet), _unet_out(pipe.unet)
    assert float((_unet_out(merged) - ours).norm() / (ours - base).norm()) < 1e-4


def test_dora_state_in_the_old_orientation_is_refused(pipe, tmp_path):
    net, _, _, path = _dora_file(pipe, tmp_path)
    tensors, _ = load_lora(path)
    old = {k: v.transpose(0, 1) if k.endswith(".dora_scale") else v for k, v in tensors.items()}  # [out, 1]
    with pytest.raises(ValueError, match="DoRA per output row"):
        net.load_state_dict(old)


def test_lycoris_default_dora_orientation_is_misread_by_the_uis():
    """Why curate sets wd_on_out=False: with lycoris' default (dora_scale [out, 1], per output row) ComfyUI divides
    by the norm of the original weight and A1111/Forge broadcast [out, 1] / [1, in]; both miss lycoris' weight."""
    from lycoris.modules.locon import LoConModule

    from tests.keymaps.loaders import a1111_dora_weight, comfyui_dora_weight

    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 16)
    rel = {}
    for wd_on_out in (True, False):
        m = LoConModule("x", lin, 1.0, 4, 2, weight_decompose=True, wd_on_out=wd_on_out)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape) * 0.1)
            ours = m.get_merged_weight()[0]
            up, down, ds = m.lora_up.weight, m.lora_down.weight, m.dora_scale
            for ui, f in (("comfyui", comfyui_dora_weight), ("a1111", a1111_dora_weight)):
                theirs = f(lin.weight, up, down, 2.0, ds)
                rel[ui, wd_on_out] = float((theirs - ours).norm() / (ours - lin.weight).norm())
    assert rel["comfyui", False] < 1e-5 and rel["a1111", False] < 1e-5, rel
    assert rel["comfyui", True] > 0.02 and rel["a1111", True] > 0.3, rel


def test_diffusers_drops_dora_scale_and_applies_a_plain_lora(pipe, tmp_path):
    """diffusers 0.42's StableDiffusion(XL)LoraLoaderMixin.lora_state_dict filters out every `dora_scale` key
    ("not compatible in Diffusers at the moment") before converting: a DoRA file loads as the plain LoRA of its
    lora_up/lora_down/alpha, whatever dora_scale's orientation. When this test fails, diffusers applies DoRA."""
    net, unet, _, path = _dora_file(pipe, tmp_path)
    tensors, _ = load_lora(path)
    plain = save_lora(tmp_path / "plain.safetensors", {k: v for k, v in tensors.items() if "dora_scale" not in k},
                      {"ss_network_module": "networks.lora"})  # fmt: skip
    outs = {}
    for name, f in (("dora", path), ("plain", plain)):
        p = copy.deepcopy(pipe)
        p.load_lora_weights(str(f))
        outs[name] = _unet_out(p.unet)
        layer = p.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        assert "default_0" in layer.lora_A and not layer.lora_magnitude_vector  # a LoRA, no DoRA magnitude
    ours, base = _unet_out(unet), _unet_out(pipe.unet)
    assert torch.allclose(outs["dora"], outs["plain"], atol=1e-6)
    # so not lycoris' (and ComfyUI's) output
    assert float((outs["dora"] - ours).norm() / (ours - base).norm()) > 0.1


@pytest.fixture
def lycoris_kohya_state():
    """lycoris' kohya network keeps its preset in class attributes: put them back after the test."""
    from lycoris.kohya import LycorisNetworkKohya

    saved = {k: v for k, v in vars(LycorisNetworkKohya).items() if k.isupper()}
    yield LycorisNetworkKohya
    for k in [k for k in vars(LycorisNetworkKohya) if k.isupper()]:
        delattr(LycorisNetworkKohya, k)
    for k, v in saved.items():
        setattr(LycorisNetworkKohya, k, v)


@pytest.mark.slow
def test_lycoris_kohya_loader_reads_the_dora_file_with_its_network_args(pipe, tmp_path, lycoris_kohya_state):
    """lycoris' own kohya wrapper (what sd-scripts runs for network_module = lycoris.kohya) rebuilds the network
    from the file's ss_network_args (wd_on_output = False) and loads the [1, in] dora_scale: every UNet module's
    merged weight and the UNet output equal the trained network's (1e-4). Its from-weights loader ignores the
    args and cannot take them; its "full" preset trips over diffusers' time embedding. docs/networks.md."""
    import toml
    from lycoris.config import PRESET
    from lycoris.kohya import create_network, create_network_from_weights

    net, unet, te, path = _dora_file(pipe, tmp_path, conv_dim=4)
    tensors, meta = load_lora(path)
    args = json.loads(meta["ss_network_args"])
    assert args["wd_on_output"] == "False" and args["preset"] == "full"
    fresh = lambda: (copy.deepcopy(pipe.text_encoder), copy.deepcopy(pipe.unet))  # noqa: E731

    # lycoris 4.1.3's "full" preset names the TimestepEmbedding class and its linears: the same module twice
    with pytest.raises(AssertionError, match="duplicated lora name: lora_unet_time_embedding_linear_1"):
        create_network(1.0, 4, 2, None, *fresh(), **args)
    # the same preset without the class (its linears stay, by name), as a preset file lycoris reads
    full = dict(PRESET["full"])
    full["unet_target_module"] = [m for m in full["unet_target_module"] if m != "TimestepEmbedding"]
    (tmp_path / "full.toml").write_text(toml.dumps(full))
    te2, unet2 = fresh()
    theirs = create_network(1.0, 4, 2, None, te2, unet2, **(args | {"preset": str(tmp_path / "full.toml")}))
    # apply_to, then load_weights, as sd-scripts does: its modules register (and take the weights) in apply_to
    theirs.apply_to(te2, unet2, True, True)
    state = theirs.load_weights(str(path))
    unet_keys = lambda keys: [k for k in keys if k.startswith("lora_unet_")]  # noqa: E731
    assert not unet_keys(state.get("missing keys", [])) and not unet_keys(state.get("unexpected keys", []))
    # the text encoder: transformers 5's CLIPTextModel has no text_model level, so lycoris names its modules
    # lora_te_encoder_..., ours (sd-scripts', ComfyUI's) lora_te_text_model_encoder_...: none of them loads here
    te_keys = sorted(k for k in tensors if k.startswith("lora_te_"))
    assert te_keys and sorted(state["unexpected keys"]) == te_keys
    ours = {net.names[m.lora_name]: m for m in net.modules}
    worst, n = 0.0, 0
    for m in theirs.unet_loras:
        assert m.wd and not m.wd_on_out and m.dora_scale.shape[0] == 1
        mine = ours[m.lora_name]
        base = mine.org_weight.float()
        with torch.no_grad():
            a = mine.get_merged_weight()[0].reshape(base.shape)
            b = m.get_merged_weight()[0].reshape(base.shape)
        worst, n = max(worst, float((a - b).abs().max() / (a - base).abs().max())), n + 1
    assert n == len(unet_keys(ours)) and n > 50 and worst < 1e-4, (n, worst)
    want, base_out = _unet_out(unet), _unet_out(pipe.unet)
    rel = float((_unet_out(unet2) - want).norm() / (want - base_out).norm())
    print(f"lycoris kohya: {n} UNet modules, merged weight max rel {worst:.2e}, UNet output rel {rel:.2e}")
    assert rel < 1e-4, rel

    # create_network_from_weights builds every module with lycoris' default wd_on_out=True ([out, 1]), whatever
    # the file's args, and copies our [1, in] dora_scale into it: a shape error, never a wrong merge
    with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
        create_network_from_weights(1.0, str(path), None, *fresh(), weights_sd=dict(tensors))
