"""A person's caption file reaches the export byte for byte; curate's own captions end in one newline.

Journeys through the CLI on folders built here; each exported file is also read the way sd-scripts reads a
caption (text mode, first line, stripped), so the bytes kept never change what trains."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from curate.cli import app
from tests.images import textured

runner = CliRunner()

HAND = {  # stem -> the bytes of the person's caption file
    "nofinal": b"red hair, smile",
    "crlf": b"red hair, hat\r\n",
    "space": b"red hair, sitting \n",
    "bom": b"\xef\xbb\xbfblue eyes, smile\n",
}


def _cli(*args) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def _sd_scripts_caption(path: Path) -> str:
    """sd-scripts' read_caption: text mode, UTF-8, first line, stripped."""
    with open(path, encoding="utf-8") as f:
        return f.readlines()[0].strip()


def _dataset(root: Path) -> None:
    root.mkdir()
    for i, (stem, data) in enumerate(HAND.items()):
        textured(512, 512, seed=40 + i).save(root / f"{stem}.png")
        (root / f"{stem}.txt").write_bytes(data)
    textured(512, 512, seed=49).save(root / "nocap.png")  # no caption: curate writes the trigger


def _exported_captions(out: Path, key: str = "images") -> dict[str, Path]:
    """source stem -> its exported caption file, from the export record."""
    record = json.loads((out / "curate_export.json").read_text(encoding="utf-8"))
    out_files = {(out / r["file"]).with_suffix(".txt"): Path(r["source"]).stem for r in record[key]}
    return {stem: f for f, stem in out_files.items() if f.is_file()}


def test_hand_captions_exported_byte_for_byte(tmp_path: Path):
    ds = tmp_path / "ds"
    _dataset(ds)
    _cli("scan", ds)
    _cli("export", ds, tmp_path / "out", "--format", "kohya", "--class", "woman")
    caps = _exported_captions(tmp_path / "out")
    assert set(caps) == {"nofinal", "crlf", "space", "bom", "nocap"}
    assert caps["nofinal"].read_bytes() == b"red hair, smile"
    assert caps["crlf"].read_bytes() == b"red hair, hat\r\n"
    assert caps["space"].read_bytes() == b"red hair, sitting \n"
    assert caps["bom"].read_bytes() == b"blue eyes, smile\n"  # the BOM would be read into the first tag
    assert caps["nocap"].read_bytes() == b"woman\n"  # curate's caption (the class tokens): one newline
    assert _sd_scripts_caption(caps["bom"]) == "blue eyes, smile"
    for stem, data in HAND.items():  # the originals are untouched
        assert (ds / f"{stem}.txt").read_bytes() == data


def test_trigger_put_first_keeps_the_persons_line_ending(tmp_path: Path):
    ds = tmp_path / "ds"
    _dataset(ds)
    _cli("scan", ds)
    _cli("export", ds, tmp_path / "out", "--format", "kohya", "--trigger", "zz")
    caps = _exported_captions(tmp_path / "out")
    assert caps["nofinal"].read_bytes() == b"zz, red hair, smile"
    assert caps["crlf"].read_bytes() == b"zz, red hair, hat\r\n"
    assert caps["space"].read_bytes() == b"zz, red hair, sitting \n"
    assert caps["nocap"].read_bytes() == b"zz\n"
    want = {"nofinal": "zz, red hair, smile", "crlf": "zz, red hair, hat", "space": "zz, red hair, sitting",
            "bom": "zz, blue eyes, smile", "nocap": "zz"}  # fmt: skip
    assert {s: _sd_scripts_caption(p) for s, p in caps.items()} == want


def test_reg_caption_kept_byte_for_byte(tmp_path: Path):
    ds = tmp_path / "ds"
    _dataset(ds)
    reg = tmp_path / "reg"
    reg.mkdir()
    textured(512, 512, seed=60).save(reg / "r0.png")
    (reg / "r0.txt").write_bytes(b"a woman\r\n")
    textured(512, 512, seed=61).save(reg / "r1.png")
    (reg / "r1.txt").write_bytes(b"a  woman, outdoors")  # curate joins the double space: the ending is kept
    _cli("scan", ds)
    _cli("export", ds, tmp_path / "out", "--format", "kohya", "--reg", reg, "--class", "woman")
    regcaps = {s: p.read_bytes() for s, p in _exported_captions(tmp_path / "out", "reg").items()}
    assert regcaps == {"r0": b"a woman\r\n", "r1": b"a woman, outdoors"}
