"""Path faults: manifest rows that escape the dataset, symlinks, odd file names, stale decisions, a lost manifest.

Each test is a user journey through the CLI; the rule under test is that no user file outside what curate
decided is ever moved, and every refusal is a line that says why plus a non-zero exit.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curate.cli import app
from tests.images import textured, tree_hashes

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args))


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def db(root: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(root / ".curate" / "manifest.db", isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def reject(root: Path, *paths: str, stage: str = "manual") -> None:
    """Record a reject decision the way any stage does (a row in rejects)."""
    with db(root) as conn:
        conn.executemany(
            "INSERT OR REPLACE INTO rejects(path, stage, reason, detail) VALUES (?,?,?,?)",
            [(p, stage, "test", None) for p in paths],
        )


def skipped_lines(r) -> list[str]:
    return [ln for ln in r.stderr.strip().splitlines() if ln]


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    (root / "sub").mkdir(parents=True)
    for i in range(3):
        textured(600, 600, seed=10 + i).save(root / f"img{i}.png")
    textured(64, 64, seed=20).save(root / "tiny.png")  # rejected by the filter (short side < 512)
    return root


# -- manifest paths must stay inside the dataset ---------------------------------------------------------
@pytest.mark.parametrize("row", ["../outside/x.jpg", "linked/x.jpg", ".curate/manifest.db", "/abs/x.jpg"])
def test_apply_never_moves_a_file_from_outside(ds: Path, tmp_path: Path, row: str):
    outside = tmp_path / "outside"
    outside.mkdir()
    textured(300, 300, seed=5).save(outside / "x.jpg")
    (ds / "linked").symlink_to(outside, target_is_directory=True)  # a folder link that leads out
    victim = outside / "x.jpg"
    assert cli("scan", str(ds), "--json").exit_code == 0
    before, outside_before = tree_hashes(ds), sha(victim)
    st = victim.stat()
    with db(ds) as conn:  # a shared or hand-edited manifest
        conn.execute(
            "INSERT INTO files(path, sha256, size, mtime_ns, status) VALUES (?,?,?,?, 'ok')",
            (row, sha(victim), st.st_size, st.st_mtime_ns),
        )
    reject(ds, row)
    r = cli("apply", str(ds))
    assert r.exit_code == 1, r.output
    lines = skipped_lines(r)
    assert len(lines) == 1 and row in lines[0] and "not touched" in lines[0], lines
    assert "Traceback" not in r.output
    assert victim.exists() and sha(victim) == outside_before
    assert (ds / ".curate" / "manifest.db").exists()
    assert tree_hashes(ds) == before
    assert not list((ds / ".curate").glob("quarantine/**/x.jpg"))


def test_restore_never_writes_outside_from_a_tampered_index(ds: Path, tmp_path: Path):
    assert cli("scan", str(ds), "--json").exit_code == 0
    assert cli("filter", str(ds), "--apply").exit_code == 0
    index = ds / ".curate" / "quarantine" / "index.json"
    data = json.loads(index.read_text())
    data["moves"].append({"batch": "b", "src": "../evil.png", "dst": "tiny.png", "state": "done"})
    index.write_text(json.dumps(data))
    with db(ds) as conn:
        conn.execute("DELETE FROM moves")  # only the index knows the moves now
    r = cli("restore", str(ds))
    assert r.exit_code == 1
    assert not (tmp_path / "evil.png").exists()
    lines = skipped_lines(r)
    assert len(lines) == 1 and "../evil.png" in lines[0]


# -- symlinks -----------------------------------------------------------------------------------------------
@pytest.fixture
def linked(ds: Path) -> Path:
    """sub/link.png -> ../img0.png (relative, inside the dataset)."""
    (ds / "sub" / "link.png").symlink_to(Path("..") / "img0.png")
    assert cli("scan", str(ds), "--json").exit_code == 0
    return ds


@pytest.mark.parametrize("rejected", ["img0.png", "sub/link.png"])
def test_apply_never_separates_a_link_from_its_target(linked: Path, rejected: str):
    before = tree_hashes(linked)
    reject(linked, rejected)
    r = cli("apply", str(linked))
    assert r.exit_code == 1
    lines = skipped_lines(r)
    assert len(lines) == 1 and rejected in lines[0] and "symlink" in lines[0], lines
    assert tree_hashes(linked) == before
    assert (linked / "sub" / "link.png").resolve() == (linked / "img0.png").resolve()
    assert (linked / "sub" / "link.png").read_bytes() == (linked / "img0.png").read_bytes()


def test_a_link_and_its_target_rejected_together_move_together(linked: Path):
    before = tree_hashes(linked)
    reject(linked, "img0.png", "sub/link.png")
    r = cli("apply", str(linked), "--json")
    assert r.exit_code == 0, r.output
    assert sorted(json.loads(r.stdout)["moved"]) == ["img0.png", "sub/link.png"]
    q = linked / ".curate" / "quarantine"
    assert (q / "sub" / "link.png").is_symlink()
    assert (q / "sub" / "link.png").read_bytes() == (q / "img0.png").read_bytes()  # still resolves there
    r = cli("restore", str(linked))
    assert r.exit_code == 0, r.output
    assert tree_hashes(linked) == before
    assert (linked / "sub" / "link.png").read_bytes() == (linked / "img0.png").read_bytes()


def test_absolute_link_to_an_outside_file_is_that_files_bytes(ds: Path, tmp_path: Path):
    outside = tmp_path / "elsewhere.png"
    textured(600, 600, seed=33).save(outside)
    (ds / "ext.png").symlink_to(outside)
    r = cli("scan", str(ds), "--json")
    assert r.exit_code == 0
    with db(ds) as conn:
        row = conn.execute("SELECT sha256 FROM files WHERE path='ext.png'").fetchone()
    assert row["sha256"] == sha(outside)  # scanned as the file it points to
    reject(ds, "ext.png")
    r = cli("apply", str(ds), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["moved"] == ["ext.png"]
    assert outside.exists() and not outside.is_symlink()  # the link moved, never the outside file
    assert (ds / ".curate" / "quarantine" / "ext.png").is_symlink()
    assert cli("restore", str(ds)).exit_code == 0
    assert (ds / "ext.png").is_symlink() and (ds / "ext.png").resolve() == outside.resolve()


# -- file names ---------------------------------------------------------------------------------------------
def test_a_name_that_is_not_utf8_does_not_stop_the_scan(ds: Path):
    bad = os.path.join(os.fsencode(ds), b"caf\xe9.png")  # latin-1 bytes
    try:
        fd = os.open(bad, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as exc:  # pragma: no cover - a filesystem that enforces UTF-8 names
        pytest.skip(f"this filesystem refuses non-UTF-8 names: {exc}")
    os.write(fd, (ds / "img0.png").read_bytes())
    os.close(fd)
    before = tree_hashes(ds)
    r = cli("scan", str(ds), "--json")
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    d = json.loads(r.stdout)
    assert d["bad_names"] == ["caf\\xe9.png"] and d["errors"] == {"bad-filename": 1}
    assert d["summary"]["files"] == 4 and ["caf\\xe9.png", "bad-filename"] == d["unusable"][0][:2]
    assert "rename it" in d["unusable"][0][2]
    r = cli("scan", str(ds))
    lines = [ln for ln in skipped_lines(r) if not ln.startswith("scan ")]  # past the progress bar
    assert r.exit_code == 0 and len(lines) == 1 and "not valid UTF-8" in lines[0] and "rename" in lines[0]
    assert "caf\\xe9.png" in r.stdout  # listed among the unusable files
    # later stages never see it; apply leaves it where it is
    assert cli("filter", str(ds), "--apply").exit_code == 0
    assert os.path.exists(bad)
    assert {k: v for k, v in tree_hashes(ds).items() if k != "tiny.png"} == {
        k: v for k, v in before.items() if k != "tiny.png"
    }


def test_a_255_byte_name_can_be_tagged(tmp_path: Path):
    import tests.tiny_wd14 as tiny_wd14

    root = tmp_path / "ds"
    root.mkdir()
    long_name = "a" * 251 + ".png"  # 255 bytes, the longest name most filesystems allow
    assert len(long_name.encode()) == 255
    textured(96, 96, seed=1).save(root / long_name)
    textured(96, 96, seed=2).save(root / "short.png")
    model = tiny_wd14.build(tmp_path / "tagger")
    assert cli("scan", str(root), "--json").exit_code == 0
    r = cli("tag", str(root), "--model", str(model), "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    cap = root / ("a" * 251 + ".txt")
    assert cap.exists() and cap.read_text().strip()
    assert not [p for p in root.iterdir() if p.name.startswith(".curate-tmp-")]


def test_atomic_write_temp_names_stay_short(tmp_path: Path):
    from curate.io import atomic_write_text

    target = tmp_path / ("b" * 255)
    atomic_write_text(target, "hello")
    assert target.read_text() == "hello"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


# -- stale decisions ----------------------------------------------------------------------------------------
def test_apply_skips_a_file_replaced_since_the_scan(ds: Path):
    assert cli("scan", str(ds), "--json").exit_code == 0
    assert cli("filter", str(ds), "--json").exit_code == 0  # tiny.png is rejected
    textured(800, 800, seed=99).save(ds / "tiny.png")  # the user replaced it with a good image
    new = sha(ds / "tiny.png")
    r = cli("apply", str(ds))
    assert r.exit_code == 1
    lines = skipped_lines(r)
    assert len(lines) == 1 and "tiny.png" in lines[0] and "replaced since the last scan" in lines[0]
    assert sha(ds / "tiny.png") == new


def test_apply_moves_a_file_only_touched_since_the_scan(ds: Path):
    assert cli("scan", str(ds), "--json").exit_code == 0
    assert cli("filter", str(ds), "--json").exit_code == 0
    t = time.time() + 5
    os.utime(ds / "tiny.png", (t, t))  # same bytes, new mtime: the decision still holds
    r = cli("apply", str(ds), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["moved"] == ["tiny.png"]


# -- the quarantine's own index -----------------------------------------------------------------------------
@pytest.mark.parametrize("then", ["deleted", "rebuilt"])
def test_restore_works_when_the_manifest_is_lost(ds: Path, then: str):
    before = tree_hashes(ds)
    assert cli("scan", str(ds), "--json").exit_code == 0
    r = cli("filter", str(ds), "--apply", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["apply"]["moved"] == ["tiny.png"]
    index = json.loads((ds / ".curate" / "quarantine" / "index.json").read_text())
    assert [(m["src"], m["state"]) for m in index["moves"]] == [("tiny.png", "done")]
    for f in (ds / ".curate").glob("manifest.db*"):
        f.unlink()
    if then == "rebuilt":
        assert cli("scan", str(ds), "--json").exit_code == 0  # a fresh manifest knows no moves
    r = cli("restore", str(ds), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["moved"] == ["tiny.png"]
    assert tree_hashes(ds) == before
    index = json.loads((ds / ".curate" / "quarantine" / "index.json").read_text())
    assert index["moves"] == []


def test_restore_reports_files_nothing_records(ds: Path):
    assert cli("scan", str(ds), "--json").exit_code == 0
    assert cli("filter", str(ds), "--apply").exit_code == 0
    (ds / ".curate" / "quarantine" / "index.json").unlink()
    for f in (ds / ".curate").glob("manifest.db*"):
        f.unlink()
    assert cli("scan", str(ds), "--json").exit_code == 0
    r = cli("restore", str(ds))
    assert r.exit_code == 1
    lines = skipped_lines(r)
    assert len(lines) == 1 and "tiny.png" in lines[0] and "by hand" in lines[0]
    assert (ds / ".curate" / "quarantine" / "tiny.png").exists()


def test_no_stage_writes_beside_a_manifest_row_outside_the_dataset(ds: Path, tmp_path: Path):
    import tests.tiny_wd14 as tiny_wd14

    outside = tmp_path / "outside"
    outside.mkdir()
    assert cli("scan", str(ds), "--json").exit_code == 0
    img = ds / "img1.png"
    st = img.stat()
    with db(ds) as conn:  # the same bytes recorded under a path that leads out
        conn.execute(
            "INSERT INTO files(path, sha256, size, mtime_ns, status) VALUES ('../outside/x.png',?,?,?, 'ok')",
            (sha(img), st.st_size, st.st_mtime_ns),
        )
    model = tiny_wd14.build(tmp_path / "tagger")
    r = cli("tag", str(ds), "--model", str(model), "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert list(outside.iterdir()) == []  # no caption written beside ../outside/x.png
    assert (ds / "img1.txt").exists()
