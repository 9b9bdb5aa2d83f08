"""Planner: the dataset-size table, steps, VRAM rows, style, overrides, and a [train] the trainer reads."""

from __future__ import annotations

import pytest
import tomllib

from curate.dataset import Dataset
from curate.errors import CurateError
from curate.stages.plan import plan_training
from tests.export_helpers import fresh_copy

# The [train] names trainer_bridge.TrainConfig reads, with the type of its defaults.
TRAIN_TYPES = {
    "model_family": str, "base": str, "output_dir": str, "output_name": str, "resolution": int,
    "batch_size": int, "grad_accum": int, "epochs": int, "max_steps": int, "unet_lr": float,
    "text_encoder_lr": float, "network_dim": int, "network_alpha": float, "network_dropout": float,
    "conv_dim": int, "conv_alpha": float, "optimizer": str, "lr_scheduler": str, "lr_warmup_steps": int,
    "min_snr_gamma": float, "noise_offset": float, "multires_noise_iterations": int,
    "multires_noise_discount": float, "min_timestep": int, "max_timestep": int, "v_prediction": bool,
    "mixed_precision": str, "gradient_checkpointing": bool, "max_grad_norm": float, "scale_weight_norms": float,
    "keep_tokens": int, "shuffle_caption": bool, "caption_dropout": float, "flip_aug": bool,
    "cache_latents": bool, "cache_text_encoder_outputs": bool, "seed": int, "save_every_n_epochs": int,
    "keep_last_n": int, "sample_every_n_steps": int, "sample_prompts": list, "log_dir": str, "compile": bool,
    "num_repeats": int,
}  # fmt: skip


@pytest.mark.parametrize(
    "n,unet,te,epochs,repeats,steps",
    [
        (60, 5e-4, 1e-4, 10, 10, 1500),  # 60 x 10 x 10 / 4
        (200, 4e-4, 8e-5, 10, 5, 2500),  # 200 x 5 x 10 / 4
        (400, 3e-4, 6e-5, 8, 3, 2400),  # 400 x 3 x 8 / 4
        (2000, 2e-4, 4e-5, 6, 1, 3000),  # 2000 x 1 x 6 / 4: repeats lowered to 1
    ],
)
def test_size_tiers(n, unet, te, epochs, repeats, steps):
    p = plan_training(n, model="sdxl", vram=24, style="anime")
    t = p.train
    assert (t["unet_lr"], t["text_encoder_lr"], t["epochs"], t["num_repeats"]) == (unet, te, epochs, repeats)
    assert (t["batch_size"], t["grad_accum"]) == (4, 1)
    assert p.total_steps == steps == n * repeats * epochs // 4
    assert (t["network_dim"], t["network_alpha"]) == (32, 16.0)
    assert t["lr_warmup_steps"] == -(-steps * 5 // 100)
    assert f"= {steps} optimizer steps" in p.reasons["total_steps"]
    assert all(p.reasons[k] for k in ("unet_lr", "epochs", "batch_size", "network_dim", "min_snr_gamma"))


def test_vram_rows_accumulation_and_buckets():
    p = plan_training(60, model="sdxl", vram=12, style="anime")
    assert (p.train["batch_size"], p.train["grad_accum"], p.train["gradient_checkpointing"]) == (1, 2, True)
    assert p.total_steps == 60 * 10 // 2 * 10 == 3000
    p = plan_training(60, model="sd15", vram=24, style="anime")
    assert (p.train["batch_size"], p.train["resolution"], p.train["gradient_checkpointing"]) == (
        8,
        512,
        False,
    )
    # Batches never mix buckets: a 3-image bucket costs ceil(30/4) = 8 batches, not 7.5.
    p = plan_training(60, model="sdxl", vram=24, style="anime", bucket_counts=[3, 57])
    assert p.total_steps == (8 + 143) * 10
    with pytest.raises(CurateError, match="at least 10 GiB"):
        plan_training(60, model="sdxl", vram=8)
    with pytest.raises(CurateError, match="unknown --model"):
        plan_training(60, model="flux", vram=24)


def test_style_from_tags_sets_min_snr_gamma():
    anime = [["1girl", "anime coloring", "smile"]] * 8 + [["tree"]] * 2
    real = [["realistic", "photo (medium)", "1girl"]] * 6 + [["1girl", "anime"]] * 1
    p = plan_training(60, tag_lists=anime)
    assert (p.style, p.train["min_snr_gamma"]) == ("anime", 5.0)
    p = plan_training(60, tag_lists=real)
    assert (p.style, p.train["min_snr_gamma"]) == ("realistic", 7.0)
    assert "realistic" in p.reasons["min_snr_gamma"]
    assert plan_training(60).style == "realistic"  # no tags: the default, said in the reason
    assert plan_training(60, style="anime").train["min_snr_gamma"] == 5.0


def test_plan_section_in_curate_toml_overrides_tables(tmp_path_factory, tmp_path):
    d, _ = fresh_copy(tmp_path_factory, tmp_path / "ds")
    d.close()
    (tmp_path / "ds" / "curate.toml").write_text(
        "[plan]\nnetwork_dim = 16\nmin_snr_gamma = { realistic = 9.0 }\n"
        "[[plan.size_tiers]]\nmin_images = 0\nunet_lr = 1e-4\ntext_encoder_lr = 0.0\nepochs = 4\nrepeats = 2\n"
    )
    with Dataset.open(tmp_path / "ds") as ds:
        ds.split(0.2, 0)
        p = ds.plan(model="sdxl", vram=24, style="realistic", trigger="mychar")
    t = p.train
    assert (t["network_dim"], t["min_snr_gamma"], t["unet_lr"], t["text_encoder_lr"]) == (16, 9.0, 1e-4, 0.0)
    n_train = p.images
    assert 0 < n_train < 36 and p.total_steps == -(-n_train * 2 // 4) * 4
    assert t["keep_tokens"] == 1 and t["sample_prompts"] == ["mychar"]
    (tmp_path / "ds" / "curate.toml").write_text("[plan]\nlearning_rate = 1\n")
    with (
        Dataset.open(tmp_path / "ds") as ds,
        pytest.raises(CurateError, match="unknown option 'learning_rate'"),
    ):
        ds.plan()


def test_written_toml_has_only_trainer_fields_with_trainer_types(tmp_path):
    p = plan_training(200, model="sdxl", vram=24, trigger="mychar", class_word="woman")
    path = tmp_path / "train.toml"
    path.write_text(p.to_toml())
    doc = tomllib.loads(path.read_text())
    assert set(doc["train"]) == set(TRAIN_TYPES)
    for k, v in doc["train"].items():
        want = TRAIN_TYPES[k]
        assert type(v) is want, (k, v)
    assert doc["plan"]["total_steps"] == 2500 and doc["plan"]["reasons"]["unet_lr"].startswith("100-300")
    try:  # the trainer's own loader, when it is on this branch
        from trainer_bridge.config import TrainConfig
    except ImportError:
        return
    cfg = TrainConfig.from_toml(path)
    assert cfg.unet_lr == 4e-4 and cfg.num_repeats == 5


@pytest.mark.parametrize(
    "n,trigger,kind,net",
    [
        (20, None, None, "lora"),  # too few images for more than a plain LoRA
        (120, None, None, "locon"),  # no trigger: a style, conv layers carry texture
        (800, None, "style", "loha"),
        (120, "mychar", None, "lora"),  # a trigger: one subject
        (900, "mychar", "concept", "dora"),
    ],
)
def test_network_suggestion_by_size_and_kind(tmp_path, n, trigger, kind, net):
    p = plan_training(n, trigger=trigger, kind=kind)
    sg = p.suggestion
    assert sg["network"] == net and sg["reason"]
    assert sg["kind"] == (kind or ("character" if trigger else "style"))
    assert p.train["network_dim"] == 32  # [train] stays a plain LoRA: the suggestion is applied with --set
    sets = [a for a in sg["apply"].split() if a != "--set"]
    assert sets[0] == f"network={net}"
    path = tmp_path / "train.toml"
    path.write_text(p.to_toml())
    doc = tomllib.loads(path.read_text())
    assert doc["plan"]["suggested_network"]["network"] == net and "network" not in doc["train"]
    from trainer_bridge.config import TrainConfig

    cfg = TrainConfig.from_toml(path, sets)  # the trainer takes the suggested options as they are printed
    assert cfg.network == net
    for k, v in sg["options"].items():
        assert getattr(cfg, k) == v


def test_plan_cli_prints_and_writes_the_suggestion(tmp_path_factory, tmp_path):
    import json

    from typer.testing import CliRunner

    from curate.cli import app

    ds, _ = fresh_copy(tmp_path_factory, tmp_path / "ds")
    ds = ds.root
    runner = CliRunner()
    r = runner.invoke(app, ["plan", str(ds), "--kind", "style", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["suggestion"]["kind"] == "style" and out["suggestion"]["network"] in ("lora", "locon", "loha")
    r = runner.invoke(app, ["plan", str(ds), "--kind", "portrait"])
    assert r.exit_code != 0 and "unknown --kind 'portrait'" in r.output and "Traceback" not in r.output
