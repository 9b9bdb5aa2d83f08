"""The five commands of issue 4, end to end through the CLI."""

from __future__ import annotations

import json

import tomllib
from typer.testing import CliRunner

from curate.cli import app
from tests.export_helpers import fresh_copy

runner = CliRunner()


def _run(*args: str):
    res = runner.invoke(app, list(args))
    return res.exit_code, res.output


def test_issue_commands_end_to_end(tmp_path_factory, tmp_path):
    d, fams = fresh_copy(tmp_path_factory, tmp_path / "ds")
    d.close()
    ds = str(tmp_path / "ds")
    code, out = _run("split", ds, "--val", "0.1", "--seed", "0", "--json")
    assert code == 0, out
    s = json.loads(out)
    assert s["train"] + s["val"] == 36 and s["val"] >= 1
    code, out = _run("bucket", ds, "--resolution", "1024", "--min", "512", "--max", "2048", "--step", "64",
                     "--no-upscale", "--json")  # fmt: skip
    assert code == 0, out
    b = json.loads(out)
    assert (
        b["settings"]["no_upscale"] is True
        and b["upscaled"] == 0
        and sum(x["images"] for x in b["buckets"]) == 36
    )
    code, out = _run("export", ds, str(tmp_path / "out"), "--format", "kohya", "--repeats", "10",
                     "--trigger", "mychar", "--class", "woman")  # fmt: skip
    assert code == 0, out
    cfg = tomllib.loads((tmp_path / "out" / "dataset.toml").read_text())
    assert cfg["datasets"][0]["bucket_no_upscale"] is True and cfg["datasets"][0]["min_bucket_reso"] == 512
    code, out = _run("export", ds, str(tmp_path / "out"), "--format", "kohya")
    assert code == 2 and "never overwrites" in out
    code, out = _run("export", ds, str(tmp_path / "hf"), "--format", "diffusers")
    assert code == 0 and (tmp_path / "hf" / "train" / "metadata.jsonl").is_file()
    code, out = _run("plan", ds, "--model", "sdxl", "--vram", "24")
    assert code == 0, out
    plan = tomllib.loads((tmp_path / "ds" / ".curate" / "train.toml").read_text())
    assert plan["train"]["unet_lr"] == 5e-4 and plan["train"]["batch_size"] == 4
    code, out = _run("check", ds, "--rule", "split", "--no-scan")
    assert code == 0, out
    code, out = _run("report", ds)
    assert code == 0 and "Buckets (" in (tmp_path / "ds" / ".curate" / "report.html").read_text()
    code, out = _run("split", ds, "--val", "2")
    assert code == 2 and "between 0 and 1" in out
