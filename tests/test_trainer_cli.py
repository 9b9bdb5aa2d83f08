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
    r = CliRunner().invoke(_app(), ["train", str(tmp_path), "--set", "compile=whole"])
    assert r.exit_code == 2 and "compile must be true, false or 'regional', got 'whole'" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(_app(), ["train", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.output
