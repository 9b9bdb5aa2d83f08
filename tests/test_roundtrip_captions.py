"""The user's captions, hand edits and per-image decisions survive scan -> tag -> edit -> export -> train.

Every test is a journey through the CLI on a folder built here; the checks read what reached the exported
caption files, the manifest and the trained LoRA's metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tests.tiny_wd14 as tiny_wd14
from curate import Dataset
from curate.cli import app
from tests.images import jpeg_bytes, textured

runner = CliRunner()

CAPTIONS = {
    "a0": "red hair, smile, outdoors",
    "a1": "red hair, smile, indoors",
    "a2": "red hair, sitting",
    "a3": "red hair, smile, hat",
    "a4": "a photo of alice in the park",
    "a5": "red hair, smile",
}


def _cli(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _exported(out: Path) -> dict[str, str | None]:
    """source sha256 -> caption text of every exported image (images are exported as their own bytes)."""
    found = {}
    for img in out.rglob("*"):
        if img.suffix.lower() in (".png", ".jpg", ".webp") and img.is_file():
            cap = img.with_suffix(".txt")
            found[_sha(img)] = cap.read_text(encoding="utf-8").strip() if cap.exists() else None
    return found


def _kohya_folder(root: Path) -> dict[str, Path]:
    """A kohya-style folder with hand-written .txt captions; returns stem -> image path."""
    sub = root / "5_alice woman"
    sub.mkdir(parents=True)
    imgs = {}
    for i, (stem, text) in enumerate(CAPTIONS.items()):
        p = sub / f"{stem}.png"
        textured(512, 512, seed=20 + i).save(p)
        (sub / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
        imgs[stem] = p
    return imgs


def test_hand_written_captions_reach_every_export(tmp_path):
    ds = tmp_path / "ds"
    imgs = _kohya_folder(ds)
    by_sha = {_sha(p): stem for stem, p in imgs.items()}
    code, out = _cli("run", ds, "--out", tmp_path / "out", "--trigger", "zz", "--model", "sd15")
    assert code == 0, out
    got = _exported(tmp_path / "out")
    assert {by_sha[s] for s in got} == set(CAPTIONS)
    for sha, text in got.items():
        assert text == f"zz, {CAPTIONS[by_sha[sha]]}"

    code, out = _cli("export", ds, tmp_path / "out2")
    assert code == 0, out
    got = _exported(tmp_path / "out2")
    assert {by_sha[s]: t for s, t in got.items()} == CAPTIONS

    code, out = _cli("tags", ds, "--json")
    assert code == 0, out
    st = json.loads(out)
    freq = {t: n for t, n, _ in st["frequency"]}
    assert st["user_captions"] == 6 and st["tagged"] == 6
    assert freq["red hair"] == 5 and freq["smile"] == 4 and freq["hat"] == 1
    assert len(st["tokens"]) == 6

    code, out = _cli("check", ds, "--rule", "captions")
    assert code == 0, out
    (ds / "5_alice woman" / "a2.txt").unlink()
    (ds / "5_alice woman" / "a3.txt").write_text("", encoding="utf-8")  # kohya refuses empty captions
    code, out = _cli("check", ds, "--rule", "captions", "--json")
    assert code == 1
    v = {(x["path"], x["rule"]) for x in json.loads(out)["violations"]}
    assert v == {("5_alice woman/a2.png", "no-caption"), ("5_alice woman/a3.png", "no-caption")}
    (ds / "5_alice woman" / "a2.txt").write_text(CAPTIONS["a2"], encoding="utf-8")
    (ds / "5_alice woman" / "a3.txt").write_text(CAPTIONS["a3"], encoding="utf-8")
    assert _cli("check", ds, "--rule", "captions")[0] == 0


def test_edit_applies_to_hand_written_captions_only_with_overwrite(tmp_path):
    ds = tmp_path / "ds"
    imgs = _kohya_folder(ds)
    assert _cli("scan", ds)[0] == 0
    before = {stem: p.with_suffix(".txt").read_text() for stem, p in imgs.items()}
    code, out = _cli("edit", ds, "--remove", "smile")
    assert code == 0, out
    assert "no tags or captions stored yet" not in out
    assert "kept 4 caption(s) written by hand" in " ".join(out.split()) and "--overwrite" in out
    assert {stem: p.with_suffix(".txt").read_text() for stem, p in imgs.items()} == before

    code, out = _cli("edit", ds, "--remove", "smile", "--overwrite", "--json")
    assert code == 0, out
    w = json.loads(out)["captions"]["write"]
    changed = {"a0", "a1", "a3", "a5"}  # a5 was "red hair, smile", a2 and a4 have no smile
    assert sorted(w["written"]) == sorted(f"5_alice woman/{s}.txt" for s in changed)
    bdir = Path(w["backup_dir"])
    for stem in changed:
        assert (bdir / "5_alice woman" / f"{stem}.txt").read_text() == before[stem]
        assert "smile" not in imgs[stem].with_suffix(".txt").read_text()
    assert imgs["a0"].with_suffix(".txt").read_text().strip() == "red hair, outdoors"
    assert imgs["a4"].with_suffix(".txt").read_text() == before["a4"]  # the sentence is untouched
    st = json.loads(_cli("tags", ds, "--json")[1])
    assert "smile" not in {t for t, _, _ in st["frequency"]} and st["user_captions"] == 6
    # the rewritten files are still the person's: a later tag run does not take them over
    with Dataset.open(ds) as d:
        assert all(r.user_caption for r in d.kept())
        assert d.plan(model="sd15").style == "realistic"
        for stem in ("a0", "a1", "a2"):  # hand-written style tags decide the plan's style
            imgs[stem].with_suffix(".txt").write_text("anime, red hair")
        assert d.plan(model="sd15").style == "anime"


@pytest.fixture()
def tagger(tmp_path):
    return tiny_wd14.build(tmp_path / "tagger")


def _small_folder(root: Path, n: int = 5) -> list[Path]:
    root.mkdir(parents=True)
    out = []
    for i in range(n):
        p = root / f"img{i}.png"
        textured(64, 48 + 8 * i, seed=40 + i).save(p)
        out.append(p)
    return out


def test_hand_edit_after_tagging_is_exported(tmp_path, tagger):
    ds = tmp_path / "ds"
    imgs = _small_folder(ds)
    assert _cli("scan", ds)[0] == 0
    code, out = _cli(
        "tag", ds, "--model", tagger, "--device", "cpu", "--trigger", "mychar", "--general", "0.2"
    )
    assert code == 0, out
    curate_text = {p.stem: p.with_suffix(".txt").read_text() for p in imgs}
    assert all(t.startswith("mychar, ") for t in curate_text.values())
    (ds / "img1.txt").write_text("mychar, my fixed caption\n")
    code, out = _cli("scan", ds, "--json")
    assert code == 0, out
    caps = json.loads(out)["captions"]
    assert caps["changed"] == ["img1.txt"] and caps["user"] == 1 and caps["curate"] == 4

    assert _cli("export", ds, tmp_path / "out")[0] == 0
    got = _exported(tmp_path / "out")
    want = {_sha(p): curate_text[p.stem] for p in imgs}
    want[_sha(imgs[1])] = "mychar, my fixed caption"
    assert got == want

    # edited after the scan, exported without one: export reads the caption as it is now
    (ds / "img2.txt").write_text("mychar, edited after the scan")
    assert _cli("export", ds, tmp_path / "out2", "--trigger", "mychar")[0] == 0
    got = _exported(tmp_path / "out2")
    assert got[_sha(imgs[2])] == "mychar, edited after the scan"
    assert got[_sha(imgs[1])] == "mychar, my fixed caption"
    assert got[_sha(imgs[0])] == curate_text["img0"]

    # re-tagging with a new threshold updates curate's captions and keeps both edits
    code, out = _cli("tag", ds, "--general", "0.5", "--json")
    assert code == 0, out
    w = json.loads(out)["captions"]["write"]
    assert sorted(w["kept_edited"]) == ["img1.txt", "img2.txt"]
    assert (ds / "img1.txt").read_text() == "mychar, my fixed caption\n"
    assert (ds / "img0.txt").read_text() != curate_text["img0"]


KILL_SCRIPT = """
import os, sys
import curate.stages.captions as C
from curate import Dataset

real, n = C.atomic_write_text, [0]
def write_then_die(path, text):
    real(path, text)
    n[0] += 1
    if n[0] == int(sys.argv[3]):
        os._exit(9)  # killed right after the k-th caption file hit the disk
C.atomic_write_text = write_then_die
with Dataset.open(sys.argv[1]) as ds:
    ds.tag(model=sys.argv[2], device="cpu", general=0.2)
"""


def test_killed_tag_run_keeps_its_captions_curates(tmp_path, tagger):
    ds = tmp_path / "ds"
    imgs = _small_folder(ds, 6)
    (ds / "img5.txt").write_text("the user's own words")
    with Dataset.open(ds) as d:
        d.scan()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(ds), str(tagger), "3"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 9, r.stderr
    written = sorted(p.name for p in ds.glob("img[0-4].txt"))
    assert len(written) == 3
    first = {n: (ds / n).read_text() for n in written}
    with Dataset.open(ds) as d:
        out = d.tag(general=0.2, trigger="zz")
        w = out.captions.write
        assert w.kept_user == ["img5.txt"] and w.kept_edited == []
        assert sorted(w.written) == [f"img{i}.txt" for i in range(5)]
        pending = d.manifest.conn.execute("SELECT count(*) FROM caption_pending").fetchone()[0]
    for n, text in first.items():
        assert (ds / n).read_text() == f"zz, {text}"  # curate still knows them as its own: updated
    assert (ds / "img5.txt").read_text() == "the user's own words"
    assert all((ds / f"img{i}.txt").read_text().startswith("zz, ") for i in range(5))
    assert pending == 0 and len(imgs) == 6


def test_keep_and_reject_survive_filter_and_dedupe(planted, tmp_path):
    ds = planted
    trunc = jpeg_bytes(textured(600, 600, seed=30))
    (ds / "broken.jpg").write_bytes(trunc[: len(trunc) // 2])
    for cmd in ("scan", "filter", "dedupe"):
        assert _cli(cmd, ds)[0] == 0
    with Dataset.open(ds) as d:
        before = {r.path for r in d.kept()}
    assert "tiny.png" not in before and "blurred.jpg" not in before and "big_800.jpg" not in before

    code, out = _cli("keep", ds, "tiny.png", "big_800.jpg", "--json")
    assert code == 0, out
    assert json.loads(out)["paths"] == ["tiny.png", "big_800.jpg"]
    code, out = _cli("keep", str(ds / "blurred.jpg"), "--json")  # the dataset is found from the file
    assert code == 0, out
    code, out = _cli("reject", ds, "distinct_2.png", "--reason", "wrong person", "--json")
    assert code == 0, out
    code, out = _cli("keep", ds, "broken.jpg", "--json")
    assert code == 0 and json.loads(out)["unusable"] == ["broken.jpg"]
    code, out = _cli("keep", ds, "broken.jpg", "--undo")
    assert code == 0, out

    code, out = _cli("status", ds, "--json")
    st = json.loads(out)
    assert (st["manual_keep"], st["manual_reject"]) == (3, 1)

    for cmd in (
        ("filter", ds, "--min-side", "300"),
        ("dedupe", ds, "--phash-threshold", "10"),
        ("filter", ds),
    ):
        assert _cli(*cmd)[0] == 0
    with Dataset.open(ds) as d:
        kept = {r.path for r in d.kept()}
        by_path = {p: r.sha256 for r in d.images() for p in r.paths}
    assert kept == (before | {"tiny.png", "blurred.jpg", "big_800.jpg"}) - {"distinct_2.png"}
    assert "broken.jpg" not in kept

    assert _cli("split", ds, "--val", "0.2")[0] == 0
    assert _cli("bucket", ds, "--resolution", "512")[0] == 0
    code, out = _cli("export", ds, tmp_path / "out", "--trigger", "zz")
    assert code == 0, out
    assert set(_exported(tmp_path / "out")) == {by_path[p] for p in kept}

    # one-line errors for paths outside the dataset or unknown to it
    outside = tmp_path / "elsewhere.png"
    textured(64, 64).save(outside)
    code, out = _cli("keep", ds, outside)
    assert code == 2 and "outside the dataset" in out and len(out.strip().splitlines()) == 1
    code, out = _cli("reject", ds, "no_such.png")
    assert code == 2 and "not an image curate knows" in out and len(out.strip().splitlines()) == 1
    code, out = _cli("keep", tmp_path / "nowhere.png")
    assert code == 2 and "cannot tell which dataset" in out

    # apply quarantines the manual reject; the manual keeps stay
    code, out = _cli("apply", ds, "--json")
    assert code == 0, out
    moved = json.loads(out)["moved"]
    assert "distinct_2.png" in moved and not {"tiny.png", "blurred.jpg", "big_800.jpg"} & set(moved)
    assert (ds / ".curate" / "quarantine" / "distinct_2.png").exists() and (ds / "tiny.png").exists()

    code, out = _cli("keep", ds, "tiny.png", "--undo")
    assert code == 0, out
    with Dataset.open(ds) as d:
        assert "tiny.png" not in {r.path for r in d.kept()}


def test_set_caption_is_the_users_caption(tmp_path, tagger):
    ds = tmp_path / "ds"
    imgs = _small_folder(ds, 3)
    with Dataset.open(ds) as d:
        d.scan()
        d.tag(model=str(tagger), device="cpu", general=0.2)
        assert d.set_caption("img0.png", "my words") == "img0.txt"  # replaces curate's: no backup needed
        assert not (ds / ".curate" / "caption_backups").exists()
        d.set_caption(str(imgs[0]), "better words")  # replaces the person's text: backed up
        backups = list((ds / ".curate" / "caption_backups").rglob("img0.txt"))
        assert [b.read_text() for b in backups] == ["my words\n"]
        rec = {r.path: r for r in d.kept()}["img0.png"]
        assert rec.user_caption == "better words"
        out = d.tag(general=0.1)
        assert out.captions.write.kept_user == ["img0.txt"]
        assert (ds / "img0.txt").read_text() == "better words\n"
        res = d.export(tmp_path / "out", trigger="zz")
        assert res.train + res.val == 3
    assert _exported(tmp_path / "out")[_sha(imgs[0])] == "zz, better words"


def test_metadata_jsonl_captions_are_the_users(tmp_path):
    ds = tmp_path / "ds"
    imgs = _small_folder(ds, 3)
    (ds / "metadata.jsonl").write_text(
        "".join(
            json.dumps({"file_name": p.name, "text": f"jsonl text {i}"}) + "\n" for i, p in enumerate(imgs)
        )
    )
    (ds / "img2.caption").write_text("caption file text")
    assert _cli("scan", ds)[0] == 0
    assert _cli("export", ds, tmp_path / "out", "--trigger", "zz")[0] == 0
    got = _exported(tmp_path / "out")
    assert got == {
        _sha(imgs[0]): "zz, jsonl text 0",
        _sha(imgs[1]): "zz, jsonl text 1",
        _sha(imgs[2]): "zz, caption file text",  # .caption beside the image before metadata.jsonl
    }
    original = (ds / "metadata.jsonl").read_text()
    with Dataset.open(ds) as d:
        assert d.set_caption("img1.png", "jsonl text 1, fixed") == "metadata.jsonl::img1.png"
        out = d.edit(remove=["jsonl text 0"], overwrite=True)
        assert out.captions.write.backed_up == ["metadata.jsonl"]
    lines = [json.loads(x) for x in (ds / "metadata.jsonl").read_text().splitlines()]
    assert [e["text"] for e in lines] == ["", "jsonl text 1, fixed", "jsonl text 2"]
    backups = sorted(
        (ds / ".curate" / "caption_backups").rglob("metadata.jsonl"), key=lambda p: p.stat().st_mtime_ns
    )
    assert [b.read_text() for b in backups] == [
        original,
        original.replace('jsonl text 1"', 'jsonl text 1, fixed"'),
    ]


@pytest.mark.slow
def test_hand_captions_train_into_tag_frequency(tmp_path):
    pytest.importorskip("diffusers")
    from tests.trainer_fixtures import tiny_sd15_pipeline

    base = tmp_path / "sd15"
    tiny_sd15_pipeline(tmp_path / "tok").save_pretrained(base)
    ds = tmp_path / "ds"
    ds.mkdir()
    for i in range(4):
        textured(64, 64, seed=60 + i).save(ds / f"p{i}.png")
        (ds / f"p{i}.txt").write_text(f"blue sky, tree, view{i}")
    code, out = _cli("scan", ds)  # an SD1.5 user who never ran `curate bucket`: --set resolution decides
    assert code == 0, out
    code, out = _cli(
        "train", ds, "--base", base, "--family", "sd15", "--output-dir", tmp_path / "run", "--trigger", "zz",
        "--set", "resolution=64", "--set", "epochs=1", "--set", "batch_size=2", "--set", "network_dim=4",
        "--set", "network_alpha=4", "--set", "mixed_precision=no", "--set", "num_repeats=1",
    )  # fmt: skip
    assert code == 0, out
    lora = next((tmp_path / "run").glob("*.safetensors"))
    code, out = _cli("lora-info", lora, "--json")
    assert code == 0, out
    info = json.loads(out)
    top = dict((t, n) for t, n in info["top_tags"])
    assert top["zz"] == 4 and top["blue sky"] == 4 and top["tree"] == 4 and top["view0"] == 1
