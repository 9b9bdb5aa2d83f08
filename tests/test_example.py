"""The README's first command on the bundled example finds exactly the planted problems."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from curate.cli import app
from tests.images import tree_hashes

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "messy"

EXPECTED_REJECTS = {
    "misc/coffee (copy).jpg": "duplicate",
    "misc/rocket_small.jpg": "duplicate",
    "downloads/astronaut_400.webp": "duplicate",
    "downloads/chelsea_blurred.jpg": "blurry",
    "downloads/coins_thumb.png": "too-small",
    "downloads/brick_dark.jpg": "too-dark",
    "downloads/hubble_strip.jpg": "aspect",
    "downloads/grey_placeholder.png": "low-information",
    "downloads/moon_partial.jpg": "truncated",
    "downloads/notes.jpg": "not-an-image",
    "downloads/empty.png": "empty",
    # Native-resolution 60 % x 60 % crops of the full Hubble photo that misc/hubble.jpg shows whole:
    # dedupe --method auto (the default) links them by ORB + RANSAC and keeps the uncropped copy.
    "misc/hubble_crop0.jpg": "duplicate",
    "misc/hubble_crop1.jpg": "duplicate",
}


def test_run_on_bundled_example(tmp_path: Path):
    ds = tmp_path / "messy"
    shutil.copytree(EXAMPLE, ds, ignore=shutil.ignore_patterns(".curate"))
    before = tree_hashes(ds)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", str(ds), "--out", str(out), "--trigger", "messy", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    check = CliRunner().invoke(app, ["check", str(ds), "--no-scan", "--json"])
    found: dict[str, set[str]] = {}
    for v in json.loads(check.stdout)["violations"]:
        found.setdefault(v["path"], set()).add(v["rule"])
    # One image has a user caption, so the caption rule asks for the other 18 kept images' captions.
    no_caption = {p for p, rules in found.items() if rules == {"no-caption"}}
    assert len(no_caption) == 18 and "portraits/astronaut.jpg" not in found
    found = {p: rules - {"no-caption"} for p, rules in found.items() if rules - {"no-caption"}}
    for path, rule in EXPECTED_REJECTS.items():
        assert rule in found.get(path, set()), (path, found.get(path))
    # Nothing else is flagged except the soft microscope image (cell.jpg is genuinely blurry).
    assert set(found) - set(EXPECTED_REJECTS) == {"misc/cell.jpg"}
    assert summary["kept"] == 19
    assert summary["export"]["train"] + summary["export"]["val"] == 19
    caption = (out / "img").rglob("*.txt").__next__().read_text()
    assert caption.startswith("messy")
    assert (out / "train.toml").exists() and (out / "dataset.toml").exists()
    assert tree_hashes(ds) == before
    # A second run never overwrites the export.
    again = CliRunner().invoke(app, ["run", str(ds), "--out", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output
