"""New-user journeys over captions and training: train twice into one folder, resume after a stop, typos in
--set, --trigger on a folder never scanned, images without captions, a plan after `curate tag --trigger`, a
trigger added after a hand edit, `caption --combine` later, lora-resize onto an existing file, the export
`curate train` writes (resolution, caption options). Folders are built in tmp_path, the CLI runs through
typer's CliRunner, the trainer runs on the tiny models of tests/trainer_fixtures.py, taggers on tiny ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curate.cli import app
from tests.test_roundtrip_train import TINY, no_model_loads, one_line_error, picture
from tests.trainer_fixtures import sd15_dir  # noqa: F401  (pytest fixture)

run = CliRunner().invoke
# one optimizer step at 64 px: writes the LoRA and its metadata
STEP = [*TINY, "max_steps=1", "resolution=64"]


def sets(*extra: str) -> list[str]:
    return [a for s in (*STEP, *extra) for a in ("--set", s)]


def model_folder(base: Path, pipeline: str = "StableDiffusionPipeline") -> Path:
    """A base-model folder that only names its pipeline: enough for the checks made before a model loads."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "model_index.json").write_text(f'{{"_class_name": "{pipeline}"}}')
    return base


def scanned_pair(tmp_path: Path, caption: str) -> Path:
    """tmp_path/ds: two 64 px pictures p0/p1 with hand captions ``caption.format(i=...)``, scanned."""
    ds = tmp_path / "ds"
    for i in range(2):
        picture(ds / f"p{i}.png", 64, 64, i)
        (ds / f"p{i}.txt").write_text(caption.format(i=i))
    assert run(app, ["scan", str(ds)]).exit_code == 0
    return ds


def kohya_folder(root: Path) -> Path:
    """root/3_mychar/ with two pictures and hand-written captions."""
    for i in range(2):
        picture(root / "3_mychar" / f"img{i}.png", 64, 64, i)
        (root / "3_mychar" / f"img{i}.txt").write_text(f"mychar, tag{i}")
    return root


@pytest.mark.slow
def test_training_again_keeps_the_earlier_lora(tmp_path, sd15_dir):  # noqa: F811
    """Train, change one setting, train again into the same folder: the first LoRA (and its epoch files) are
    moved to OUTPUT/earlier/1/ and the run says so; the new file is the new setting's; nothing is lost."""
    from trainer_bridge.export import load_lora

    ds, out = kohya_folder(tmp_path / "ds"), tmp_path / "out"
    args = ["train", str(ds), "--base", str(sd15_dir), "--output-dir", str(out)]
    r = run(app, [*args, *sets("network_dim=4", "save_every_n_epochs=1", "max_steps=0", "epochs=2")])
    assert r.exit_code == 0, r.output
    assert "earlier" not in r.output
    first = (out / "lora.safetensors").read_bytes()
    epoch1 = (out / "lora-000001.safetensors").read_bytes()
    (out / "sample").mkdir()
    (out / "sample" / "lora_000002_00.png").write_bytes(b"a sample of that run")  # as sample_prompts write
    r = run(app, [*args, *sets("network_dim=8", "mixed_precision='bf16'")])
    assert r.exit_code == 0, r.output
    kept = out / "earlier" / "1"
    assert (kept / "lora.safetensors").read_bytes() == first
    assert (kept / "lora-000001.safetensors").read_bytes() == epoch1
    assert (kept / "lora-state" / "state.json").is_file() and (kept / "lora-000001-state").is_dir()
    assert (kept / "sample" / "lora_000002_00.png").read_bytes() == b"a sample of that run"
    assert not (out / "lora-000001.safetensors").exists()  # this run saved no epoch files
    text = r.output.replace("\n", "")
    assert "an earlier run's lora.safetensors and 3 more file(s) are kept in" in text, r.output
    assert load_lora(kept / "lora.safetensors")[1]["ss_network_dim"] == "4"
    meta = load_lora(out / "lora.safetensors")[1]
    assert meta["ss_network_dim"] == "8"
    import torch

    # what ran: on the CPU the run is fp32 whatever mixed_precision says
    assert meta["ss_mixed_precision"] == ("bf16" if torch.cuda.is_available() else "no")
    # a third run: the next free number, the second file kept too
    second = (out / "lora.safetensors").read_bytes()
    r = run(app, [*args, *sets("network_dim=4"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["earlier_run"] == str(out / "earlier" / "2")
    assert (out / "earlier" / "2" / "lora.safetensors").read_bytes() == second


@pytest.mark.slow
def test_resume_reads_the_latent_and_text_caches(tmp_path, sd15_dir, monkeypatch):  # noqa: F811
    """A run with the base given as a relative path, stopped after a step, then `curate train --resume STATE`
    (which records absolute paths): the latents and caption embeddings come from the cache, none re-encoded."""
    ds = kohya_folder(tmp_path / "ds")
    monkeypatch.chdir(sd15_dir.parent)
    r = run(app, ["train", str(ds), "--base", sd15_dir.name, "--output-dir", str(tmp_path / "out"), "--json",
                  *sets("max_steps=3", "stop_after_steps=1", "batch_size=1")])  # fmt: skip
    assert r.exit_code == 130, r.output
    first = json.loads(r.stdout)
    assert (first["timings"]["latents_encoded"], first["timings"]["te_encoded"]) == (2, 3), first["timings"]
    r = run(app, ["train", "--resume", first["state"], "--json"])
    assert r.exit_code == 0, r.output
    t = json.loads(r.stdout)["timings"]
    assert (t["latents_encoded"], t["latents_cached"], t["te_encoded"], t["te_cached"]) == (0, 2, 0, 3), t


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("optimizer='adamw9'", "unknown optimizer 'adamw9'"),
        ("lr_scheduler='cosin'", "unknown lr_scheduler 'cosin'"),
        ("netwrk_dim=8", "unknown training option(s): netwrk_dim (did you mean network_dim?)"),
        ("unet_lrr=1e-4", "unet_lrr (did you mean unet_lr?)"),
    ],
)
def test_set_typo_is_one_line_before_the_model_loads(tmp_path, monkeypatch, setting, needle):
    no_model_loads(monkeypatch)
    ds = kohya_folder(tmp_path / "ds")
    base = model_folder(tmp_path / "base")
    r = run(
        app, ["train", str(ds), "--base", str(base), "--output-dir", str(tmp_path / "out"), "--set", setting]
    )
    assert r.exit_code == 2, r.output
    one_line_error(r.output, needle)


def test_plan_uses_the_trigger_curate_tag_put_first(tmp_path):
    """`curate tag --trigger mychar` then `curate plan` (no --trigger): the plan pins the trigger
    (keep_tokens 1), prompts with it, names the LoRA after it and reads the set as a character, as the
    export and the trainer will; it said "keep_tokens 0: no trigger word" and suggested a style."""
    import tests.tiny_wd14 as tiny_wd14

    ds = tmp_path / "ds"
    for i in range(3):
        picture(ds / f"p{i}.png", 64, 64, i)
    model = tiny_wd14.build(tmp_path / "tagger")
    assert run(app, ["scan", str(ds)]).exit_code == 0
    r = run(app, ["tag", str(ds), "--model", str(model), "--trigger", "mychar"])
    assert r.exit_code == 0, r.output
    assert all((ds / f"p{i}.txt").read_text().startswith("mychar, ") for i in range(3))
    r = run(app, ["plan", str(ds), "--json", "--out", str(tmp_path / "train.toml")])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert (p["train"]["keep_tokens"], p["train"]["sample_prompts"]) == (1, ["mychar"]), p["train"]
    assert p["train"]["output_name"] == "mychar"
    assert p["suggestion"]["kind"] == "character", p["suggestion"]
    assert "curate tag" in p["reasons"]["keep_tokens"]
    # a trigger given to plan still wins
    r = run(app, ["plan", str(ds), "--json", "--trigger", "other", "--out", str(tmp_path / "t2.toml")])
    assert json.loads(r.stdout)["train"]["sample_prompts"] == ["other"]


@pytest.mark.parametrize("flag", [["--trigger", "zzz"], ["--class", "woman"]])
def test_trigger_on_a_folder_curate_never_scanned_is_one_line(tmp_path, monkeypatch, flag):
    """`curate train ./pics --trigger zzz` on a folder with no manifest trained without the trigger (the flag
    only reaches curate's export): now a one-line error with the two fixes, before any model loads."""
    no_model_loads(monkeypatch)
    for i in range(2):
        picture(tmp_path / "pics" / f"{i}.png", 64, 64, i)
    base = model_folder(tmp_path / "base")
    out = tmp_path / "out"
    r = run(app, ["train", str(tmp_path / "pics"), "--base", str(base), "--output-dir", str(out), *flag])
    assert r.exit_code == 2, r.output
    one_line_error(r.output, f"{flag[0]} applies to a curated dataset", "curate scan", f"5_{flag[1]}")
    assert not out.exists()


@pytest.mark.slow
def test_images_without_any_caption_are_named_in_a_warning(tmp_path, sd15_dir):  # noqa: F811
    """A plain folder of pictures, no caption files and no `N_name` folder: every image trains on an empty
    caption; the run says so (and --json lists it under warnings), with the fix."""
    pics = tmp_path / "pics"
    for i in range(2):
        picture(pics / f"{i}.png", 64, 64, i)
    (pics / "0.txt").write_text("a red square")
    r = run(app, ["train", str(pics), "--base", str(sd15_dir), "--output-dir", str(tmp_path / "out"),
                  "--json", *sets()])  # fmt: skip
    assert r.exit_code == 0, r.output
    warnings = json.loads(r.stdout)["warnings"]
    assert warnings == ["1 of 2 training images have no caption (no caption file, no class tokens from a "
                        "N_name folder): they train on an empty caption; run `curate tag` or add .txt files"]  # fmt: skip
    assert f"warning: {warnings[0]}" in r.stderr  # also said while it runs, before the model loads


def test_trigger_added_after_a_hand_edit_is_reported_with_the_fix(tmp_path):
    """tag, edit one caption by hand, then `curate tag --trigger abc`: the hand edit survives, and the run says
    that caption lacks the trigger (so the export leaves keep_tokens at 0) and how to add it; the suggested
    `curate edit --trigger abc --overwrite` does, with a backup, and the export then pins it."""
    import tomllib

    import tests.tiny_wd14 as tiny_wd14

    ds = tmp_path / "ds"
    for i in range(3):
        picture(ds / f"p{i}.png", 64, 64, i)
    model = tiny_wd14.build(tmp_path / "tagger")
    assert run(app, ["scan", str(ds)]).exit_code == 0
    assert run(app, ["tag", str(ds), "--model", str(model)]).exit_code == 0
    (ds / "p0.txt").write_text("my own words, blue dress")
    r = run(app, ["tag", str(ds), "--trigger", "abc", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["captions"]["lack_trigger"] == ["p0.png"]
    assert (ds / "p0.txt").read_text() == "my own words, blue dress"  # the hand edit survives
    r = run(app, ["tag", str(ds), "--trigger", "abc"])
    text = " ".join(r.output.split())
    assert "1 of 3 caption(s) do not start with the trigger 'abc' (p0.png)" in text, r.output
    assert "curate edit" in text and "--trigger abc --overwrite" in text
    r = run(app, ["edit", str(ds), "--trigger", "abc", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (ds / "p0.txt").read_text().strip() == "abc, my own words, blue dress"
    assert list((ds / ".curate" / "caption_backups").rglob("p0.txt"))
    r = run(app, ["export", str(ds), str(tmp_path / "exp"), "--format", "kohya"])
    assert r.exit_code == 0, r.output
    assert tomllib.loads((tmp_path / "exp" / "dataset.toml").read_text())["general"]["keep_tokens"] == 1


def test_caption_combine_later_reuses_the_stored_sentences(tmp_path, monkeypatch):
    """`curate caption DS --model ./blip --num-beams 1`, `curate tag`, then `curate caption DS --combine`: the
    sentences are stored, so no model runs; it said "captioner Salesforce/blip-image-captioning-large is not
    downloaded" (the default model, not the one used) and combined nothing."""
    import tests.tiny_blip as tiny_blip
    import tests.tiny_wd14 as tiny_wd14
    from curate.models import blip

    ds = tmp_path / "ds"
    for i in range(2):
        picture(ds / f"p{i}.png", 64, 64, i)
    captioner, tagger = tiny_blip.build(tmp_path / "blip"), tiny_wd14.build(tmp_path / "tagger")
    assert run(app, ["scan", str(ds)]).exit_code == 0
    r = run(app, ["caption", str(ds), "--model", str(captioner), "--num-beams", "1", "--max-length", "8"])
    assert r.exit_code == 0, r.output
    sentence = (ds / "p0.txt").read_text().strip()
    assert run(app, ["tag", str(ds), "--model", str(tagger), "--trigger", "zz"]).exit_code == 0

    def boom(*a, **k):
        raise AssertionError("the captioner was loaded again")

    monkeypatch.setattr(blip, "load_blip", boom)
    r = run(app, ["caption", str(ds), "--combine", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["run"]["cached"] == 2
    parts = (ds / "p0.txt").read_text().strip().split(", ")
    assert parts[0] == "zz" and sentence in parts and len(parts) > 2, parts


def test_lora_resize_never_replaces_an_existing_file_unasked(tmp_path):
    """`curate lora-resize a.safetensors --out b.safetensors` when b is another LoRA (an epoch file, an earlier
    resize): a one-line error, b untouched; --overwrite replaces it."""
    from tests.test_lora_resize import _lora

    src, other = _lora(tmp_path / "a.safetensors"), _lora(tmp_path / "b.safetensors", seed=1)
    before = other.read_bytes()
    r = run(app, ["lora-resize", str(src), "--rank", "2", "--out", str(other)])
    assert r.exit_code == 2, r.output
    one_line_error(r.output, f"{other} exists", "--overwrite")
    assert other.read_bytes() == before
    r = run(app, ["lora-resize", str(src), "--rank", "2", "--out", str(other), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert other.read_bytes() != before


def test_train_exports_at_the_resolution_it_trains(tmp_path, monkeypatch):
    """`curate train DS --base <SDXL>` on a curated dataset that never ran `curate bucket`: the export the run
    writes (OUTPUT/data/dataset.toml, usable with sd-scripts) says 1024 as the trainer does, without the
    "no `curate bucket` run: ... resolution 512" warning; --set resolution=768 exports 768."""
    import tomllib

    no_model_loads(monkeypatch)
    ds = scanned_pair(tmp_path, "mychar, tag{i}")
    base = model_folder(tmp_path / "sdxl", "StableDiffusionXLPipeline")
    out = tmp_path / "out"
    for extra, want in (([], 1024), (["--set", "resolution=768"], 768)):
        r = run(app, ["train", str(ds), "--base", str(base), "--output-dir", str(out), *extra])
        assert "the model was loaded" in str(r.exception), r.output  # the export came first
        assert "no `curate bucket` run" not in r.output, r.output
        toml = tomllib.loads((out / "data" / "dataset.toml").read_text())
        assert toml["datasets"][0]["resolution"] == want, toml


def test_caption_settings_given_to_train_reach_the_export(tmp_path, monkeypatch):
    """`curate train DS --set shuffle_caption=false --set flip_aug=true --set keep_tokens=2` on a curated
    dataset: the export's dataset TOML (which the trainer reads, and whose [general] wins over [train]) carries
    them; they were dropped for the export's own defaults (shuffle on, flip off, keep_tokens from the trigger)."""
    import tomllib

    no_model_loads(monkeypatch)
    ds = scanned_pair(tmp_path, "mychar, red, tag{i}")
    base = model_folder(tmp_path / "sd15")
    out = tmp_path / "out"
    args = ["train", str(ds), "--base", str(base), "--output-dir", str(out)]

    def general(*extra: str) -> dict:
        r = run(app, [*args, *extra])
        assert "the model was loaded" in str(r.exception), r.output
        return tomllib.loads((out / "data" / "dataset.toml").read_text())["general"]

    g = general()
    assert (g["shuffle_caption"], g["flip_aug"]) == (True, False)  # tag captions: the export's defaults
    g = general("--set", "shuffle_caption=false", "--set", "flip_aug=true", "--set", "keep_tokens=2")
    assert (g["shuffle_caption"], g["flip_aug"], g["keep_tokens"]) == (False, True, 2), g


def test_plan_for_another_family_names_the_plan_not_only_the_flag(tmp_path, monkeypatch):
    """`curate plan DS --model sdxl --out x.toml`, then `curate train DS --config x.toml --base <SD1.5>`: the one
    line said "drop --family", a flag the user never passed; it now names the TOML's model_family too."""
    no_model_loads(monkeypatch)
    ds = kohya_folder(tmp_path / "ds")
    assert run(app, ["scan", str(ds)]).exit_code == 0
    plan = tmp_path / "x.toml"
    assert run(app, ["plan", str(ds), "--model", "sdxl", "--out", str(plan)]).exit_code == 0
    base = model_folder(tmp_path / "sd15")
    r = run(
        app,
        ["train", str(ds), "--config", str(plan), "--base", str(base), "--output-dir", str(tmp_path / "o")],
    )
    assert r.exit_code == 2, r.output
    one_line_error(
        r.output, "but model_family is sdxl", "model_family from the training TOML", "--model sd15"
    )


def test_caption_edited_inside_the_training_export_is_not_replaced(tmp_path, monkeypatch):
    """A caption fixed by hand in OUTPUT/data (the export `curate train` made), then a change in the dataset
    that makes the next `curate train` re-export: the re-export would silently replace the fix, so it stops with
    one line naming the file and what to do; the fixed file is untouched."""
    no_model_loads(monkeypatch)
    ds = scanned_pair(tmp_path, "mychar, tag{i}")
    base = model_folder(tmp_path / "sd15")
    out = tmp_path / "out"
    args = ["train", str(ds), "--base", str(base), "--output-dir", str(out)]
    assert "the model was loaded" in str(run(app, args).exception)
    rec = json.loads((out / "data" / "curate_export.json").read_text())["images"]
    fixed = out / "data" / Path(next(r["file"] for r in rec if r["source"] == "p0.png")).with_suffix(".txt")
    fixed.write_text("mychar, fixed in the export")
    (ds / "p1.txt").write_text("mychar, changed in the dataset")
    r = run(app, args)
    assert r.exit_code == 2, r.output
    one_line_error(r.output, "edited in", "p0.png", "would replace")
    assert fixed.read_text() == "mychar, fixed in the export"


def test_block_dims_of_the_wrong_length_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """`--set block_dims=[1,2]` was refused only after the base model loaded and every latent was encoded; the
    UNet's config.json says how many blocks it has, so it is now refused first (13 for this tiny UNet)."""
    no_model_loads(monkeypatch)
    ds = kohya_folder(tmp_path / "ds")
    base = tmp_path / "base"
    (base / "unet").mkdir(parents=True)
    (base / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (base / "unet" / "config.json").write_text('{"block_out_channels": [32, 64], "layers_per_block": 2}')
    r = run(app, ["train", str(ds), "--base", str(base), "--output-dir", str(tmp_path / "o"),
                  "--set", "block_dims=[1,2]"])  # fmt: skip
    assert r.exit_code == 2, r.output
    one_line_error(r.output, "block_dims has 2 values; sd15 takes 13")
