"""User journeys over the curation stages: sidecars that follow their image into the quarantine and back,
stages with nothing kept, kohya `0_name` folders, an interrupted scan followed by moves, an edited image
keeping its split side. Folders are built in tmp_path and the CLI runs through typer's CliRunner.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from typer.testing import CliRunner

from curate.cli import app
from tests.images import textured

run = CliRunner().invoke


def image(path: Path, seed: int, size: int = 96) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    textured(size, size, seed).save(path)
    return path


def db(root: Path) -> sqlite3.Connection:
    return sqlite3.connect(root / ".curate" / "manifest.db")


def ok(args: list[str]):
    r = run(app, args)
    assert r.exit_code == 0, r.output
    return r


def one_error_line(out: str, *needles: str) -> None:
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out, out
    for n in needles:
        assert n in lines[0], (n, out)


# ---------------------------------------------------------------- 1. sidecars move with their image
def test_apply_moves_caption_and_latent_sidecars_and_restore_brings_them_back(tmp_path):
    ds = tmp_path / "ds"
    image(ds / "a.png", 1)
    (ds / "a.txt").write_text("a caption\n")
    (ds / "a.npz").write_bytes(b"old sd latents")
    (ds / "a_0512x0512_sd.npz").write_bytes(b"sd latents")
    (ds / "a_te_outputs.npz").write_bytes(b"te outputs")
    image(ds / "sub" / "d.png", 2)
    (ds / "sub" / "d.caption").write_text("d caption")
    image(ds / "c.png", 3)  # rejected; shares c.txt with the kept c.jpg
    textured(96, 96, 4).save(ds / "c.jpg")
    (ds / "c.txt").write_text("c caption")
    image(ds / "b.png", 5)  # kept, with its caption
    (ds / "b.txt").write_text("b caption")
    (ds / "a_1.txt").write_text("not a's: the caption of an image named a_1")
    before = {p.relative_to(ds).as_posix(): p.read_bytes() for p in ds.rglob("*") if p.is_file()}
    ok(["scan", str(ds)])
    ok(["reject", str(ds / "a.png"), str(ds / "sub" / "d.png"), str(ds / "c.png")])
    r = ok(["apply", str(ds), "--json"])
    out = json.loads(r.output)
    assert sorted(out["moved"]) == ["a.png", "c.png", "sub/d.png"]
    assert sorted(out["sidecars"]) == [
        "a.npz", "a.txt", "a_0512x0512_sd.npz", "a_te_outputs.npz", "sub/d.caption",
    ]  # fmt: skip
    q = ds / ".curate" / "quarantine"
    for rel in [*out["moved"], *out["sidecars"]]:
        assert not (ds / rel).exists() and (q / rel).read_bytes() == before[rel], rel
    for rel in ("b.png", "b.txt", "c.jpg", "c.txt", "a_1.txt"):  # kept images' sidecars stay
        assert (ds / rel).read_bytes() == before[rel], rel
    index = json.loads((q / "index.json").read_text())["moves"]
    assert {e["src"] for e in index} == set(out["moved"]) | set(out["sidecars"])
    assert all(e["state"] == "done" for e in index)
    with db(ds) as c:
        done = {s for (s,) in c.execute("SELECT src FROM moves WHERE state='done'")}
    assert done == set(out["moved"]) | set(out["sidecars"])

    # A caption written in the meantime where a.txt was is never overwritten: a.txt stays quarantined.
    (ds / "a.txt").write_text("a new caption")
    r = run(app, ["restore", str(ds)])
    assert r.exit_code == 1, r.output
    assert "skipped a.txt" in r.output and "restored 3 file(s) and 4 sidecar(s)" in r.output, r.output
    assert (ds / "a.txt").read_text() == "a new caption"
    assert (q / "a.txt").read_bytes() == before["a.txt"]
    for rel in set(before) - {"a.txt"}:
        assert (ds / rel).read_bytes() == before[rel], rel
    (ds / "a.txt").unlink()  # the user drops the new caption: the old one comes back
    r = ok(["restore", str(ds)])
    assert "restored 0 file(s) and 1 sidecar(s)" in r.output, r.output
    assert {p.relative_to(ds).as_posix(): p.read_bytes() for p in ds.rglob("*") if p.is_file()
            and ".curate" not in p.parts} == before  # fmt: skip


def test_apply_never_overwrites_a_sidecar_already_in_the_quarantine(tmp_path):
    ds = tmp_path / "ds"
    image(ds / "a.png", 1)
    (ds / "a.txt").write_text("a caption")
    image(ds / "b.png", 2)
    (ds / "b.txt").write_text("b caption")
    ok(["scan", str(ds)])
    q = ds / ".curate" / "quarantine"
    q.mkdir(parents=True)
    (q / "a.txt").write_text("left here by hand")
    ok(["reject", str(ds / "a.png"), str(ds / "b.png")])
    r = run(app, ["apply", str(ds)])
    assert r.exit_code == 1, r.output
    assert "skipped a.png" in r.output and "already exists in the quarantine" in r.output, r.output
    assert (q / "a.txt").read_text() == "left here by hand"
    assert (ds / "a.png").exists() and (ds / "a.txt").read_text() == "a caption"  # neither moved
    assert (q / "b.png").exists() and (q / "b.txt").read_text() == "b caption"


# ---------------------------------------------------------------- 2. nothing kept: one line, non-zero exit
def test_bucket_and_plan_with_nothing_kept_say_so_and_fail(tmp_path):
    ds = tmp_path / "ds"
    for s in (1, 2):
        image(ds / f"p{s}.png", s)
    (ds / "curate.toml").write_text("[filter]\nmin_side = 64\n")  # the check passes these small pictures
    ok(["scan", str(ds)])
    ok(["bucket", str(ds)])  # two kept images: buckets stored
    check_before = run(app, ["check", str(ds), "--no-scan"])
    ok(["reject", str(ds / "p1.png"), str(ds / "p2.png")])
    for cmd in ("bucket", "plan", "split"):
        r = run(app, [cmd, str(ds)])
        assert r.exit_code == 2, (cmd, r.output)
        one_error_line(r.output, f"no kept images to {cmd}", "all 2 files are rejected", "curate keep")
    r = run(app, ["export", str(ds), str(tmp_path / "out")])
    assert r.exit_code == 2 and not (tmp_path / "out").exists(), r.output
    one_error_line(r.output, "no kept images to export")
    with db(ds) as c:  # the failed bucket run left the stored buckets as they were
        assert c.execute("SELECT count(*) FROM images WHERE bucket_w IS NOT NULL").fetchone()[0] == 2
    # the pre-commit check judges files, not what is kept: rejecting everything by hand changes nothing there
    check_after = run(app, ["check", str(ds), "--no-scan"])
    assert (check_after.exit_code, check_before.exit_code) == (0, 0), check_after.output
    ok(["keep", str(ds / "p1.png")])  # the fix the message names
    assert "1 images" in ok(["bucket", str(ds)]).output

    empty = tmp_path / "empty"
    empty.mkdir()
    ok(["scan", str(empty)])
    for cmd in ("bucket", "plan"):
        r = run(app, [cmd, str(empty)])
        assert r.exit_code == 2, r.output
        one_error_line(r.output, f"no images to {cmd}", "curate scan")


def test_plan_with_every_kept_image_in_validation_says_so(tmp_path):
    ds = tmp_path / "ds"
    for s in (1, 2):
        image(ds / f"p{s}.png", s)
    ok(["scan", str(ds)])
    ok(["split", str(ds), "--val", "0.5"])
    with db(ds) as c:
        c.execute("UPDATE images SET split='val'")
    r = run(app, ["plan", str(ds)])
    assert r.exit_code == 2, r.output
    one_error_line(r.output, "all 2 kept images are in the validation split", "--val")


# ---------------------------------------------------------------- 3. kohya 0_name folders
def test_a_zero_repeat_folder_is_left_out_of_export_and_plan_as_sd_scripts_skips_it(tmp_path):
    import tomllib

    ds = tmp_path / "ds"
    for i, folder in enumerate(["0_bg", "0_bg", "0_bg", "5_char", "5_char"]):
        image(ds / folder / f"i{i}.png", i)
    ok(["scan", str(ds)])
    ok(["split", str(ds), "--val", "0"])
    r = ok(["export", str(ds), str(tmp_path / "out"), "--json"])
    doc = json.loads(r.stdout)
    zero = [w for w in doc["warnings"] if "0_bg" in w]
    assert len(zero) == 1 and "3 image(s) are left out" in zero[0] and "10_bg" in zero[0], doc["warnings"]
    assert doc["train"] == 2
    toml = tomllib.loads((tmp_path / "out" / "dataset.toml").read_text())
    subsets = toml["datasets"][0]["subsets"]
    assert [(Path(s["image_dir"]).name, s["num_repeats"]) for s in subsets] == [("5_char", 5)]
    assert sorted(p.name for p in (tmp_path / "out" / "img").iterdir()) == ["5_char"]  # no 10_ fallback

    # the diffusers format has no repeats: the images are exported, with one line saying so
    d = json.loads(ok(["export", str(ds), str(tmp_path / "outd"), "--format", "diffusers", "--json"]).stdout)
    dz = [w for w in d["warnings"] if "0_bg" in w]
    assert len(dz) == 1 and "its 3 image(s) are exported like the others" in dz[0], d["warnings"]
    assert len(list((tmp_path / "outd" / "train").glob("*.png"))) == 5

    plan = json.loads(ok(["plan", str(ds), "--json"]).stdout)
    assert plan["warnings"][0] == zero[0]
    assert plan["total_steps"] == 2 * 10 * 10 // plan["train"]["batch_size"]  # 2 images x 10 repeats x 10 ep
    out = ok(["plan", str(ds)]).output
    assert "2 training images" in out and out.count("0_bg/ has 0 repeats") == 1, out

    (ds / "5_char" / "i3.png").unlink()  # only the 0_ folder left: nothing would train
    (ds / "5_char" / "i4.png").unlink()
    ok(["scan", str(ds)])
    for cmd in (["plan", str(ds)], ["export", str(ds), str(tmp_path / "out2")]):
        r = run(app, cmd)
        assert r.exit_code == 2, r.output
        one_error_line(r.output, "0_<name> folder", "sd-scripts skips", "N >= 1")


def test_a_zero_repeat_regularization_folder_is_skipped_too(tmp_path):
    ds, reg = tmp_path / "ds", tmp_path / "reg"
    image(ds / "5_char" / "a.png", 1)
    image(ds / "5_char" / "b.png", 2)
    image(reg / "0_person" / "r0.png", 3)
    image(reg / "1_person" / "r1.png", 4)
    ok(["scan", str(ds)])
    doc = json.loads(ok(["export", str(ds), str(tmp_path / "out"), "--reg", str(reg), "--json"]).stdout)
    assert [w for w in doc["warnings"] if "0_person" in w] == [
        "--reg 0_person/ has 0 repeats, so sd-scripts skips it: its 1 image(s) are left out; "
        "rename it 10_person (N_name, N >= 1) to train on them"
    ]
    assert sorted(p.name for p in (tmp_path / "out" / "reg").iterdir()) == ["1_person"]
    assert len(list((tmp_path / "out" / "reg" / "1_person").glob("*.png"))) == 1


# ---------------------------------------------------------------- 4. interrupted scans, edited images
_KILLED_SCAN = """
import os, sys
from curate.config import ScanConfig
from curate.dataset import Dataset
from curate.stages.scan import scan

def die_after_two(done, total):
    if done == 2:
        os._exit(9)  # as kill -9 after two files were recorded: no handler runs

with Dataset.open(sys.argv[1]) as ds:
    scan(ds.manifest, ScanConfig(workers=1), progress=die_after_two, batch_size=1)
"""


def _moved_dataset(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Six pictures scanned, split, p1 rejected and p2 kept by hand; then p0..p3 moved into 5_char/."""
    ds = tmp_path / "ds"
    for s in range(6):
        image(ds / f"p{s}.png", s + 10)
    ok(["scan", str(ds)])
    ok(["split", str(ds), "--val", "0.5"])
    ok(["reject", str(ds / "p1.png"), "--reason", "blurry"])
    ok(["keep", str(ds / "p2.png")])
    with db(ds) as c:
        sides = dict(c.execute("SELECT f.path, i.split FROM files f JOIN images i ON i.sha256=f.sha256"))
    (ds / "5_char").mkdir()
    for s in range(4):
        (ds / f"p{s}.png").rename(ds / "5_char" / f"p{s}.png")
    return ds, sides


def _after_moves(ds: Path, sides: dict[str, str]) -> None:
    with db(ds) as c:
        decisions = dict(c.execute("SELECT path, decision FROM decisions"))
        now = dict(c.execute("SELECT f.path, i.split FROM files f JOIN images i ON i.sha256=f.sha256"
                             " WHERE f.status='ok'"))  # fmt: skip
        assert c.execute("SELECT count(*) FROM scan_pending").fetchone()[0] == 0
    assert decisions["5_char/p1.png"] == "reject" and decisions["5_char/p2.png"] == "keep", decisions
    assert {p: now[f"5_char/{p}"] for p in ("p0.png", "p1.png", "p2.png", "p3.png")} == {
        p: sides[p] for p in ("p0.png", "p1.png", "p2.png", "p3.png")
    }
    status = json.loads(ok(["status", str(ds), "--json"]).stdout)
    assert [(r["path"], r["reason"]) for r in status["rejected"]] == [("5_char/p1.png", "blurry")]


def test_a_scan_killed_midway_then_rerun_carries_moves_like_a_whole_scan(tmp_path):
    import subprocess
    import sys

    ds, sides = _moved_dataset(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", _KILLED_SCAN, str(ds)], env={"PYTHONPATH": str(repo)},
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 9, p.stderr
    with db(ds) as c:  # two moved files recorded, not yet settled
        assert c.execute("SELECT count(*) FROM scan_pending").fetchone()[0] == 2
    d = json.loads(ok(["scan", str(ds), "--json"]).stdout)
    assert d["moved"] == 4, d
    _after_moves(ds, sides)


def test_a_scan_stopped_by_ctrl_c_then_rerun_carries_moves_like_a_whole_scan(tmp_path):
    import pytest

    from curate.config import ScanConfig
    from curate.dataset import Dataset
    from curate.stages.scan import scan

    ds, sides = _moved_dataset(tmp_path)

    def ctrl_c_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with Dataset.open(ds) as d, pytest.raises(KeyboardInterrupt):
        scan(d.manifest, ScanConfig(workers=1), progress=ctrl_c_after_two, batch_size=1)
    d = json.loads(ok(["scan", str(ds), "--json"]).stdout)
    assert d["moved"] == 2, d  # the other two were carried over when the stopped scan ended
    _after_moves(ds, sides)


def test_an_edited_image_keeps_its_split_side_unless_it_now_copies_the_other_side(tmp_path):
    ds = tmp_path / "ds"
    for s in range(6):
        image(ds / f"p{s}.png", s + 20)
    ok(["scan", str(ds)])
    ok(["split", str(ds), "--val", "0.5"])
    with db(ds) as c:
        side = dict(c.execute("SELECT f.path, i.split FROM files f JOIN images i ON i.sha256=f.sha256"))
    val = sorted(p for p, s in side.items() if s == "val")
    train = sorted(p for p, s in side.items() if s == "train")
    assert len(val) == 3 and len(train) == 3, side
    textured(96, 96, 99).save(ds / val[0])  # new pixels, like no other picture
    near = textured(96, 96, int(val[1][1:-4]) + 20)  # train[0] becomes a copy of val[1], one pixel changed
    near.putpixel((0, 0), (0, 0, 0))
    near.save(ds / train[0])
    d = json.loads(ok(["scan", str(ds), "--json"]).stdout)
    assert d["changed"] == 2 and d["split_kept"] == 1, d
    assert d["split_notes"] == [
        f"{train[0]} changed and is now a near-duplicate of {val[1]} on the val side: it moves from train to "
        "val so the split stays leak-free (`curate split` deals the sides again)"
    ]
    with db(ds) as c:
        now = dict(c.execute("SELECT f.path, i.split FROM files f JOIN images i ON i.sha256=f.sha256"))
    assert now == {**side, train[0]: "val"}
    out = ok(["scan", str(ds)]).output  # nothing changed since: no note, sides as they are
    assert "near-duplicate" not in out
    doc = json.loads(ok(["export", str(ds), str(tmp_path / "out"), "--json"]).stdout)
    assert (doc["train"], doc["val"]) == (2, 4), doc


def test_restore_without_the_manifest_brings_the_sidecars_back_from_the_index(tmp_path):
    ds = tmp_path / "ds"
    image(ds / "a.png", 1)
    (ds / "a.txt").write_text("a caption")
    (ds / "a_0768x0512_sdxl.npz").write_bytes(b"sdxl latents")
    image(ds / "b.png", 2)
    ok(["scan", str(ds)])
    ok(["reject", str(ds / "a.png")])
    ok(["apply", str(ds)])
    assert not (ds / "a.txt").exists() and not (ds / "a_0768x0512_sdxl.npz").exists()
    (ds / ".curate" / "manifest.db").unlink()  # lost: the quarantine's own index still knows
    r = ok(["restore", str(ds)])
    assert "restored 1 file(s) and 2 sidecar(s)" in r.output, r.output
    assert (ds / "a.txt").read_text() == "a caption"
    assert (ds / "a_0768x0512_sdxl.npz").read_bytes() == b"sdxl latents" and (ds / "a.png").exists()


def test_training_a_kohya_folder_as_is_skips_a_zero_repeat_folder_with_a_warning(tmp_path):
    import pytest

    from trainer_bridge import data as D
    from trainer_bridge.config import TrainConfig, TrainError

    image(tmp_path / "0_bg" / "a.png", 1, 64)
    image(tmp_path / "0_bg" / "b.png", 2, 64)
    with pytest.raises(TrainError, match=r"0 repeats \(0_<name>/\), which sd-scripts skips"):
        D.read_dataset(TrainConfig(data=str(tmp_path), resolution=64), "sd15")
    image(tmp_path / "3_char" / "c.png", 3, 64)
    spec = D.read_dataset(TrainConfig(data=str(tmp_path), resolution=64), "sd15")
    assert [(s.image_dir.name, s.num_repeats) for s in spec.subsets] == [("3_char", 3)]
    assert [n for n in spec.notes if "0_bg" in n] == [
        "warning: 0_bg/ has 0 repeats, so sd-scripts skips it and so does this run: its images are not trained "
        "on; rename it 10_bg (N_name, N >= 1) to use them"
    ]
    assert [it.path.name for it in D.list_items(spec.subsets, spec)] == ["c.png"]
