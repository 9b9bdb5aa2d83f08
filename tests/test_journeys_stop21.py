"""New-user journeys over the features merged on stop 21: what a person types, and the one line they get back.

Folders are built in tmp_path; the CLI runs through typer's CliRunner. No model is loaded: every error here
must come before the trainer touches the base model (tests/test_roundtrip_train.py's ``no_model_loads``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curate.cli import app
from tests.test_roundtrip_train import TINY, no_model_loads, one_line_error, picture
from tests.trainer_fixtures import sd15_dir  # noqa: F401  (pytest fixture)

TINY_STEP = [*TINY, "max_steps=1"]  # one optimizer step: enough to write the LoRA and its metadata


def kohya_folder(root: Path) -> Path:
    """root/10_mychar/ with two pictures and hand-written captions, as a kohya user has it."""
    for i in range(2):
        picture(root / "10_mychar" / f"img{i}.png", 64, 64, i)
        (root / "10_mychar" / f"img{i}.txt").write_text(f"mychar, handtag{i}")
    return root


# each --set value a person might mistype, and the words the one-line error must name
BAD_SETS = [
    ("batch_size=0", "batch_size must be >= 1"),
    ("grad_accum=0", "grad_accum must be >= 1"),
    ("network_dim=0", "network_dim must be >= 1"),
    ("epochs=-1", "epochs must be >= 1"),
    ("epochs=0", "epochs must be >= 1"),
    ("max_steps=-5", "max_steps must be >= 0"),
    ("num_repeats=0", "num_repeats must be >= 1"),
    ("log_every_n_steps=0", "log_every_n_steps must be >= 1"),
    ("unet_lr=-1e-4", "unet_lr must be >= 0"),
    ("caption_dropout=1.5", "caption_dropout must be in [0, 1]"),
    ("save_precision='fp64'", "save_precision must be fp16, bf16 or fp32"),
]


@pytest.mark.parametrize(("setting", "needle"), BAD_SETS, ids=[s for s, _ in BAD_SETS])
def test_train_bad_set_value_is_one_line_before_the_model_loads(tmp_path, monkeypatch, setting, needle):
    no_model_loads(monkeypatch)
    ds = kohya_folder(tmp_path / "ds")
    base = tmp_path / "base"  # looks like a diffusers SD1.5 folder; loading it fails the test
    base.mkdir()
    (base / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    r = CliRunner().invoke(app, ["train", str(ds), "--base", str(base), "--output-dir",
                                 str(tmp_path / "out"), "--set", setting])  # fmt: skip
    assert r.exit_code == 2, (setting, r.output, r.exception)
    one_line_error(r.output, needle)
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def test_train_epochs_zero_is_fine_when_max_steps_caps_the_run():
    """max_steps > 0 decides the length; epochs is then not used, so 0 there is no mistake."""
    from trainer_bridge import TrainConfig

    assert TrainConfig(epochs=0, max_steps=3).max_steps == 3


def scanned(root: Path) -> Path:
    ds = kohya_folder(root)
    r = CliRunner().invoke(app, ["scan", str(ds)])
    assert r.exit_code == 0, r.output
    return ds


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_review_port_out_of_range_is_one_line(tmp_path, port):
    ds = scanned(tmp_path / "ds")
    r = CliRunner().invoke(app, ["review", str(ds), "--no-open", "--port", port])
    assert r.exit_code == 2, (r.output, r.exception)
    one_line_error(r.output, f"--port {port}", "0-65535")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0"])
def test_tag_unknown_device_is_one_line_with_the_onnx_tagger(tmp_path, device):
    """The ONNX tagger used to take any --device and quietly run on the CPU."""
    from tests import tiny_wd14

    ds = scanned(tmp_path / "ds")
    model = tiny_wd14.build(tmp_path / "wd14")
    for extra in (["--explain-device"], []):
        r = CliRunner().invoke(app, ["tag", str(ds), "--model", str(model), "--device", device, *extra])
        assert r.exit_code == 2, (extra, r.output, r.exception)
        one_line_error(r.output, f"--device {device!r}", "auto, cpu, cuda or cuda:N")
    # the same device in curate.toml is caught as well, and `cpu` there runs
    (ds / "curate.toml").write_text(f'[tag]\ndevice = "{device}"\n')
    r = CliRunner().invoke(app, ["tag", str(ds), "--model", str(model)])
    assert r.exit_code == 2, (r.output, r.exception)
    (ds / "curate.toml").write_text('[tag]\ndevice = "cpu"\n')
    r = CliRunner().invoke(app, ["tag", str(ds), "--model", str(model), "--json"])
    assert r.exit_code == 0, r.output


def test_train_output_dir_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    """--output-dir naming an existing file: one line, before the export or the model; the file is untouched."""
    no_model_loads(monkeypatch)
    ds = kohya_folder(tmp_path / "ds")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    # a kohya folder, and a curated dataset exported on the fly
    for src in (ds, scanned(tmp_path / "curated")):
        r = CliRunner().invoke(
            app, ["train", str(src), "--base", str(tmp_path / "base"), "--output-dir", str(taken)]
        )
        assert r.exit_code == 2, (r.output, r.exception)
        one_line_error(r.output, f"output_dir {taken} is a file")
    assert taken.read_text() == "mine"


def test_tag_trigger_stays_pinned_in_the_export_without_repeating_it(tmp_path):
    """`curate tag --trigger mychar` then `curate export`: the captions start with mychar and shuffle, so the
    dataset TOML must keep that first token (keep_tokens = 1), as `--trigger` on export does."""
    import tomllib

    from tests import tiny_wd14

    ds = tmp_path / "ds"
    for i in range(3):
        picture(ds / f"p{i}.png", 64, 64, i)
    model = tiny_wd14.build(tmp_path / "wd14")
    run = CliRunner().invoke
    assert run(app, ["scan", str(ds)]).exit_code == 0
    r = run(app, ["tag", str(ds), "--model", str(model), "--trigger", "mychar", "--threshold", "0.05"])
    assert r.exit_code == 0, r.output
    r = run(app, ["export", str(ds), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    caps = [p.read_text().strip() for p in sorted((tmp_path / "out" / "img").rglob("*.txt"))]
    assert len(caps) == 3 and all(c.split(", ")[0] == "mychar" and c.count(",") >= 1 for c in caps), caps
    doc = tomllib.loads((tmp_path / "out" / "dataset.toml").read_text())
    assert doc["general"]["shuffle_caption"] is True
    assert doc["general"]["keep_tokens"] == 1
    # the pin is part of the export's fingerprint: with the same captions but no tagged trigger recorded,
    # `curate train` must not reuse an export that pins a token
    from curate import Dataset
    from curate.export.fingerprint import export_fingerprint

    with Dataset.open(ds) as d:
        pinned = export_fingerprint(d.manifest)
        was = d.manifest.get_meta("caption.trigger")
        d.manifest.set_meta("caption.trigger", "[]")
        d.manifest.commit()
        assert export_fingerprint(d.manifest) != pinned
        d.manifest.set_meta("caption.trigger", was)
        d.manifest.commit()
        assert export_fingerprint(d.manifest) == pinned
    # a caption edited by hand so that it no longer starts with the trigger: nothing is pinned then
    src = sorted(ds.glob("*.txt"))[0]
    src.write_text("a hand caption, no trigger first")
    r = run(app, ["export", str(ds), str(tmp_path / "out2")])
    assert r.exit_code == 0, r.output
    assert tomllib.loads((tmp_path / "out2" / "dataset.toml").read_text())["general"]["keep_tokens"] == 0


@pytest.mark.slow
def test_lora_metadata_says_how_captions_were_really_shuffled(tmp_path, sd15_dir):  # noqa: F811
    """The dataset TOML shuffles and pins one token (what `curate export` writes after a tagged trigger); the
    LoRA's ss_shuffle_caption / ss_keep_tokens / ss_flip_aug must say so, not the [train] defaults."""
    from trainer_bridge.export import load_lora

    img = tmp_path / "img" / "3_mychar"
    for i in range(2):
        picture(img / f"{i}.png", 64, 64, i)
        (img / f"{i}.txt").write_text(f"mychar, tag{i}, red")
    toml = tmp_path / "dataset.toml"
    toml.write_text(
        '[general]\nshuffle_caption = true\nkeep_tokens = 1\nflip_aug = true\ncaption_extension = ".txt"\n'
        f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{img}"\nnum_repeats = 3\n'
    )
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["train", str(toml), "--base", str(sd15_dir), "--output-dir", str(out),
                                 *(a for s in TINY_STEP for a in ("--set", s))])  # fmt: skip
    assert r.exit_code == 0, r.output
    meta = load_lora(out / "lora.safetensors")[1]
    assert (meta["ss_shuffle_caption"], meta["ss_keep_tokens"], meta["ss_flip_aug"]) == ("True", "1", "True")
    assert json.loads(meta["ss_tag_frequency"]) == {"3_mychar": {"mychar": 2, "tag0": 1, "tag1": 1, "red": 2}}


def test_reg_folder_inside_the_dataset_is_named_in_a_warning(tmp_path):
    """kohya users keep `reg/1_woman/` beside `10_mychar/`; inside the dataset those become training images,
    so the export says so, with the fix (move it out, pass --reg), and --reg on the moved folder works."""
    ds = kohya_folder(tmp_path / "ds")
    for i in range(2):
        picture(ds / "reg" / "1_woman" / f"r{i}.png", 64, 64, 10 + i)
    run = CliRunner().invoke
    assert run(app, ["scan", str(ds)]).exit_code == 0
    r = run(app, ["export", str(ds), str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    warns = [w for w in json.loads(r.stdout)["warnings"] if "reg/" in w]
    assert len(warns) == 1 and "2 image(s)" in warns[0] and "--reg" in warns[0], warns
    # without reg/ inside, no such warning: a plain 10_mychar dataset
    ds2 = kohya_folder(tmp_path / "ds2")
    assert run(app, ["scan", str(ds2)]).exit_code == 0
    r = run(app, ["export", str(ds2), str(tmp_path / "out2"), "--json"])
    assert r.exit_code == 0 and not [w for w in json.loads(r.stdout)["warnings"] if "--reg" in w], r.output


@pytest.mark.parametrize("cmd", ["plan", "report"])
def test_out_path_through_a_file_is_one_line(tmp_path, cmd):
    """--out under a path whose folder is really a file (a typo): one line naming it; the file stays."""
    ds = scanned(tmp_path / "ds")
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    for out in (taken / "x.out", taken / "deeper" / "x.out"):
        r = CliRunner().invoke(app, [cmd, str(ds), "--out", str(out)])
        assert r.exit_code == 2, (out, r.output, r.exception)
        one_line_error(r.output, str(taken), "is a file")
    assert taken.read_text() == "mine"


def test_tag_decode_gpu_on_ray_is_refused_before_ray_starts(tmp_path, monkeypatch):
    """--engine ray decodes on the actors' CPUs: --decode gpu there was ignored without a word."""
    from curate.engine import ray_engine
    from tests import tiny_wd14

    def no_ray(*a, **k):
        raise AssertionError("Ray was started before the error")

    monkeypatch.setattr(ray_engine, "tag_runner", no_ray)
    ds = scanned(tmp_path / "ds")
    model = tiny_wd14.build(tmp_path / "wd14")
    r = CliRunner().invoke(app, ["tag", str(ds), "--model", str(model), "--engine", "ray", "--decode", "gpu"])
    assert r.exit_code == 2, (r.output, r.exception)
    one_line_error(r.output, "--decode gpu", "--engine local")


def test_negative_max_tags_is_refused(tmp_path):
    """--max-tags -1 used to be taken as 'no cap' without a word; a count below 0 is a usage error."""
    ds = tmp_path / "ds"
    picture(ds / "a.png", 64, 64, 0)
    r = CliRunner().invoke(app, ["edit", str(ds), "--max-tags", "-1"])
    assert r.exit_code == 2 and "--max-tags" in r.output and "Traceback" not in r.output, r.output
