"""New-user journeys across today's features: a kohya folder with a 0_bg/ folder through bucket, split, plan,
export and train (the 0 repeats warning the same everywhere), and the reasons `curate check` prints.
Folders are built in tmp_path and the CLI runs through typer's CliRunner."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from typer.testing import CliRunner

from curate.cli import app
from tests.images import textured
from tests.test_roundtrip_train import no_model_loads

run = CliRunner().invoke
ZERO = "0_bg/ has 0 repeats, so sd-scripts skips it"


def kohya_with_bg(root: Path) -> Path:
    """root/10_char/ (four 512x512 images, hand captions) and root/0_bg/ (two 768x512 images)."""
    for i in range(4):
        (root / "10_char").mkdir(parents=True, exist_ok=True)
        textured(512, 512, seed=i).save(root / "10_char" / f"c{i}.png")
        (root / "10_char" / f"c{i}.txt").write_bytes(f"char, pose{i}\r\n".encode())
    for i in range(2):
        (root / "0_bg").mkdir(exist_ok=True)
        textured(768, 512, seed=20 + i).save(root / "0_bg" / f"bg{i}.png")
        (root / "0_bg" / f"bg{i}.txt").write_text("background")
    return root


def cli(*args) -> str:
    r = run(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def flat(text: str) -> str:
    return " ".join(text.split())


def test_bucket_leaves_a_zero_repeat_folder_out_with_its_warning(tmp_path):
    """`curate bucket` is the preflight of sd-scripts' buckets: a 0_bg/ folder's images are not trained, so
    they are in no bucket of the report (their 640x384 bucket would be one of its own), and the report
    says so once, as plan and export do."""
    ds = kohya_with_bg(tmp_path / "ds")
    cli("scan", ds)
    rep = json.loads(cli("bucket", ds, "--json"))
    assert rep["buckets"] == [{"width": 512, "height": 512, "images": 4}]
    assert sorted(rep["images"]) == [f"10_char/c{i}.png" for i in range(4)]
    assert sum(ZERO in w for w in rep["warnings"]) == 1, rep["warnings"]
    assert "its 2 image(s) are left out" in next(w for w in rep["warnings"] if ZERO in w)
    assert not rep["small_buckets"]  # the two bg images made a lonely 640x384 bucket before
    text = flat(cli("bucket", ds))
    assert text.count(ZERO) == 1 and "4 images in 1 buckets" in text, text
    # the images are still bucketed in the manifest: renamed to 10_bg/ they train at once
    db = sqlite3.connect(ds / ".curate" / "manifest.db")
    rows = db.execute("select f.path, i.bucket_w from files f join images i using(sha256)").fetchall()
    assert {p: w for p, w in rows if p.startswith("0_bg")} == {"0_bg/bg0.png": 640, "0_bg/bg1.png": 640}


def test_plan_and_export_count_a_zero_repeat_folder_alike(tmp_path):
    """With one 0_bg/ image in validation (a split stored before split left 0_name folders out, or one moved
    there by hand), export leaves both out (train and val) and says 2; plan said 1 (it counted the training
    side only). Both name the folder's 2 kept images."""
    ds = kohya_with_bg(tmp_path / "ds")
    cli("scan", ds)
    cli("split", ds, "--val", "0.4", "--seed", "0")
    db = sqlite3.connect(ds / ".curate" / "manifest.db")
    sha = db.execute("select sha256 from files where path = '0_bg/bg1.png'").fetchone()[0]
    with db:
        db.execute("update images set split = 'val' where sha256 = ?", (sha,))
    plan = flat(cli("plan", ds, "--out", tmp_path / "train.toml"))
    export = flat(cli("export", ds, tmp_path / "out", "--format", "kohya"))
    for text in (plan, export):
        assert text.count(ZERO) == 1, text
        assert f"{ZERO}: its 2 image(s) are left out" in text, text
    assert not list((tmp_path / "out").rglob("bg*")) and not list((tmp_path / "out").glob("*/*_bg"))


def test_second_train_reusing_the_export_still_warns_about_0_bg(tmp_path, monkeypatch):
    """`curate train` twice on the same data: the second run reuses the export, and still says that 0_bg/ is
    left out (it printed nothing before, so the second run read as if every folder trained)."""
    no_model_loads(monkeypatch)  # the export (or its reuse) comes before the model: stop there
    ds = kohya_with_bg(tmp_path / "ds")
    cli("scan", ds)  # a curated dataset: train exports it into OUTPUT/data
    base = tmp_path / "base"
    base.mkdir()
    (base / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    out = tmp_path / "o"
    args = ["train", str(ds), "--base", str(base), "--output-dir", str(out), "--set", "resolution=64"]
    first = run(app, args)
    assert "exported 4 training" in flat(first.output), first.output
    second = run(app, args)
    assert "reusing the export" in second.output, second.output
    for r in (first, second):
        assert flat(r.output).count(ZERO) == 1, r.output
        assert isinstance(r.exception, AssertionError)  # reached the model load, after the warnings


def test_check_prints_no_negative_zero_and_names_each_fix(tmp_path):
    """A flat, dark image in a git-free folder: `curate check` gives each rule's fix, and a constant image's
    entropy reads 0.00 bits, not -0.00."""
    ds = tmp_path / "ds"
    ds.mkdir()
    from PIL import Image

    Image.new("RGB", (600, 600), (3, 3, 3)).save(ds / "flat.png")
    r = run(app, ["check", str(ds)])
    assert r.exit_code == 1, r.output
    text = flat(r.output.replace("│", " "))
    assert "-0.00" not in text, text
    assert "entropy 0.00 bits < 2.0" in text, text
    for key in ("min_entropy", "min_brightness"):
        assert f"lower {key} in [filter] of curate.toml" in text, (key, text)


def test_no_upscale_refusal_names_the_dataset_file_not_its_export_copy(tmp_path, monkeypatch):
    """A 40x300 image kept in a curated dataset, trained with --no-upscale: the one-line refusal names the
    person's file (ds/10_char/thin.png), the one to remove or enlarge, not the hashed copy in OUTPUT/data."""
    no_model_loads(monkeypatch)  # the refusal comes before any model loads
    ds = kohya_with_bg(tmp_path / "ds")
    textured(40, 300, seed=9).save(ds / "10_char" / "thin.png")
    cli("scan", ds)
    cli("keep", ds, ds / "10_char" / "thin.png")
    base = tmp_path / "base"
    base.mkdir()
    (base / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    out = tmp_path / "o"
    r = run(app, ["train", str(ds), "--base", str(base), "--output-dir", str(out), "--no-upscale"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    line = flat(next(ln for ln in r.output.split("\nerror:")[1:]))
    assert str(ds / "10_char" / "thin.png") in line and "(40x300)" in line, line
    assert str(out / "data") not in line, line


def test_plan_warns_about_a_reg_folder_inside_the_dataset_as_export_does(tmp_path):
    """ds/reg/1_person/ inside the dataset trains as training images (export warns): plan counts those images
    among its training images, so it gives the same warning, once."""
    ds = kohya_with_bg(tmp_path / "ds")
    for i in range(3):
        (ds / "reg" / "1_person").mkdir(parents=True, exist_ok=True)
        textured(512, 512, seed=30 + i).save(ds / "reg" / "1_person" / f"r{i}.png")
    cli("scan", ds)
    cli("split", ds, "--val", "0")
    inside = "3 image(s) under reg/ in the dataset are exported as training images"
    export = flat(cli("export", ds, tmp_path / "out", "--format", "kohya"))
    plan = json.loads(cli("plan", ds, "--json"))
    assert export.count(inside) == 1, export
    assert sum(inside in w for w in plan["warnings"]) == 1, plan["warnings"]
    text = flat(cli("plan", ds))
    assert text.count(inside) == 1 and "7 training images" in text, text  # 4 in 10_char + 3 under reg/


def test_a_kohya_folder_trained_as_is_reads_a_bom_caption_like_the_export(tmp_path, monkeypatch):
    """A kohya folder trained as it is (never scanned), shuffle_caption on, one caption saved with a UTF-8 BOM
    (Windows Notepad) and one with CRLF: every caption still starts with 'char', so it is pinned
    (keep_tokens = 1), as `curate export` (which drops the BOM) would pin it; before, the BOM made the first
    tag '\\ufeffchar' and the folder was left unpinned with a warning."""
    from trainer_bridge.data import read_caption

    no_model_loads(monkeypatch)
    ds = tmp_path / "ds"
    (ds / "10_char").mkdir(parents=True)
    for i, data in enumerate([b"\xef\xbb\xbfchar, red hair\n", b"char, smile\r\n", b"char, hat"]):
        textured(128, 128, seed=i).save(ds / "10_char" / f"c{i}.png")
        (ds / "10_char" / f"c{i}.txt").write_bytes(data)
    assert read_caption(ds / "10_char" / "c0.png", ".txt") == "char, red hair"
    base = tmp_path / "base"
    base.mkdir()
    (base / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    args = ["train", str(ds), "--base", str(base), "--output-dir", str(tmp_path / "o")]
    r = run(app, [*args, "--set", "shuffle_caption=true", "--set", "resolution=64"])
    text = flat(r.output)
    assert "10_char: every caption starts with 'char': keep_tokens = 1 there" in text, r.output
    assert "do not start with" not in text, r.output


def test_tag_with_a_trigger_reads_a_bom_caption_as_starting_with_it(tmp_path):
    """`curate tag --trigger char` over hand captions that all start with 'char', one saved with a UTF-8 BOM,
    and a 0_bg/ folder (left out of the export) whose caption does not: no exported caption lacks the trigger (the export pins it, keep_tokens = 1), so no warning says otherwise, and the
    caption stored for the image has no BOM."""
    from tests.tiny_wd14 import build

    model = build(tmp_path / "wd14")
    ds = tmp_path / "ds"
    (ds / "10_char").mkdir(parents=True)
    for i, data in enumerate([b"\xef\xbb\xbfchar, red hair\n", b"char, smile\r\n", b"char, hat"]):
        textured(256, 256, seed=i).save(ds / "10_char" / f"c{i}.png")
        (ds / "10_char" / f"c{i}.txt").write_bytes(data)
    (ds / "0_bg").mkdir()  # not exported (0 repeats): its caption pins nothing either way
    textured(256, 256, seed=7).save(ds / "0_bg" / "bg.png")
    (ds / "0_bg" / "bg.txt").write_text("background")
    cli("scan", ds)
    r = run(app, ["tag", str(ds), "--model", str(model), "--trigger", "char", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["captions"]["lack_trigger"] == []
    again = run(app, ["tag", str(ds), "--model", str(model), "--trigger", "char"])
    assert again.exit_code == 0 and "do not start with the trigger" not in flat(again.output), again.output
    db = sqlite3.connect(ds / ".curate" / "manifest.db")
    caps = sorted(c for (c,) in db.execute("select caption from images"))
    assert caps == ["background", "char, hat", "char, red hair", "char, smile"], caps
    assert (
        ds / "10_char" / "c0.txt"
    ).read_bytes() == b"\xef\xbb\xbfchar, red hair\n"  # the file is untouched
    cli("export", ds, tmp_path / "out", "--format", "kohya")
    assert "keep_tokens = 1" in (tmp_path / "out" / "dataset.toml").read_text()


def test_restore_says_why_a_caption_stayed_quarantined_and_where_it_is(tmp_path):
    """filter --apply quarantines a small image with its caption; the person writes a new caption in its
    place; restore brings the image back, keeps the new caption and leaves the old one quarantined: its
    `skipped` line says a file is already there and where the quarantined copy is (it said only
    "not restored: <path>")."""
    ds = kohya_with_bg(tmp_path / "ds")
    textured(100, 100, seed=5).save(ds / "10_char" / "tiny.png")
    (ds / "10_char" / "tiny.txt").write_bytes(b"char, tiny\r\n")
    cli("scan", ds)
    assert "moved 1 file(s) with 1 caption" in flat(cli("filter", ds, "--min-side", "150", "--apply"))
    (ds / "10_char" / "tiny.txt").write_text("my new caption")
    r = run(app, ["restore", str(ds)])
    assert r.exit_code == 1, r.output
    assert (ds / "10_char" / "tiny.png").is_file()
    assert (ds / "10_char" / "tiny.txt").read_text() == "my new caption"
    kept = ds / ".curate" / "quarantine" / "10_char" / "tiny.txt"
    assert kept.read_bytes() == b"char, tiny\r\n"
    line = flat(r.output)
    assert "skipped 10_char/tiny.txt: a file is already there (left as it is)" in line, r.output
    assert ".curate/quarantine/10_char/tiny.txt" in line, r.output


def test_split_deals_no_zero_repeat_folder_image_into_validation(tmp_path):
    """A 0_bg/ folder is never trained or validated on (export leaves it out of both): split deals only the
    other images, so a --val 0.25 of 10_char's 4 images is 1 image, not a share taken by 0_bg/ images that
    then vanish from dataset_val.toml. The summary says the folder was left out."""
    ds = kohya_with_bg(tmp_path / "ds")
    for i in range(2, 6):
        textured(768, 512, seed=20 + i).save(ds / "0_bg" / f"bg{i}.png")
    cli("scan", ds)
    db = sqlite3.connect(ds / ".curate" / "manifest.db")
    for seed in range(4):
        res = json.loads(cli("split", ds, "--val", "0.25", "--seed", seed, "--json"))
        sides = dict(db.execute("select f.path, i.split from files f join images i using(sha256)").fetchall())
        assert {p: s for p, s in sides.items() if p.startswith("0_bg")} == {
            f"0_bg/bg{i}.png": "train" for i in range(6)
        }
        assert sum(s == "val" for p, s in sides.items() if p.startswith("10_char")) == 1, (seed, sides)
        assert (res["train"], res["val"]) == (3, 1), res
    assert any(ZERO in n for n in res["notes"]), res
    assert flat(cli("split", ds, "--val", "0.25")).count(ZERO) == 1
