"""Export round trips (issue 11): concept folders, copies not links, reg sets, re-export on change, defaults.

Each test builds a folder in tmp_path, runs the CLI (or `curate train`'s data step) and checks what reached
the exported files and TOMLs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

from curate.cli import app
from curate.dataset import Dataset
from curate.manifest import ImageRecord
from tests.images import textured
from tests.test_export import validate_sd_scripts_config

runner = CliRunner()
USER_CAPTIONS = "user_caption" in {f.name for f in dataclasses.fields(ImageRecord)}  # task A's scan


def _cli(*args: object) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix != ".txt")


CONCEPTS = {"5_alice woman": 6, "20_bob man": 5}


def _kohya_dataset(root: Path, seed: int = 0) -> dict[str, str]:
    """Two concept folders with hand-written captions plus one loose image; file sha256 -> caption text."""
    captions = {}
    k = seed * 100
    for folder, n in CONCEPTS.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            k += 1
            path = root / folder / f"p{i}.png"
            textured(640 if i % 2 else 512, 512, seed=k).save(path)
            text = f"{folder.split('_')[1].split()[0]} at the beach, picture {i}"
            path.with_suffix(".txt").write_text(text + "\n", "utf-8")
            captions[_sha(path)] = text
    textured(512, 640, seed=k + 1).save(root / "loose.png")
    return captions


def _subsets(toml_path: Path) -> dict[str, dict]:
    cfg = tomllib.loads(toml_path.read_text("utf-8"))
    validate_sd_scripts_config(cfg)
    subs = cfg["datasets"][0]["subsets"]
    return {str(Path(s["image_dir"]).relative_to(toml_path.parent)): s for s in subs}


def test_two_concept_kohya_folder_keeps_concepts_repeats_and_class_tokens(tmp_path):
    ds, out = tmp_path / "DS", tmp_path / "OUT"
    user_caps = _kohya_dataset(ds)
    code, log = _cli("run", ds, "--out", out, "--trigger", "zz", "--val", "0.2")
    assert code == 0, log
    train = _subsets(out / "dataset.toml")
    record = json.loads((out / "curate_export.json").read_text("utf-8"))
    by_sha = {m["sha256"]: m for m in record["images"]}
    loose = by_sha[_sha(ds / "loose.png")]  # outside any concept folder: --repeats 10, trigger as class
    assert loose["subset"] == ("img/10_zz" if loose["split"] == "train" else "val/1_zz")
    assert set(train) == {"img/5_alice woman", "img/20_bob man"} | (
        {"img/10_zz"} if loose["split"] == "train" else set()
    )
    assert (train["img/5_alice woman"]["num_repeats"], train["img/5_alice woman"]["class_tokens"]) == (
        5,
        "alice woman",
    )
    assert (train["img/20_bob man"]["num_repeats"], train["img/20_bob man"]["class_tokens"]) == (
        20,
        "bob man",
    )
    if "img/10_zz" in train:
        assert (train["img/10_zz"]["num_repeats"], train["img/10_zz"]["class_tokens"]) == (10, "zz")
    val = _subsets(out / "dataset_val.toml")
    assert val and all(k.startswith("val/1_") and s["num_repeats"] == 1 for k, s in val.items())
    # Every concept image lands in its own concept's folder (train or val), none is lost or moved.
    for folder, n in CONCEPTS.items():
        shas = {_sha(p) for p in (ds / folder).glob("*.png")}
        assert len(shas) == n
        for sha in shas:
            m = by_sha[sha]
            want = f"img/{folder}" if m["split"] == "train" else f"val/1_{folder.split('_', 1)[1]}"
            assert m["subset"] == want and (out / m["file"]).is_file()
            caption = (out / m["file"]).with_suffix(".txt").read_text("utf-8").strip()
            assert caption == m["caption"] and caption.startswith("zz")
            if USER_CAPTIONS:  # the user's caption, trigger prepended (task A's scan reads .txt files)
                assert caption == f"zz, {user_caps[sha]}"
            else:  # kohya's fallback: trigger + the concept's class tokens
                assert caption == f"zz {folder.split('_', 1)[1]}"
    assert sum(len(_images(out / k)) for k in [*train, *val]) == 12

    # `curate export` with a class word: loose images get it, concepts keep theirs; captions reach the files.
    with Dataset.open(ds, create=False) as d:
        alice = [r for r in d.kept() if r.path.startswith("5_alice woman/")]
        for i, r in enumerate(alice):  # a hand edit of their caption files (the person's text wins)
            d.set_caption(r.path, f"alice smiling {i}")
        alice_caps = {r.sha256: f"zz, alice smiling {i}" for i, r in enumerate(alice)}
        d.manifest.update_images([(loose["sha256"], {"split": "train"})])
    out2 = tmp_path / "OUT2"
    code, log = _cli("export", ds, out2, "--trigger", "zz", "--class", "person", "--repeats", "3")
    assert code == 0, log
    train2 = _subsets(out2 / "dataset.toml")
    assert set(train2) == {"img/5_alice woman", "img/20_bob man", "img/3_zz person"}
    assert train2["img/3_zz person"]["class_tokens"] == "zz person"
    assert train2["img/5_alice woman"]["class_tokens"] == "alice woman"
    record2 = json.loads((out2 / "curate_export.json").read_text("utf-8"))
    for m in record2["images"]:
        if m["sha256"] in alice_caps:
            assert (out2 / m["file"]).with_suffix(".txt").read_text("utf-8") == alice_caps[m["sha256"]] + "\n"


def test_export_copies_so_in_place_edits_leave_the_sources_alone(tmp_path):
    ds = tmp_path / "DS"
    _kohya_dataset(ds)
    outside = tmp_path / "elsewhere.png"
    textured(512, 512, seed=999).save(outside)
    (ds / "linked.png").symlink_to(outside)
    before = {p: _sha(p) for p in ds.rglob("*.png")}
    assert _cli("scan", ds)[0] == 0
    out = tmp_path / "OUT"
    code, log = _cli("export", ds, out, "--trigger", "zz", "--json")
    assert code == 0, log
    res = json.loads(log)
    assert res["linked"] == 0 and res["copied"] + res["reflinked"] == 13
    record = json.loads((out / "curate_export.json").read_text("utf-8"))
    for m in record["images"]:
        dest, src = out / m["file"], ds / m["source"]
        assert not dest.is_symlink() and os.stat(dest).st_ino != os.stat(src).st_ino
        assert _sha(dest) == m["sha256"]
        with open(dest, "r+b") as fh:  # what a batch resize would do to the exported file
            fh.seek(0)
            fh.write(b"\0" * 64)
    assert {p: _sha(p) for p in ds.rglob("*.png")} == before
    assert _sha(outside) == before[ds / "linked.png"]

    # Links only on request, with a warning naming the consequence; they are real links then.
    code, log = _cli("export", ds, tmp_path / "HARD", "--link", "hard")
    assert code == 0, log
    assert "warning:" in log and "changes the original" in " ".join(log.split())
    hard = json.loads((tmp_path / "HARD" / "curate_export.json").read_text("utf-8"))
    m = next(m for m in hard["images"] if m["source"].startswith("5_alice"))
    assert os.stat(tmp_path / "HARD" / m["file"]).st_ino == os.stat(ds / m["source"]).st_ino
    code, log = _cli("export", ds, tmp_path / "BAD", "--link", "soft")
    assert code == 2 and "unknown --link" in log and len(log.strip().splitlines()) == 1


def test_reg_folder_exports_as_is_reg_subsets(tmp_path):
    ds, reg, out = tmp_path / "DS", tmp_path / "REG", tmp_path / "OUT"
    _kohya_dataset(ds)
    (reg / "3_man").mkdir(parents=True)
    for i in range(4):
        textured(512, 512, seed=500 + i).save(reg / f"r{i}.jpg", quality=90)
    textured(512, 768, seed=600).save(reg / "3_man" / "m0.png")
    (reg / "3_man" / "m0.txt").write_text("a photo of a man\n", "utf-8")
    (reg / "notes.jpg").write_bytes(b"not an image")
    reg_before = {p: _sha(p) for p in reg.rglob("*") if p.is_file()}
    code, log = _cli("run", ds, "--out", out, "--trigger", "zz", "--reg", reg)
    assert code == 0, log
    subs = _subsets(out / "dataset.toml")
    assert subs["reg/1_reg"]["is_reg"] is True and subs["reg/3_man"]["is_reg"] is True
    assert subs["reg/3_man"]["num_repeats"] == 3 and subs["reg/3_man"]["class_tokens"] == "man"
    assert all("is_reg" not in s for k, s in subs.items() if k.startswith("img/"))
    assert len(_images(out / "reg" / "1_reg")) == 4
    (m0,) = _images(out / "reg" / "3_man")
    assert (
        _sha(m0) == reg_before[reg / "3_man" / "m0.png"]
        and m0.stat().st_ino != (reg / "3_man" / "m0.png").stat().st_ino
    )
    assert m0.with_suffix(".txt").read_text("utf-8") == "a photo of a man\n"
    assert "is_reg" not in (out / "dataset_val.toml").read_text("utf-8")  # sd-scripts never validates on reg
    record = json.loads((out / "curate_export.json").read_text("utf-8"))
    assert len(record["reg"]) == 5 and {s["dir"] for s in record["subsets"] if s["is_reg"]} == {
        "reg/1_reg",
        "reg/3_man",
    }

    # With --class, loose reg images carry it; bad folders are one-line errors.
    code, log = _cli("export", ds, tmp_path / "OUT2", "--reg", reg, "--class", "woman", "--json")
    assert code == 0, log
    assert json.loads(log)["reg"] == 5 and "not readable images" in " ".join(json.loads(log)["warnings"])
    assert _subsets(tmp_path / "OUT2" / "dataset.toml")["reg/1_woman"]["class_tokens"] == "woman"
    for bad, msg in ((tmp_path / "nope", "does not exist"), (ds / "5_alice woman", "inside the dataset")):
        code, log = _cli("export", ds, tmp_path / "OUT3", "--reg", bad)
        assert code == 2 and msg in log and len(log.strip().splitlines()) == 1, log
    code, log = _cli("export", ds, tmp_path / "OUT3", "--reg", reg, "--format", "diffusers")
    assert code == 2 and "--format kohya" in log
    assert not (tmp_path / "OUT3").exists()
    assert {p: _sha(p) for p in reg.rglob("*") if p.is_file()} == reg_before


def _train_data(capsys, ds: Path, out: Path, trigger: str | None = "zz", reg: Path | None = None) -> str:
    from curate.commands.train import _training_data

    capsys.readouterr()
    toml = _training_data(ds, out, 10, trigger, None, reg)
    assert Path(toml) == out / "data" / "dataset.toml"
    return " ".join(capsys.readouterr().out.split())


def test_train_reuses_an_unchanged_export_and_re_exports_any_change(tmp_path, capsys):
    ds, runs = tmp_path / "DS", tmp_path / "runs"
    _kohya_dataset(ds)
    assert _cli("run", ds)[0] == 0
    assert "exported" in _train_data(capsys, ds, runs)
    data = runs / "data"
    first = json.loads((data / "curate_export.json").read_text("utf-8"))
    assert len(first["fingerprint"]) == 64 and first["version"] >= 2
    assert f"reusing the export in {data} (unchanged)" in _train_data(capsys, ds, runs)

    # A caption changes: re-exported, the new caption is in the files.
    with Dataset.open(ds, create=False) as d:
        rec = next(r for r in d.kept() if r.split != "val")
    (ds / rec.path).with_suffix(".txt").write_text("brand new caption\n", "utf-8")  # a hand edit
    assert "re-exported: 1 image(s) changed" in _train_data(capsys, ds, runs)
    rec_file = next(
        m
        for m in json.loads((data / "curate_export.json").read_text())["images"]
        if m["sha256"] == rec.sha256
    )
    assert (data / rec_file["file"]).with_suffix(".txt").read_text("utf-8") == "zz, brand new caption\n"

    # An image is rejected: it leaves the export.
    with Dataset.open(ds, create=False) as d:
        gone = next(r for r in d.kept() if r.sha256 != rec.sha256)
        d.manifest.set_rejects("filter", {gone.path: ("blurry", "test")})
    assert "re-exported: 1 image(s) changed" in _train_data(capsys, ds, runs)
    shas = {m["sha256"] for m in json.loads((data / "curate_export.json").read_text())["images"]}
    assert gone.sha256 not in shas and len(shas) == 11
    assert not any(_sha(p) == gone.sha256 for p in data.rglob("*.png"))

    # The trigger changes: every caption and folder changes.
    log = _train_data(capsys, ds, runs, trigger="qq")
    assert "re-exported: 11 image(s) changed, options changed: trigger" in log
    texts = [p.read_text("utf-8") for p in data.rglob("*.txt")]
    assert len(texts) == 11 and all(t.startswith("qq") and "zz" not in t for t in texts)
    assert "reusing" in _train_data(capsys, ds, runs, trigger="qq")
    # A new image in the folder: the scan finds it, the export follows.
    textured(512, 512, seed=4242).save(ds / "20_bob man" / "new.png")
    assert "re-exported: 1 image(s) changed" in _train_data(capsys, ds, runs, trigger="qq")
    # Only the swapped-in export remains: no staging or old folders beside it.
    assert sorted(p.name for p in runs.iterdir()) == ["data"]


def test_train_data_never_replaces_a_folder_curate_did_not_write(tmp_path, capsys):
    ds, runs = tmp_path / "DS", tmp_path / "runs"
    _kohya_dataset(ds)
    assert _cli("run", ds)[0] == 0
    (runs / "data").mkdir(parents=True)
    (runs / "data" / "mine.txt").write_text("user data")
    from curate.commands.train import _training_data
    from curate.errors import CurateError

    with pytest.raises(CurateError, match="not a curate export"):
        _training_data(ds, runs, 10, None, None)
    assert (runs / "data" / "mine.txt").read_text() == "user data"


@pytest.mark.skipif(not USER_CAPTIONS, reason="needs user captions from the scan (task A)")
def test_train_re_exports_after_a_hand_edited_caption_file(tmp_path, capsys):
    ds, runs = tmp_path / "DS", tmp_path / "runs"
    _kohya_dataset(ds)
    assert _cli("run", ds)[0] == 0
    _train_data(capsys, ds, runs)
    txt = ds / "5_alice woman" / "p0.txt"
    txt.write_text("alice in the rain\n", "utf-8")
    assert "re-exported: 1 image(s) changed" in _train_data(capsys, ds, runs)
    sha = _sha(txt.with_suffix(".png"))
    m = next(
        m
        for m in json.loads((runs / "data" / "curate_export.json").read_text())["images"]
        if m["sha256"] == sha
    )
    assert m["caption"] == "zz, alice in the rain"


def test_bucket_defaults_and_sd_scripts_rules(tmp_path):
    ds = tmp_path / "DS"
    _kohya_dataset(ds)
    assert _cli("scan", ds)[0] == 0
    code, log = _cli("bucket", ds, "--json")
    assert code == 0, log
    s = json.loads(log)["settings"]
    assert (s["family"], s["resolution"], s["min_size"], s["max_size"], s["step"]) == (
        "sd15",
        512,
        256,
        1024,
        64,
    )
    code, log = _cli("bucket", ds, "--model", "sdxl", "--step", "32", "--json")
    assert code == 0, log
    s = json.loads(log)["settings"]
    assert (s["resolution"], s["max_size"], s["step"]) == (1024, 2048, 32)
    for args, msg in (
        (["--min", "768"], "at most the resolution"),
        (["--resolution", "768", "--max", "512"], "at least"),
        (["--min", "200"], "not a multiple of --step"),
        (["--step", "32"], "divisible by 64"),  # sd-scripts' train_network.py (SD1.5) checks % 64
        (["--step", "60"], "multiple of 8"),
        (["--model", "sd14"], "unknown --model"),
    ):
        code, log = _cli("bucket", ds, *args)
        assert code == 2 and msg in log, (args, log)
        assert log.startswith("error:") and len(log.strip().splitlines()) == 1, log
    # The export writes what the last bucket run chose, valid for sd-scripts.
    assert _cli("bucket", ds, "--resolution", "768")[0] == 0
    assert _cli("export", ds, tmp_path / "OUT")[0] == 0
    cfg = tomllib.loads((tmp_path / "OUT" / "dataset.toml").read_text("utf-8"))
    validate_sd_scripts_config(cfg)
    d0 = cfg["datasets"][0]
    assert (d0["resolution"], d0["min_bucket_reso"], d0["max_bucket_reso"]) == (768, 256, 1536)
    # The plan records the family and the resolution it trains at.
    code, log = _cli("plan", ds, "--out", tmp_path / "train.toml")
    assert code == 0, log
    train = tomllib.loads((tmp_path / "train.toml").read_text("utf-8"))["train"]
    assert (train["model_family"], train["resolution"]) == ("sd15", 768)
    code, log = _cli("plan", ds, "--model", "sdxl", "--out", tmp_path / "xl.toml")
    assert code == 0, log
    train = tomllib.loads((tmp_path / "xl.toml").read_text("utf-8"))["train"]
    assert (train["model_family"], train["resolution"]) == ("sdxl", 1024)
