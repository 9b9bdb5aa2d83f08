"""Foundation: scan, quality scores, hash dedupe, filter, quarantine, check; on images built in code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from curate import Dataset
from curate.cli import app
from curate.stages.dedupe import _pairs_bruteforce, near_pairs
from curate.stages.quality import analysis_view, sharpness
from tests.images import jpeg_bytes, textured, tree_hashes

runner = CliRunner()


def run_cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_planted_duplicates_grouped_with_intended_keeper(planted: Path):
    with Dataset.open(planted) as ds:
        res = ds.scan(workers=1)
        assert res.decoded == 8  # 9 files, one exact copy shares its bytes
        ds.filter()
        result = ds.dedupe()
        # One group, listed once: the exact copy and the near duplicate both join the keeper.
        (near,) = result.groups
        assert near.method == "auto"
        assert near.keeper == "big.jpg"  # JPEG q92 original over the q75 800px copy
        assert near.members == ["big.jpg", "sub/big_copy.jpg", "big_800.jpg"]
        assert "identical bytes" in near.explain[1]
        assert "fewer compression artifacts (JPEG quality 92 vs 75)" in near.explain[2]
        rejected = ds.manifest.rejected_paths()
        assert rejected["big_800.jpg"][0][1] == "duplicate"
        assert rejected["sub/big_copy.jpg"][0][1] == "duplicate"
        assert "big.jpg" not in rejected
        kept = {r.path for r in ds.kept()}
        assert kept == {"big.jpg", "distinct_2.png", "distinct_3.png", "distinct_4.png", "distinct_5.png"}


def test_blurred_and_tiny_rejected_with_reason(planted: Path):
    with Dataset.open(planted) as ds:
        ds.scan(workers=1)
        ds.filter()
        rej = ds.manifest.rejected_paths()
        assert [r for _, r, _ in rej["blurred.jpg"]] == ["blurry"]
        assert [r for _, r, _ in rej["tiny.png"]] == ["too-small"]
        for name in ("distinct_2.png", "big.jpg"):
            assert name not in rej
        # Re-thresholding works on stored scores: lowering min_side accepts the tiny image.
        ds.filter(min_side=128)
        assert "tiny.png" not in ds.manifest.rejected_paths()


def test_sharpness_is_resolution_independent_and_drops_with_blur():
    img = textured(1600, 1200, seed=3)
    s_big = sharpness(analysis_view(img))
    s_small = sharpness(analysis_view(img.resize((400, 300), Image.Resampling.LANCZOS)))
    s_blur = sharpness(analysis_view(img.filter(ImageFilter.GaussianBlur(8))))
    assert abs(s_big - s_small) / s_big < 0.35
    assert s_blur < 0.1 * s_big


def _bad_inputs(root: Path) -> dict[str, str]:
    """Write every kind of bad input; return file -> expected reject reason."""
    root.mkdir(parents=True, exist_ok=True)
    good = textured(600, 600, seed=11)
    (root / "zero.jpg").write_bytes(b"")
    data = jpeg_bytes(good)
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "text.png").write_text("not an image at all")
    textured(700, 700, seed=12).save(root / "bomb.png")  # over the pixel limit set below
    Image.fromarray(np.asarray(good)).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray((np.random.default_rng(0).random((600, 600)) * 65535).astype(np.uint16)).save(
        root / "g16.png"
    )
    pal = good.convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(root / "palette_alpha.png", transparency=0)
    frames = [textured(600, 600, seed=s) for s in (13, 14)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    os.symlink("does_not_exist.jpg", root / "broken.jpg")
    good.save(root / "unreadable.jpg")
    good.save(root / "ünïcödé 画像.jpg")
    textured(600, 600, seed=15).save(root / "ok.webp")
    textured(600, 600, seed=16).save(root / "ok.bmp")
    textured(600, 600, seed=17).save(root / "ok.tiff")
    return {
        "zero.jpg": "empty",
        "truncated.jpg": "truncated",
        "text.png": "not-an-image",
        "bomb.png": "bomb",
        "cmyk.jpg": "cmyk",
        "g16.png": "16bit",
        "palette_alpha.png": "alpha",
        "anim.gif": "animated",
        "broken.jpg": "broken-symlink",
        "unreadable.jpg": "unreadable",
    }


def test_every_bad_input_is_reported_not_crashed(tmp_path: Path, monkeypatch):
    root = tmp_path / "bad"
    expected = _bad_inputs(root)
    (root / "curate.toml").write_text("[scan]\nmax_pixels = 400000\n")
    unreadable = str(root / "unreadable.jpg")
    if os.geteuid() == 0:  # root reads anything: make the read fail the way it does for users
        real = Path.read_bytes

        def read_bytes(self):
            if str(self) == unreadable:
                raise PermissionError(13, "Permission denied")
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    else:
        os.chmod(unreadable, 0)
    before = tree_hashes(root)
    with Dataset.open(root) as ds:
        ds.scan(workers=1)
        ds.filter()
        rejected = ds.manifest.rejected_paths()
        for name, reason in expected.items():
            reasons = [r for _, r, _ in rejected.get(name, [])]
            assert reason in ",".join(reasons), (name, reasons)
        for ok in ("ünïcödé 画像.jpg", "ok.webp", "ok.bmp", "ok.tiff"):
            assert ok not in rejected, (ok, rejected.get(ok))
        recs = {r.path: r for r in ds.images()}
        assert recs["ok.webp"].format == "WEBP" and recs["ok.tiff"].format == "TIFF"
        assert "animated" in recs["anim.gif"].flags
        violations = ds.check()
        flagged = {v.path for v in violations}
        assert set(expected) <= flagged
        report = ds.report().read_text()
        for name in expected:
            assert name in report
    assert tree_hashes(root) == before


def test_exif_orientation_swaps_size(tmp_path: Path):
    root = tmp_path / "exif"
    root.mkdir()
    img = textured(800, 600, seed=21)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(root / "rot.jpg", exif=exif.tobytes(), quality=90)
    with Dataset.open(root) as ds:
        ds.scan(workers=1)
        (rec,) = ds.images()
        assert (rec.width, rec.height) == (600, 800)
        assert "exif-rotated" in rec.flags


def test_incremental_scan_reads_only_new_or_changed(planted: Path):
    with Dataset.open(planted) as ds:
        first = ds.scan(workers=1)
        assert first.scanned == 9
        again = ds.scan(workers=1)
        assert (again.scanned, again.unchanged, again.decoded) == (0, 9, 0)
        # Same bytes, new mtime: hashed again but not decoded.
        os.utime(planted / "big.jpg", ns=(1, 1))
        touched = ds.scan(workers=1)
        assert (touched.scanned, touched.decoded) == (1, 0)
        textured(600, 600, seed=99).save(planted / "distinct_2.png")
        changed = ds.scan(workers=1)
        assert (changed.scanned, changed.decoded) == (1, 1)


def test_interrupted_scan_keeps_committed_work(planted: Path):
    calls = {"n": 0}

    def stop_after_three(done: int, total: int) -> None:
        calls["n"] = done
        if done == 3:
            raise KeyboardInterrupt

    with Dataset.open(planted) as ds:
        with pytest.raises(KeyboardInterrupt):  # committed, then re-raised: the caller exits 130
            ds.scan(workers=1, progress=stop_after_three)
        n_files = ds.manifest.conn.execute("SELECT count(*) FROM files").fetchone()[0]
        assert n_files == 3
    with Dataset.open(planted) as ds:  # a fresh process would see the same rows
        res = ds.scan(workers=1)
        assert not res.interrupted
        assert res.scanned == 6 and res.unchanged == 3


def test_parallel_scan_matches_serial(planted: Path, tmp_path: Path):
    with Dataset.open(planted) as ds:
        ds.scan(workers=2)
        par = {r.path: (r.phash, r.dhash, r.scores["sharpness"]) for r in ds.images()}
    other = Dataset.open(planted, manifest=tmp_path / "serial.db")
    other.scan(workers=1)
    ser = {r.path: (r.phash, r.dhash, r.scores["sharpness"]) for r in other.images()}
    assert par == ser


@pytest.mark.parametrize("threshold", [3, 8, 12])
def test_multi_index_search_equals_bruteforce(threshold: int):
    rng = np.random.default_rng(threshold)
    n = 6000  # above the brute-force cut-off, so the multi-index path runs
    codes = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    for k in range(300):  # planted near duplicates at distances 0..14
        src = int(rng.integers(300, n))
        bits = rng.choice(64, size=k % 15, replace=False)
        c = int(codes[src])
        for b in bits:
            c ^= 1 << int(b)
        codes[k] = np.uint64(c)
    i, j, d = near_pairs(codes, threshold)
    bi, bj, bd = _pairs_bruteforce(codes, threshold)
    got = set(zip(i.tolist(), j.tolist(), strict=True))
    want = set(zip(bi.tolist(), bj.tolist(), strict=True))
    assert got == want
    assert len(want) >= 300 * (min(threshold, 14) + 1) // 15  # the planted pairs are there
    assert (d <= threshold).all()


def test_apply_quarantines_and_restore_undoes(planted: Path):
    before = tree_hashes(planted)
    with Dataset.open(planted) as ds:
        ds.scan(workers=1)
        ds.filter()
        ds.dedupe()
        res = ds.apply()
        assert sorted(res.moved) == ["big_800.jpg", "blurred.jpg", "sub/big_copy.jpg", "tiny.png"]
        assert not (planted / "tiny.png").exists()
        assert (planted / ".curate/quarantine/sub/big_copy.jpg").exists()
        assert ds.summary()["quarantined"] == 4
        # A rescan does not forget quarantined files or call them missing.
        again = ds.scan(workers=1)
        assert again.missing == 0
        # A new file in the old place is never overwritten by restore.
        (planted / "tiny.png").write_bytes(b"user's new file")
        back = ds.restore()
        assert sorted(back.moved) == ["big_800.jpg", "blurred.jpg", "sub/big_copy.jpg"]
        assert back.skipped and back.skipped[0][0] == "tiny.png"
        assert (planted / "tiny.png").read_bytes() == b"user's new file"
        (planted / "tiny.png").unlink()
        assert ds.restore().moved == ["tiny.png"]
    assert tree_hashes(planted) == before


def test_whole_pipeline_changes_no_user_file(planted: Path):
    before = tree_hashes(planted)
    for args in (["scan"], ["filter"], ["dedupe"], ["report"], ["status"]):
        r = run_cli(*args, str(planted))
        assert r.exit_code == 0, r.output
    r = run_cli("check", str(planted))
    assert r.exit_code == 1
    assert tree_hashes(planted) == before


def test_cli_json_and_check_exit_codes(planted: Path, tmp_path: Path):
    r = run_cli("scan", str(planted), "--json")
    data = json.loads(r.stdout)
    assert data["decoded"] == 8 and data["summary"]["files"] == 9
    r = run_cli("check", str(planted), "--json")
    assert r.exit_code == 1
    rules = {(v["path"], v["rule"]) for v in json.loads(r.stdout)["violations"]}
    assert {("tiny.png", "too-small"), ("blurred.jpg", "blurry"), ("big_800.jpg", "duplicate")} <= rules
    clean = tmp_path / "clean"
    clean.mkdir()
    for s in (31, 32):
        textured(640, 640, seed=s).save(clean / f"{s}.png")
    r = run_cli("check", str(clean), "--json")
    assert r.exit_code == 0, r.stdout
    assert json.loads(r.stdout)["ok"] is True


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["scan", "/nonexistent/folder"], "does not exist"),
        (["filter", "{root}"], "run `curate scan"),
        (["dedupe", "{root}", "--phash-threshold", "99"], "between 0 and 64"),
        (["check", "{root}", "--rule", "nope"], "unknown rule"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path: Path, args, needle):
    root = tmp_path / "empty"
    root.mkdir()
    args = [a.replace("{root}", str(root)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "curate", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_config_is_a_one_line_error(planted: Path):
    (planted / "curate.toml").write_text("[filter]\nmin_sid = 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "curate", "scan", str(planted)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown option(s) min_sid" in proc.stderr


def test_cli_does_not_import_torch():
    code = "import sys, curate.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
