"""New-user journeys, sweep D: files moved within the dataset and through the quarantine stay one manifest
row with their decisions; a diffusers metadata.jsonl loses the line of a quarantined image and gets it back
on restore; and the journeys a newcomer runs next (re-tagging over hand edits, splitting again, exporting
over an older export, odd folder names, read-only folders, --json). Folders are built in tmp_path and the
CLI runs through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from curate.cli import app
from tests.test_journeys_gapsA import db, image  # the same two helpers

run = CliRunner().invoke


def ok(*args) -> str:
    r = run(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.stdout


def rows(ds: Path) -> dict[str, tuple[str, str]]:
    """path -> (status, sha256) of every file row."""
    with db(ds) as c:
        return {p: (st, sha) for p, st, sha in c.execute("SELECT path, status, sha256 FROM files")}


# ---------------------------------------------------------------- (a) a moved file is one row
def test_a_file_moved_in_the_dataset_is_one_row_with_its_decisions_caption_and_split(tmp_path):
    """Moving p1..p3 into 5_char/ left a 'missing' row for each old path beside the new one (status and the
    report counted lost files), and moving p3 back to its old place revived that stale row: the new place
    went 'missing' and the decisions taken since the move were replaced by the old row's."""
    ds = tmp_path / "ds"
    for s in range(6):
        image(ds / f"p{s}.png", s + 40)
        (ds / f"p{s}.txt").write_text(f"caption {s}")
    ok("scan", ds)
    ok("split", ds, "--val", "0.5", "--seed", "0")
    ok("reject", ds, "p1.png", "--reason", "blurry")
    ok("keep", ds, "p2.png")
    with db(ds) as c:
        side = dict(c.execute("SELECT f.path, i.split FROM files f JOIN images i USING(sha256)"))
    (ds / "5_char").mkdir()
    for s in (1, 2, 3):
        for ext in (".png", ".txt"):
            (ds / f"p{s}{ext}").rename(ds / "5_char" / f"p{s}{ext}")
    doc = json.loads(ok("scan", ds, "--json"))
    assert doc["moved"] == 3, doc
    now = rows(ds)
    assert sorted(now) == sorted(
        ["p0.png", "p4.png", "p5.png", "5_char/p1.png", "5_char/p2.png", "5_char/p3.png"]
    )
    assert {st for st, _ in now.values()} == {"ok"}
    with db(ds) as c:
        assert dict(c.execute("SELECT path, decision FROM decisions")) == {
            "5_char/p1.png": "reject",
            "5_char/p2.png": "keep",
        }
        sides = dict(c.execute("SELECT f.path, i.split FROM files f JOIN images i USING(sha256)"))
    assert {p: sides["5_char/" + p] for p in ("p1.png", "p2.png", "p3.png")} == {
        p: side[p] for p in ("p1.png", "p2.png", "p3.png")
    }
    st = json.loads(ok("status", ds, "--json"))
    assert [(r["path"], r["reason"]) for r in st["rejected"]] == [("5_char/p1.png", "blurry")]
    assert st["files"] == 6, st

    # a decision taken at the new place, then the file goes back where it was
    ok("reject", ds, "5_char/p3.png", "--reason", "off-model")
    (ds / "5_char" / "p3.png").rename(ds / "p3.png")
    (ds / "5_char" / "p3.txt").rename(ds / "p3.txt")
    doc = json.loads(ok("scan", ds, "--json"))
    assert doc["moved"] == 1, doc
    now = rows(ds)
    assert "5_char/p3.png" not in now and now["p3.png"][0] == "ok", now
    st = json.loads(ok("status", ds, "--json"))
    assert sorted((r["path"], r["reason"]) for r in st["rejected"]) == [
        ("5_char/p1.png", "blurry"),
        ("p3.png", "off-model"),
    ]
    export = json.loads(ok("export", ds, tmp_path / "out", "--format", "kohya", "--json"))
    assert export["train"] + export.get("val", 0) == 4, export
    captions = sorted(p.read_text() for p in (tmp_path / "out").rglob("*.txt"))
    assert captions == ["caption 0", "caption 2", "caption 4", "caption 5"]


def test_a_quarantined_file_restored_and_moved_is_one_row(tmp_path):
    """apply -> restore -> the user moves the restored file into a folder -> scan: one row, still rejected."""
    ds = tmp_path / "ds"
    for s in range(4):
        image(ds / f"q{s}.png", s + 60)
    ok("scan", ds)
    ok("reject", ds, "q0.png", "--reason", "watermark")
    ok("apply", ds)
    assert rows(ds)["q0.png"][0] == "quarantined"
    ok("scan", ds)
    assert rows(ds)["q0.png"][0] == "quarantined"
    ok("restore", ds)
    (ds / "sub").mkdir()
    (ds / "q0.png").rename(ds / "sub" / "q0.png")
    ok("scan", ds)
    now = rows(ds)
    assert "q0.png" not in now and now["sub/q0.png"][0] == "ok", now
    out = json.loads(ok("apply", ds, "--json"))
    assert out["moved"] == ["sub/q0.png"], out
    assert (ds / ".curate" / "quarantine" / "sub" / "q0.png").is_file()
    ok("restore", ds)
    assert (ds / "sub" / "q0.png").is_file() and rows(ds)["sub/q0.png"][0] == "ok"


# ---------------------------------------------------------------- (b) metadata.jsonl and the quarantine
def _diffusers_dataset(ds: Path) -> bytes:
    """Five pictures, an exact copy and a tiny one, each with a line in ds/metadata.jsonl (one more column);
    sub/ has its own metadata.jsonl (file_name relative to it). Returns the root file's bytes."""
    lines = []
    for i in range(5):
        image(ds / f"img{i}.png", i + 80, 512)
        lines.append(json.dumps({"file_name": f"img{i}.png", "text": f"cap {i}", "score": i}))
    (ds / "img0_copy.png").write_bytes((ds / "img0.png").read_bytes())
    lines.insert(1, json.dumps({"file_name": "img0_copy.png", "text": "copy caption", "score": 9}))
    image(ds / "tiny.png", 99, 40)
    lines.append(json.dumps({"file_name": "tiny.png", "text": "tiny caption", "score": 7}))
    body = ("\r\n".join(lines) + "\r\n").encode()  # Windows line ends, kept as they are
    (ds / "metadata.jsonl").write_bytes(body)
    image(ds / "sub" / "s0.png", 90, 512)
    image(ds / "sub" / "s1.png", 91, 512)
    (ds / "sub" / "metadata.jsonl").write_text('{"file_name": "s0.png", "text": "sub 0"}\n'
                                               '{"file_name": "s1.png", "text": "sub 1"}')  # fmt: skip
    return body


def _names(meta: Path) -> list[str]:
    return [json.loads(ln)["file_name"] for ln in meta.read_text().splitlines() if ln.strip()]


def test_a_quarantined_image_takes_its_metadata_jsonl_line_along_and_restore_brings_it_back(tmp_path):
    """filter/dedupe --apply moved tiny.png and img0_copy.png to the quarantine but their lines stayed in the
    dataset's metadata.jsonl: the folder trained as it is (HF imagefolder) then fails on the missing file,
    and `curate tag --format jsonl` kept rewriting the lines. Now the lines leave with the images (kept in
    the quarantine) and restore puts each back in its place: the file is byte for byte as it was."""
    ds = tmp_path / "ds"
    body = _diffusers_dataset(ds)
    sub_body = (ds / "sub" / "metadata.jsonl").read_bytes()
    ok("scan", ds)
    out = run(app, ["filter", str(ds), "--apply"])
    assert out.exit_code == 0, out.output
    assert "1 metadata.jsonl caption line" in " ".join(out.stdout.split()), out.stdout
    ok("dedupe", ds, "--apply")
    ok("reject", ds, "sub/s1.png", "--reason", "off-model")
    doc = json.loads(ok("apply", ds, "--json"))
    assert doc["moved"] == ["sub/s1.png"] and doc["jsonl_lines"] == ["sub/metadata.jsonl::sub/s1.png"], doc
    assert not (ds / "tiny.png").exists() and not (ds / "img0_copy.png").exists()
    assert _names(ds / "metadata.jsonl") == [f"img{i}.png" for i in range(5)]
    assert (ds / "metadata.jsonl").read_bytes().count(b"\r\n") == 5  # the other lines untouched
    assert _names(ds / "sub" / "metadata.jsonl") == ["s0.png"]

    ok("split", ds, "--val", "0.3", "--seed", "0")
    export = json.loads(ok("export", ds, tmp_path / "out", "--format", "diffusers", "--json"))
    assert export["train"] + export["val"] == 6, export
    texts = sorted(
        json.loads(ln)["text"]
        for m in (tmp_path / "out").rglob("metadata.jsonl")
        for ln in m.read_text().splitlines()
    )
    assert texts == ["cap 0", "cap 1", "cap 2", "cap 3", "cap 4", "sub 0"]
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:  # the folder itself loads as HF imagefolder: no line names a missing image
        ds_rows = datasets.load_dataset("imagefolder", data_dir=str(ds), split="train",
                                        cache_dir=str(tmp_path / "hf"))  # fmt: skip
        assert sorted(ds_rows["text"]) == ["cap 0", "cap 1", "cap 2", "cap 3", "cap 4", "sub 0"]

    r = run(app, ["restore", str(ds), "--json"])
    assert r.exit_code == 0, r.output
    assert sorted(json.loads(r.stdout)["jsonl_lines"]) == [
        "metadata.jsonl::img0_copy.png",
        "metadata.jsonl::tiny.png",
        "sub/metadata.jsonl::sub/s1.png",
    ]
    assert (ds / "metadata.jsonl").read_bytes() == body
    assert (ds / "sub" / "metadata.jsonl").read_bytes() == sub_body
    assert not (ds / ".curate" / "quarantine" / "metadata_lines.jsonl").exists()
    ok("scan", ds)
    ok("keep", ds, "tiny.png")
    with db(ds) as c:
        caps = dict(c.execute("SELECT image, text FROM user_captions"))
    assert caps["tiny.png"] == "tiny caption" and caps["sub/s1.png"] == "sub 1", caps


def test_a_line_rewritten_while_its_image_was_quarantined_is_not_overwritten_on_restore(tmp_path):
    ds = tmp_path / "ds"
    _diffusers_dataset(ds)
    ok("scan", ds)
    ok("reject", ds, "img2.png", "--reason", "blurry")
    ok("apply", ds)
    assert "img2.png" not in _names(ds / "metadata.jsonl")
    with (ds / "metadata.jsonl").open("a") as fh:
        fh.write('{"file_name": "img2.png", "text": "my new caption"}\n')
    r = run(app, ["restore", str(ds)])
    assert r.exit_code == 1 and (ds / "img2.png").is_file(), r.output
    assert "metadata.jsonl has another line for img2.png now" in " ".join(r.output.split()), r.output
    lines = (ds / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(ln)["text"] for ln in lines if "img2" in ln] == ["my new caption"]
    store = (ds / ".curate" / "quarantine" / "metadata_lines.jsonl").read_text()
    assert json.loads(store)["line"].startswith('{"file_name": "img2.png", "text": "cap 2"')


def test_a_metadata_jsonl_file_name_with_dot_slash_is_that_image_s_caption(tmp_path):
    """HF imagefolder joins file_name to the metadata's folder, so "./a.png" is a.png; curate looked the
    name up as written: a.png had no caption (export wrote curate's empty one) and lost its other columns."""
    ds = tmp_path / "ds"
    image(ds / "a.png", 1, 256)
    image(ds / "sub" / "b.png", 2, 256)
    (ds / "metadata.jsonl").write_text(
        '{"file_name": "./a.png", "text": "a dog", "rating": 5}\n{"file_name": "sub//b.png", "text": "a cat"}\n'
    )
    ok("scan", ds)
    ok("export", ds, tmp_path / "out", "--format", "diffusers")
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "train" / "metadata.jsonl").read_text().splitlines()]
    assert sorted((r["text"], r.get("rating")) for r in rows) == [("a cat", None), ("a dog", 5)]


# ---------------------------------------------------------------- exporting over an older export
def test_train_re_export_never_deletes_files_a_person_put_in_the_old_export(tmp_path, monkeypatch):
    """`curate train` re-exports into OUTPUT/data when the dataset changed, replacing the old export as a
    whole: an image the user had dropped into the export's concept folder and their notes were deleted
    without a word. Now the run stops with one line naming a file; sd-scripts' latent caches beside the
    exported images are no reason to stop (they are rebuilt)."""
    from tests.test_roundtrip_train import no_model_loads

    no_model_loads(monkeypatch)  # the export comes before the model: stop there
    ds = tmp_path / "ds"
    for s in range(4):
        image(ds / "10_char" / f"c{s}.png", s + 100, 128)
    ok("scan", ds)
    base = tmp_path / "base"
    base.mkdir()
    (base / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    out = tmp_path / "o"
    args = ["train", str(ds), "--base", str(base), "--output-dir", str(out), "--set", "resolution=64"]
    first = run(app, args)
    assert isinstance(first.exception, AssertionError), first.output  # exported, then reached the model
    data = out / "data"
    exported = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    assert len(exported) == 4, exported
    stem = exported[0][: -len(".png")]
    (data / f"{stem}_0064x0064_sd.npz").write_bytes(b"latents")  # sd-scripts' cache: curate's to replace
    image(ds / "10_char" / "c9.png", 109, 128)  # the dataset changed: the next run re-exports
    second = run(app, args)
    assert isinstance(second.exception, AssertionError), second.output  # the cache alone does not stop it
    assert len(list(data.rglob("*.png"))) == 5
    mine = data / "img" / "10_char" / "my_extra.png"
    image(mine, 7, 128)
    (data / "notes.md").write_text("what I changed")
    image(ds / "10_char" / "c8.png", 108, 128)
    third = run(app, args)
    assert third.exit_code != 0 and not isinstance(third.exception, AssertionError), third.output
    text = " ".join(third.output.split())
    assert "holds 2 file(s) the earlier export did not write (e.g. img/10_char/my_extra.png)" in text, text
    assert "Traceback" not in third.output
    assert mine.is_file() and (data / "notes.md").read_text() == "what I changed"


# ---------------------------------------------------------------- check: captions left without their image
def test_check_names_captions_whose_image_is_gone(tmp_path):
    """a1.png deleted after the scan, its a1.txt left; metadata.jsonl names gone.png (loading the folder with
    datasets then fails): `curate check` said "all rules pass". b.jpg beside a deleted b.png keeps b.txt."""
    ds = tmp_path / "ds"
    for i in range(3):
        image(ds / f"a{i}.png", i + 120, 128)
        (ds / f"a{i}.txt").write_text(f"cap {i}")
    image(ds / "b.png", 130, 128)
    image(ds / "b.jpg", 131, 128)
    (ds / "b.txt").write_text("b")
    (ds / "notes.txt").write_text("not a caption: no image was ever called notes")
    (ds / "sub").mkdir()
    image(ds / "sub" / "s.png", 132, 128)
    (ds / "sub" / "metadata.jsonl").write_text(
        '{"file_name": "s.png", "text": "s"}\n{"file_name": "gone.png", "text": "g"}\n'
    )
    ok("scan", ds)

    def orphans() -> dict[str, str]:
        r = run(app, ["check", str(ds), "--json"])  # the 128 px images are too small too: exit 1 anyway
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        return {v["path"]: v["detail"] for v in json.loads(r.stdout)["violations"]
                if v["rule"] == "caption-without-image"}  # fmt: skip

    assert list(orphans()) == ["sub/metadata.jsonl"]  # gone.png: from the start
    (ds / "a1.png").unlink()
    (ds / "b.png").unlink()
    found = orphans()
    assert sorted(found) == ["a1.txt", "sub/metadata.jsonl"], found
    assert found["sub/metadata.jsonl"].startswith("line 2 names gone.png, which is not there")
    assert "its image a1.png is gone" in found["a1.txt"]
    (ds / "a1.txt").unlink()
    (ds / "sub" / "metadata.jsonl").write_text('{"file_name": "s.png", "text": "s"}\n')
    assert orphans() == {}


# ---------------------------------------------------------------- split again after adding images
def test_split_again_after_adding_images_keeps_the_earlier_validation_images(tmp_path):
    """split --val 0.1 on 20 images, 10 more added, split --val 0.2: the groups were shuffled as a list, so
    one more image reordered all of them and the validation images of the first split went to train (both
    sides dealt afresh: the earlier run's validation losses compare with nothing). Now each group's place in
    the seeded order is its own, and the earlier validation images stay."""
    ds = tmp_path / "ds"
    for s in range(20):
        image(ds / f"p{s:02d}.png", s + 200, 64)
    ok("scan", ds)

    def sides() -> dict[str, str]:
        with db(ds) as c:
            return dict(c.execute("SELECT f.path, i.split FROM files f JOIN images i USING(sha256)"))

    first = json.loads(ok("split", ds, "--val", "0.1", "--seed", "0", "--json"))
    assert (first["train"], first["val"]) == (18, 2), first
    val_before = {p for p, s in sides().items() if s == "val"}
    for s in range(20, 30):
        image(ds / f"p{s:02d}.png", s + 200, 64)
    ok("scan", ds)
    second = json.loads(ok("split", ds, "--val", "0.2", "--seed", "0", "--json"))
    assert (second["train"], second["val"]) == (24, 6), second
    now = sides()
    assert {p: now[p] for p in val_before} == {p: "val" for p in val_before}
    assert json.loads(ok("split", ds, "--val", "0.2", "--seed", "0", "--json")) == second  # deterministic
    assert sides() == now
