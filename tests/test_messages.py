"""Messages a user sees: bracketed names print verbatim, curate.toml mistakes, model hints, lora-info.

Every bad input here must end in one `error:` line on stderr, a non-zero exit, no traceback, and no
change to the user's files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curate.cli import app
from tests.images import textured, tree_hashes

runner = CliRunner()

ODD_NAME = "[bold red]x[y].jpg"
ODD_CORRUPT = "[red]broken].jpg"


def cli(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env=env)


def assert_one_error(r, needle: str | None = None) -> str:
    """rc != 0, exactly one stderr line starting with error:, no traceback; returns the line."""
    assert r.exit_code not in (0, None), r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), lines
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    if needle is not None:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def odd(tmp_path: Path) -> Path:
    """Two good images, one tiny image and one corrupt file whose names hold rich markup."""
    root = tmp_path / "ds"
    root.mkdir()
    textured(640, 640, seed=1).save(root / "good1.png")
    textured(640, 640, seed=2).save(root / "good2.png")
    textured(64, 64, seed=3).save(root / ODD_NAME, quality=90)  # too small: shows up as a filter reject
    (root / ODD_CORRUPT).write_bytes(b"not an image at all")
    return root


# -- 1. markup ------------------------------------------------------------------------------------
def test_bracketed_file_names_print_verbatim(odd: Path):
    before = tree_hashes(odd)
    r = cli("scan", str(odd))
    assert r.exit_code == 0, r.output
    assert ODD_CORRUPT in r.stdout  # the scan lists unusable files by name
    r = cli("filter", str(odd))
    assert r.exit_code == 0, r.output
    assert ODD_NAME in r.stdout and "too-small" in r.stdout
    r = cli("check", str(odd), "--no-scan")
    assert r.exit_code == 1
    assert ODD_NAME in r.stdout and ODD_CORRUPT in r.stdout
    r = cli("status", str(odd))
    assert r.exit_code == 0 and "rejected_files" in r.stdout
    assert ODD_NAME in r.stdout and ODD_CORRUPT in r.stdout  # examples of the rejects, by name
    assert tree_hashes(odd) == before


def test_error_lines_keep_brackets(odd: Path):
    (odd / "curate.toml").write_text("[filter]\nmin_sid = 3\n")
    line = assert_one_error(cli("scan", str(odd)))
    assert "unknown option(s) min_sid in [filter] of" in line and "did you mean min_side?" in line


def test_help_shows_bracketed_words():
    r = cli("train", "--help")
    assert r.exit_code == 0
    assert "[train] table" in re.sub(r"\s+", " ", r.stdout.replace("│", " "))


def test_warnings_and_table_cells_are_plain_text(capsys):
    from curate import ui

    ui.warn("file [bold]a[/].jpg is odd")
    ui.console.print(ui.table("t [x]", ["[c]"], [["[red]cell[/]"]]))
    out = capsys.readouterr()
    assert "warning: file [bold]a[/].jpg is odd" in out.err
    assert "t [x]" in out.out and "[c]" in out.out and "[red]cell[/]" in out.out


# -- 2. curate.toml ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        ("[filtr]\nmin_side = 1\n", ["unknown section [filtr] in", "did you mean [filter]?"]),
        ('[tag]\nmodle = "x"\n', ["unknown option(s) modle in [tag]", "did you mean model?"]),
        ('[caption]\nblaclist = ["x"]\n', ["did you mean blacklist?"]),
        ('[filter]\nmin_side = "abc"\n', ["min_side in [filter]", "must be an integer", '"abc"']),
        ("[filter]\nmin_side = 1.5\n", ["min_side in [filter]", "must be an integer", "1.5"]),
        ("[scan]\nworkers = true\n", ["workers in [scan]", "must be an integer"]),
        ('[filter]\nreject_flags = "alpha"\n', ["reject_flags in [filter]", "must be a list of strings"]),
        (
            '[dedupe]\nkeep = ["../../etc"]\n',
            ["keep in [dedupe]", "pixels, sharpness, filesize", "../../etc"],
        ),
        ('[dedupe]\nmethod = "md5"\n', ["method in [dedupe]", "phash"]),
        ("[filter]\nmin_side = -1\n", ["min_side in [filter]", "0 or more"]),
        ("[dedupe]\nphash_threshold = 65\n", ["phash_threshold in [dedupe]", "between 0 and 64"]),
        ("[filter]\nmax_brightness = 1.5\n", ["max_brightness in [filter]", "between 0 and 1"]),
        (
            "[filter]\nmin_brightness = 0.9\nmax_brightness = 0.5\n",
            ["min_brightness", "above max_brightness"],
        ),
        ("[caption]\ngeneral = 2.0\n", ["general", "between 0 and 1", "[caption]"]),
        ('[caption]\ngeneral = "high"\n', ["general in [caption]", "must be a number"]),
        ("[clip]\nthreshold = 2\n", ["threshold in [clip]", "between -1 and 1"]),
        ("[clip]\nbatch_sise = 8\n", ["did you mean batch_size?"]),
        ("[blip]\nbatch_size = 0\n", ["batch_size in [blip]", "at least 1"]),
        ("[tag]\nfloor = 3\n", ["floor in [tag]", "between 0 and 1"]),
        ("min_side = 3\n", ["min_side in", "not inside a section; put it under [filter]"]),
        ('[plan]\nnetwork_dim = "abc"\n', ["network_dim in [plan]", "must be an integer"]),
        ("[plan]\nsize_tiers = 3\n", ["size_tiers in [plan]", "must be a list"]),
    ],
)
def test_bad_curate_toml_is_one_line(odd: Path, toml: str, needles: list[str]):
    (odd / "curate.toml").write_text(toml)
    before = tree_hashes(odd)
    line = assert_one_error(cli("scan", str(odd)))
    for n in needles:
        assert n in line, (n, line)
    assert str(odd / "curate.toml") in line or "curate.toml" in line
    assert tree_hashes(odd) == before
    assert not (odd / ".curate").exists()  # rejected before anything was written


def test_every_section_the_code_reads_is_accepted(odd: Path):
    (odd / "curate.toml").write_text(
        "[scan]\nworkers = 1\nmax_pixels = 1000000\n"
        '[filter]\nmin_side = 32\nmax_aspect = 4\nreject_flags = ["animated"]\n'
        '[dedupe]\nmethod = "phash"\nkeep = ["sharpness", "pixels"]\n'
        "[clip]\nworkers = 0\nthreshold = 0.9\nk = 5\n"
        '[tag]\nmodel = "owner/name"\ntrigger = "zz"\ngeneral = 0.5\nbatch_size = 4\n'
        '[caption]\nblacklist = ["solo"]\nreplace = ["a=b"]\nformat = "txt"\n'
        '[blip]\nnum_beams = 2\ndtype = "fp32"\n'
        "[plan]\nnetwork_dim = 16\n"
    )
    r = cli("scan", str(odd), "--json")
    assert r.exit_code == 0, r.output
    r = cli("filter", str(odd), "--json")
    assert r.exit_code == 0, r.output
    assert "too-small" not in json.loads(r.stdout)["filter"]["by_reason"]  # min_side 32 from the file


def test_cli_flag_out_of_range_is_one_line(odd: Path):
    assert cli("scan", str(odd), "--json").exit_code == 0
    assert_one_error(cli("filter", str(odd), "--min-side", "-5"), "min_side must be 0 or more")
    assert_one_error(cli("dedupe", str(odd), "--keep", "../../etc"), "keep must be")


# -- 3. model loader hints ---------------------------------------------------------------------------
@pytest.fixture
def scanned(odd: Path) -> Path:
    assert cli("scan", str(odd), "--json").exit_code == 0
    return odd


def test_missing_local_tagger_folder_says_no_such_folder(scanned: Path):
    line = assert_one_error(cli("tag", str(scanned), "--model", "./some/local/path"))
    assert "no such folder ./some/local/path" in line and "download" not in line


def test_hub_tagger_not_downloaded_names_hf_download(scanned: Path, tmp_path: Path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    r = cli("tag", str(scanned), "--model", "someone/wd-tagger", env=env)
    line = assert_one_error(r)
    assert "`hf download someone/wd-tagger model.onnx selected_tags.csv --local-dir wd-tagger`" in line
    assert "--model ./wd-tagger" in line and "huggingface-cli" not in line


def test_missing_local_captioner_and_clip_folders(scanned: Path):
    pytest.importorskip("transformers")
    line = assert_one_error(cli("caption", str(scanned), "--model", "../no/such/blip", "--device", "cpu"))
    assert "no such folder ../no/such/blip" in line and "download" not in line
    pytest.importorskip("open_clip")
    line = assert_one_error(
        cli("dedupe", str(scanned), "--method", "clip", "--model", "./clip/model", "--device", "cpu")
    )
    assert "no such folder ./clip/model" in line and "download" not in line


def test_hub_id_rules():
    from curate.models import hf_download, is_hub_id, looks_like_path

    assert is_hub_id("SmilingWolf/wd-vit-tagger-v3") and is_hub_id("Salesforce/blip-image-captioning-large")
    for path in ("./a/b", "../a", "/abs/x", "~/models/x", "a/b/c", "a/", "x"):
        assert not is_hub_id(path), path
    assert looks_like_path("./x") and not looks_like_path("owner/name")
    assert hf_download("o/n", ("a", "b"), "n") == "hf download o/n a b --local-dir n"


# -- 4. lora-info on odd files -------------------------------------------------------------------------
def _lora(path: Path, metadata: dict[str, str]) -> Path:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {
        f"{name}.lora_down.weight": torch.zeros(4, 8),
        f"{name}.lora_up.weight": torch.zeros(8, 4),
        f"{name}.alpha": torch.tensor(2.0),
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    ("meta", "needles"),
    [
        ({"ss_network_dim": "abc", "ss_tag_frequency": '{"1_x": {"sks": 3}}'}, ["ss_network_dim 'abc'"]),
        ({"ss_tag_frequency": '"just a string"'}, ["ss_tag_frequency is a JSON str"]),
        ({"ss_tag_frequency": "{not json"}, ["ss_tag_frequency is not JSON"]),
        ({"ss_tag_frequency": '{"1_x": 3, "2_y": {"a": "many"}}'}, ["2 entries that are not tag counts"]),
        ({"ss_network_alpha": "nan", "ss_network_args": "[1]"}, ["ss_network_alpha", "ss_network_args"]),
        ({"ss_datasets": "{not json"}, ["ss_datasets is not JSON"]),
        ({"ss_datasets": '{"subsets": []}'}, ["ss_datasets is a JSON dict"]),
        (
            {"ss_datasets": '[{"subsets": 3}, 7, {"subsets": [{"image_dir": 5, "keep_tokens": "x"}]}]'},
            ["ss_datasets has 2 entries that are not a dataset or subset"],
        ),
    ],
)
def test_lora_info_odd_metadata_shows_what_it_can(tmp_path: Path, meta, needles):
    path = _lora(tmp_path / "[odd] lora.safetensors", meta)
    r = cli("lora-info", str(path))
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    assert "rank" in r.stdout and " 4 " in r.stdout  # rank from the tensors when the metadata is odd
    assert "[odd] lora.safetensors" in r.stdout.replace("\n", "")  # the title folds at the table width
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])
    info = json.loads(cli("lora-info", str(path), "--json").stdout)
    assert info["rank"] == 4 and info["alpha"] == 2.0 and info["problems"]


def test_lora_info_tag_counts_survive_partly_odd_frequency(tmp_path: Path):
    path = _lora(
        tmp_path / "a.safetensors", {"ss_tag_frequency": '{"1_x": {"sks": 3, "bad": "x"}, "2_y": 5}'}
    )
    info = json.loads(cli("lora-info", str(path), "--json").stdout)
    assert info["top_tags"] == [["sks", 3]]


def test_lora_info_without_metadata(tmp_path: Path):
    path = _lora(tmp_path / "plain.safetensors", {})
    r = cli("lora-info", str(path), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["rank"] == 4 and r.stderr == ""


@pytest.mark.parametrize("kind", ["garbage", "folder", "missing", "empty"])
def test_lora_info_bad_files_are_one_line(tmp_path: Path, kind: str):
    p = tmp_path / "x.safetensors"
    needle = {"garbage": "not a readable safetensors file", "folder": "is a folder", "missing": "not found",
              "empty": "not a readable safetensors file"}[kind]  # fmt: skip
    if kind == "garbage":
        p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif kind == "folder":
        p.mkdir()
    elif kind == "empty":
        p.write_bytes(b"")
    assert_one_error(cli("lora-info", str(p)), needle)
