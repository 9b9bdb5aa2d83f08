"""`curate train` / `curate lora-info` commands: parse, call the library, one-line errors."""

from __future__ import annotations

import json

import torch
import typer
from typer.testing import CliRunner

from curate.commands.train import register
from trainer_bridge import lora as L
from trainer_bridge.export import save_lora


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_lora_info_command(tmp_path):
    mod = L.LoRAModule(torch.nn.Linear(8, 8), rank=2, alpha=1)
    mod.kohya_name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = save_lora(tmp_path / "a.safetensors", L.lora_state_dict([mod]),
                     {"ss_network_dim": 2, "ss_network_alpha": "1", "ss_tag_frequency": {"1_x": {"sks": 3}}})  # fmt: skip
    r = CliRunner().invoke(_app(), ["lora-info", str(path), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert (info["rank"], info["alpha"], info["top_tags"]) == (2, 1.0, [["sks", 3]])
    r = CliRunner().invoke(_app(), ["lora-info", str(path)])
    assert r.exit_code == 0 and "sks (3)" in r.output


def test_commands_fail_with_one_line(tmp_path):
    r = CliRunner().invoke(_app(), ["lora-info", str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 2 and "LoRA file not found" in r.output
    r = CliRunner().invoke(_app(), ["train", str(tmp_path), "--set", "optimizr=adamw"])
    assert r.exit_code == 2 and "unknown training option(s): optimizr" in r.output
    r = CliRunner().invoke(_app(), ["train", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_lora_info_shows_the_per_subset_settings(tmp_path):
    """ss_datasets (as sd-scripts writes it: full image_dir paths, several datasets) -> one row per subset in
    the table and in --json; a subset that is not a dict is skipped and said, keys a file lacks show as '-'."""
    mod = L.LoRAModule(torch.nn.Linear(8, 8), rank=2, alpha=1)
    mod.kohya_name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    datasets = [
        {"subsets": [
            {"image_dir": "/data/train/10_mychar", "img_count": 12, "num_repeats": 10, "keep_tokens": 1,
             "shuffle_caption": True, "flip_aug": False, "class_tokens": "mychar", "is_reg": False},
            {"image_dir": "/data/reg/1_woman", "img_count": 40, "num_repeats": 1, "keep_tokens": 0,
             "shuffle_caption": False, "flip_aug": True, "class_tokens": None, "is_reg": True},
        ]},
        {"subsets": [{"image_dir": "style", "img_count": 3, "num_repeats": 2}, "oops"]},
    ]  # fmt: skip
    path = save_lora(tmp_path / "a.safetensors", L.lora_state_dict([mod]),
                     {"ss_network_dim": 2, "ss_network_alpha": "1", "ss_datasets": datasets})  # fmt: skip
    r = CliRunner().invoke(_app(), ["lora-info", str(path), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    got = {s["image_dir"]: s for s in info["subsets"]}
    assert list(got) == ["10_mychar", "1_woman", "style"]
    assert got["10_mychar"] == {"image_dir": "10_mychar", "img_count": 12, "num_repeats": 10, "keep_tokens": 1,
                                "shuffle_caption": True, "flip_aug": False, "class_tokens": "mychar",
                                "is_reg": False}  # fmt: skip
    woman = got["1_woman"]
    assert (woman["is_reg"], woman["flip_aug"], woman["keep_tokens"]) == (True, True, 0)
    assert got["style"]["keep_tokens"] is None and got["style"]["num_repeats"] == 2
    assert info["problems"] == ["ss_datasets has 1 entry that is not a dataset or subset"]
    r = CliRunner().invoke(_app(), ["lora-info", str(path)])
    assert r.exit_code == 0, r.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in r.output.splitlines() if line.count("│") == 9}  # fmt: skip
    assert rows["10_mychar"] == ["12", "10", "1", "yes", "no", "mychar", "no"], r.output
    assert rows["1_woman"] == ["40", "1", "0", "no", "yes", "-", "yes"], r.output
    assert rows["style"] == ["3", "2", "-", "-", "-", "-", "-"], r.output
    assert "ss_datasets has 1 entry" in r.output
