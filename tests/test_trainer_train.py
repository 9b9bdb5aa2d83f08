"""End-to-end training on tiny random-weight models: the loss falls, the file is kohya-shaped, resume is exact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer_fixtures import dataset, sd15_dir, sdxl_dir  # noqa: F401  (pytest fixtures)
from trainer_bridge import TrainConfig, TrainError, lora_info, train
from trainer_bridge.export import load_lora, model_hashes


def tiny_config(base, data, out, **kw) -> TrainConfig:
    values = dict(base=str(base), data=str(data), output_dir=str(out), resolution=64, min_bucket_reso=32,
                  max_bucket_reso=128, bucket_reso_steps=16, batch_size=2, network_dim=4, network_alpha=4,
                  mixed_precision="no", log_every_n_steps=4, unet_lr=1e-2, seed=7)  # fmt: skip
    return TrainConfig(**{**values, **kw})


@pytest.mark.slow
def test_overfit_loss_falls_and_file_is_kohya(sd15_dir, dataset, tmp_path):  # noqa: F811
    cfg = tiny_config(sd15_dir, dataset, tmp_path / "out", epochs=6, network_train_ff=True, conv_dim=4,
                      conv_alpha=4, flip_aug=True, min_snr_gamma=5.0, sample_every_n_steps=24,
                      sample_prompts=["sks, photo"], sample_steps=2, save_every_n_epochs=2, keep_last_n=2)  # fmt: skip
    r = train(cfg)
    # 4 images x 2 repeats / batch 2 = 4 steps per epoch; the train loss is logged every 4 steps
    assert r.steps == 24 and len(r.losses) == 6 and len(r.val_losses) == 6
    assert r.losses[-1] < 0.7 * r.losses[0], r.losses
    assert r.val_losses[-1] < 0.9 * r.val_losses[0], r.val_losses
    out = tmp_path / "out"
    # save every 2 epochs, keep the last 2 (epochs 2 and 4; epoch 6 is the final file)
    assert sorted(p.name for p in out.glob("lora-0*.safetensors")) == [
        "lora-000002.safetensors",
        "lora-000004.safetensors",
    ]
    assert (out / "sample" / "lora_000024_00.png").is_file()
    assert list((out / "logs").glob("events.out.tfevents.*"))  # tensorboard scalars + sample images
    # latents cached once per image (4 train with flipped copies, 2 val), keyed by content hash + VAE id + bucket
    cached = list((out / "cache").glob("*.safetensors"))
    assert len(cached) == 6 and sum("latent_flipped" in load_file(str(p)) for p in cached) == 4
    assert {p.name.rsplit("_", 1)[1] for p in cached} == {
        "64x64.safetensors",
        "80x48.safetensors",
        "48x80.safetensors",
    }

    tensors, meta = load_lora(r.lora_path)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert (
        tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].dtype
        == torch.float16
    )
    assert tensors[
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0.lora_up.weight"
    ].shape == (32, 4)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    assert not any(k.startswith("lora_te") for k in tensors)  # text encoder frozen (text_encoder_lr = 0)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "4.0" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4"}
    assert (meta["ss_learning_rate"], meta["ss_unet_lr"], meta["ss_text_encoder_lr"]) == (
        "0.01",
        "0.01",
        "0.0",
    )
    assert (meta["ss_num_epochs"], meta["ss_max_train_steps"], meta["ss_steps"]) == ("6", "24", "24")
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_min_snr_gamma"] == "5.0"
    assert json.loads(meta["ss_tag_frequency"]) == {
        "2_subject": {"sks": 4, "photo": 4, "tag0": 2, "tag1": 2, "red": 4}
    }
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_subject": {"n_repeats": 2, "img_count": 4}}
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert sorted((tuple(b["resolution"]), b["count"]) for b in buckets.values()) == [
        ((48, 80), 2),
        ((64, 64), 4),
        ((80, 48), 2),
    ]
    assert meta["sshs_model_hash"] == model_hashes(tensors, meta)[0]
    info = lora_info(r.lora_path)
    assert (info["rank"], info["alpha"], info["base_model"], info["epochs"]) == (4, 4.0, "sd_v1", "6")
    assert info["top_tags"][0][1] == 4

    # the diffusers pipeline takes the trained file unmodified
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        sd15_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(str(r.lora_path))
    assert len(pipe.get_active_adapters()) == 1


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(sd15_dir, dataset, tmp_path):  # noqa: F811
    # exercise every random stream: caption shuffle/dropout (host), flips + noise offset + multires (device),
    # LoRA dropout (torch global), text-encoder LoRA, grad accumulation, a warmup+cosine schedule
    kw = dict(epochs=3, text_encoder_lr=5e-3, shuffle_caption=True, keep_tokens=1, caption_dropout=0.2, flip_aug=True,
              noise_offset=0.05, multires_noise_iterations=2, network_dropout=0.1, grad_accum=2,
              lr_scheduler="cosine", lr_warmup_steps=2, save_state=True)  # fmt: skip
    full = train(tiny_config(sd15_dir, dataset, tmp_path / "a", **kw))
    part = train(tiny_config(sd15_dir, dataset, tmp_path / "b", stop_after_steps=3, **kw))
    assert part.interrupted and part.steps == 3 and (part.state_path / "state.json").is_file()
    assert json.loads((part.state_path / "state.json").read_text())["info"]["step"] == 3
    rest = train(tiny_config(sd15_dir, dataset, tmp_path / "b", resume=str(part.state_path), **kw))
    assert full.steps == rest.steps == 6
    a = load_file(str(full.state_path / "lora.safetensors"))
    b = load_file(str(rest.state_path / "lora.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("lora_te_") for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert full.val_losses[-1] == pytest.approx(rest.val_losses[-1], abs=1e-6)
    # the resumed run is not trivially equal to a fresh one: weights moved away from the zero-initialised lora_up
    assert max(v.abs().max().item() for k, v in a.items() if "lora_up" in k) > 1e-3


@pytest.mark.slow
def test_sdxl_trains_with_text_encoders_and_v_prediction(sdxl_dir, dataset, tmp_path):  # noqa: F811
    cfg = tiny_config(sdxl_dir, dataset, tmp_path / "out", model_family="sdxl", epochs=1, text_encoder_lr=1.0,
                      v_prediction=True, min_snr_gamma=5.0, optimizer="prodigy", unet_lr=1.0)  # fmt: skip
    r = train(cfg)
    tensors, meta = load_lora(r.lora_path)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_v.lora_up.weight" in tensors
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in tensors)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in tensors)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v_parameterization"] == "True"
    assert meta["ss_optimizer"].startswith("prodigyopt.prodigy.Prodigy")
    assert all(torch.isfinite(v.float()).all() for v in tensors.values())
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.load_lora_weights(str(r.lora_path))
    assert len(pipe.get_active_adapters()) == 1


def test_user_mistakes_are_one_line_errors(sd15_dir, dataset, tmp_path):  # noqa: F811
    with pytest.raises(TrainError, match="training data not found"):
        train(tiny_config(sd15_dir, tmp_path / "nope", tmp_path / "o"))
    with pytest.raises(TrainError, match="unknown optimizer 'sgd'"):
        train(tiny_config(sd15_dir, dataset, tmp_path / "o", optimizer="sgd"))
    with pytest.raises(
        TrainError,
        match="cannot load base model 'someone/not-downloaded' offline.*`hf download someone/not-downloaded",
    ):
        train(tiny_config("someone/not-downloaded", dataset, tmp_path / "o"))
    with pytest.raises(TrainError, match="not a diffusers model folder"):
        train(tiny_config(tmp_path, dataset, tmp_path / "o"))
    (tmp_path / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="cannot load base model .*model.safetensors"):
        train(tiny_config(tmp_path / "model.safetensors", dataset, tmp_path / "o"))
    with pytest.raises(TrainError, match="base model not found: no such checkpoint file"):
        train(tiny_config(tmp_path / "missing.safetensors", dataset, tmp_path / "o"))


def test_ctrl_c_saves_a_resumable_state(sd15_dir, dataset, tmp_path, monkeypatch):  # noqa: F811
    """SIGINT during step 2 finishes that step, writes a state at step 2 and returns instead of raising."""
    import signal

    from trainer_bridge import lora as L

    real = L.scale_weight_norms
    calls = []

    def interrupting(mods, max_norm):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return real(mods, max_norm)

    monkeypatch.setattr(L, "scale_weight_norms", interrupting)
    r = train(tiny_config(sd15_dir, dataset, tmp_path / "o", epochs=2, scale_weight_norms=1.0))
    assert r.interrupted and r.steps == 2 and len(calls) == 2
    assert json.loads((r.state_path / "state.json").read_text())["info"]["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_trains_from_kohya_dataset_toml(sd15_dir, dataset, tmp_path):  # noqa: F811
    """The dataset TOML `curate export --format kohya` writes: batch size and repeats come from it."""
    toml = tmp_path / "dataset.toml"
    toml.write_text(
        f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 4\n'
        f"min_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 16\n"
        f'[[datasets.subsets]]\nimage_dir = "{dataset / "2_subject"}"\nnum_repeats = 3\n'
    )
    r = train(tiny_config(sd15_dir, toml, tmp_path / "o", epochs=1, batch_size=1))
    # 4 images x 3 repeats in buckets 64x64 (2 images), 80x48 (1), 48x80 (1): batches of <= 4 -> 2 + 1 + 1
    assert r.steps == 4
    meta = load_lora(r.lora_path)[1]
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_subject": {"n_repeats": 3, "img_count": 4}}
    assert meta["ss_num_batches_per_epoch"] == "4" and meta["ss_batch_size_per_device"] == "4"
