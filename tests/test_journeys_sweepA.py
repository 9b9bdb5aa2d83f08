"""User journeys found by trying curate as a newcomer: `curate check` as a pre-commit gate after the user
decided by hand, `status --json` against its table, and the review page's API given bad requests.

Folders are built in tmp_path and the CLI runs through typer's CliRunner.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import ImageOps
from typer.testing import CliRunner

from curate.cli import app
from tests.images import textured

run = CliRunner().invoke


def small_set(root: Path) -> Path:
    """Two good pictures with captions, a mirrored copy of one and a tiny picture; scanned."""
    root.mkdir(parents=True)
    for s in (1, 2):
        textured(640, 640, seed=s).save(root / f"img{s}.png")
        (root / f"img{s}.txt").write_text(f"thing {s}\n")
    ImageOps.mirror(textured(640, 640, seed=1)).save(root / "img1_mirror.png")
    (root / "img1_mirror.txt").write_text("thing mirrored\n")
    textured(120, 120, seed=3).save(root / "tiny.png")
    (root / "tiny.txt").write_text("thing tiny\n")
    assert run(app, ["scan", str(root)]).exit_code == 0
    return root


def violations(root: Path) -> set[tuple[str, str]]:
    r = run(app, ["check", str(root), "--json"])
    doc = json.loads(r.stdout)
    assert r.exit_code == (0 if doc["ok"] else 1)
    return {(v["path"], v["rule"]) for v in doc["violations"]}


def test_check_honours_files_kept_by_hand(tmp_path):
    """`curate keep` says 'I want this file whatever filter and dedupe say': the pre-commit gate must let
    the commit through then, instead of blocking it for ever."""
    ds = small_set(tmp_path / "ds")
    assert violations(ds) == {("tiny.png", "too-small"), ("img1_mirror.png", "duplicate")}
    assert run(app, ["keep", str(ds), "tiny.png", "img1_mirror.png"]).exit_code == 0
    assert violations(ds) == set()
    r = run(app, ["check", str(ds)])
    assert r.exit_code == 0 and "all rules pass" in r.output
    # forgetting the decision brings the violations back
    assert run(app, ["keep", str(ds), "tiny.png", "--undo"]).exit_code == 0
    assert violations(ds) == {("tiny.png", "too-small")}


def test_check_hints_name_the_config_key_not_a_flag_check_lacks(tmp_path):
    """The check table said 'lower with --min-side', an option `curate check` does not have."""
    ds = small_set(tmp_path / "ds")
    r = run(app, ["check", str(ds), "--json"])
    detail = {v["path"]: v["detail"] for v in json.loads(r.stdout)["violations"]}["tiny.png"]
    assert "--min-side" not in detail
    assert "min_side" in detail and "curate.toml" in detail and "curate keep" in detail
    # the hint works: following it makes the check pass for that file
    (ds / "curate.toml").write_text("[filter]\nmin_side = 100\n")
    assert ("tiny.png", "too-small") not in violations(ds)
    # `curate filter` keeps naming its own flags
    r = run(app, ["filter", str(ds), "--json"])
    assert r.exit_code == 0


def test_status_json_lists_the_rejected_files_the_table_shows(tmp_path):
    ds = small_set(tmp_path / "ds")
    (ds / "broken.png").write_bytes(b"")
    for cmd in (["scan"], ["filter"], ["dedupe"]):
        assert run(app, [cmd[0], str(ds), *cmd[1:]]).exit_code == 0
    table = run(app, ["status", str(ds)]).output
    doc = json.loads(run(app, ["status", str(ds), "--json"]).stdout)
    assert doc["rejected_files"] == 3
    got = {(r["path"], r["stage"], r["reason"]) for r in doc["rejected"]}
    assert got == {
        ("broken.png", "scan", "empty"),
        ("tiny.png", "filter", "too-small"),
        ("img1_mirror.png", "dedupe", "duplicate"),
    }
    for path, stage, reason in got:  # every row of the JSON is in the table
        assert path in table and stage in table and reason in table


def _post(url: str, api: str, body: object) -> tuple[int, dict]:
    from tests.test_review import post_api

    return post_api(url, api, body)


def test_review_api_refuses_unknown_files_and_non_text_captions(tmp_path):
    """The review API recorded 'keep' for files that do not exist (and for each letter of a path sent as a
    string), and wrote the caption "None" into the user's caption file for a JSON null."""
    import pytest

    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from curate.dataset import Dataset
    from curate.review.server import running

    ds = small_set(tmp_path / "ds")
    caption = (ds / "img1.txt").read_bytes()
    with running(ds) as url:
        for body in (
            {"paths": ["nope.png"], "decision": "keep"},
            {"paths": "tiny.png", "decision": "keep"},
            {"paths": ["../outside.png"], "decision": "reject"},
        ):
            status, out = _post(url, "decide", body)
            assert status == 400 and not out["ok"], out
            assert "not an image of this dataset" in out["error"] or "list of files" in out["error"], out
        for body in ({"path": "img1.png", "text": None}, {"path": "img1.png", "parts": "abc"}):
            status, out = _post(url, "caption", body)
            assert status == 400 and not out["ok"], out
        status, out = _post(url, "decide", {"paths": ["tiny.png"], "decision": "keep"})
        assert status == 200 and out["ok"], out
    assert (ds / "img1.txt").read_bytes() == caption
    d = Dataset.open(ds, create=False, write=False)
    try:
        assert d.manifest.decisions() == {"tiny.png": ("keep", None)}
    finally:
        d.close()


def test_export_keeps_the_words_of_legacy_and_multi_line_captions(tmp_path):
    """A caption saved by a legacy Windows editor (cp1252) reached the export with U+FFFD for its accents,
    and a two-line tag caption was joined with a space, fusing the last tag of one line with the first of
    the next ("smile zed")."""
    ds = tmp_path / "ds" / "3_zed"
    ds.mkdir(parents=True)
    for i in range(4):
        textured(640, 640, seed=i).save(ds / f"z{i}.png")
    written = {
        "z0": "zed, café, naïve smile\r\n".encode("cp1252"),
        "z1": b"zed, red hair, smile\nzed, outdoors,\n\nblue sky\n",
        "z2": b"a photo of zed\nstanding in the rain.\n",
        "z3": "zed, bom\n".encode("utf-8-sig"),
    }
    for stem, raw in written.items():
        (ds / f"{stem}.txt").write_bytes(raw)
    root = ds.parent
    assert run(app, ["scan", str(root)]).exit_code == 0
    r = run(app, ["export", str(root), str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    exported = {p.read_text("utf-8") for p in (tmp_path / "out" / "img" / "3_zed").glob("*.txt")}
    assert exported == {
        "zed, café, naïve smile\n",
        "zed, red hair, smile, zed, outdoors, blue sky\n",
        "a photo of zed standing in the rain.\n",
        "zed, bom\n",
    }
    assert {p.stem: p.read_bytes() for p in ds.glob("*.txt")} == written  # the user's files untouched


def test_filter_allow_refuses_unknown_flags_and_takes_a_comma_list(tmp_path):
    """`--allow alhpa` (a typo) was accepted and silently allowed nothing."""
    from tests.test_roundtrip_train import one_line_error

    ds = tmp_path / "ds"
    ds.mkdir()
    rgba = textured(640, 640, seed=1).convert("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(ds / "alpha.png")
    textured(640, 640, seed=2).convert("CMYK").save(ds / "cmyk.jpg")
    textured(640, 640, seed=3).save(ds / "plain.png")
    assert run(app, ["scan", str(ds)]).exit_code == 0
    r = run(app, ["filter", str(ds), "--allow", "alhpa"])
    assert r.exit_code == 2
    one_line_error(r.output, "alhpa", "alpha")
    r = run(app, ["filter", str(ds), "--allow", "alpha,cmyk", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["filter"]["rejected"] == 0
    r = run(app, ["filter", str(ds), "--allow", "alpha", "--json"])
    assert json.loads(r.stdout)["filter"]["by_reason"] == {"cmyk": 1}


def test_export_before_filter_and_dedupe_says_what_it_let_through(tmp_path):
    """Export straight after scan exported the tiny picture and both copies of the mirrored pair, warning
    only about the split and the buckets."""
    ds = small_set(tmp_path / "ds")
    r = run(app, ["export", str(ds), str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["train"] == 4  # what the user is warned about: all four went out
    (w,) = [w for w in doc["warnings"] if "curate filter" in w]
    assert "curate dedupe" in w and "tiny" not in w
    # after filter and dedupe (even ones that reject nothing) the warning is gone
    for cmd in (["filter", "--min-side", "64"], ["dedupe"]):
        assert run(app, [cmd[0], str(ds), *cmd[1:]]).exit_code == 0
    r = run(app, ["export", str(ds), str(tmp_path / "out2"), "--json"])
    doc = json.loads(r.stdout)
    assert doc["train"] == 3  # the mirror is dropped, the tiny one passes min-side 64
    assert not [w for w in doc["warnings"] if "curate filter" in w or "curate dedupe" in w]
    # dedupe alone: the warning names only the filter
    ds2 = small_set(tmp_path / "ds2")
    assert run(app, ["dedupe", str(ds2)]).exit_code == 0
    doc = json.loads(run(app, ["export", str(ds2), str(tmp_path / "out3"), "--json"]).stdout)
    (w,) = [w for w in doc["warnings"] if "curate filter" in w]
    assert "curate dedupe" not in w


def test_scan_names_linked_folders_it_does_not_follow(tmp_path):
    """A concept folder that is a symlink (a shared folder linked in) was skipped without a word: its
    images never reached the export."""
    ds, shared = tmp_path / "ds", tmp_path / "shared" / "alice"
    ds.mkdir()
    shared.mkdir(parents=True)
    textured(640, 640, seed=1).save(ds / "own.png")
    textured(640, 640, seed=2).save(shared / "linked.png")
    (ds / "5_alice").symlink_to(shared, target_is_directory=True)
    r = run(app, ["scan", str(ds), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["total_files"] == 1 and doc["linked_folders"] == ["5_alice"]
    r = run(app, ["scan", str(ds)])
    (line,) = [ln for ln in r.output.splitlines() if ln.startswith("warning:")]
    assert "5_alice" in " ".join(r.output.split()) and "not followed" in line, r.output
    assert (shared / "linked.png").is_file() and (ds / "5_alice").is_symlink()  # nothing moved or removed


def test_curate_toml_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Windows editors save UTF-8 with a BOM; the file looked right and was refused as a TOML syntax error
    'at line 1, column 1'."""
    ds = small_set(tmp_path / "ds")
    (ds / "curate.toml").write_bytes("[filter]\r\nmin_side = 100\r\n".encode("utf-8-sig"))
    r = run(app, ["filter", str(ds), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["filter"]["rejected"] == 0  # tiny.png (120 px) passes min_side 100
    # a real syntax error is still one line naming the file
    (ds / "curate.toml").write_bytes("\ufeff[filter\nmin_side = 100\n".encode())
    r = run(app, ["filter", str(ds)])
    assert r.exit_code == 2 and "curate.toml" in r.output and "Traceback" not in r.output
    (ds / "curate.toml").write_bytes("[filter]\nmin_side = 100\n".encode("utf-16"))
    r = run(app, ["filter", str(ds)])
    assert r.exit_code == 2 and "save it as UTF-8" in " ".join(r.output.split()), r.output


def test_check_reads_a_messy_metadata_jsonl_without_a_traceback(tmp_path):
    """With captions in metadata.jsonl, a line that is JSON but not an object, or a file in a legacy
    encoding, made `curate check` crash with a traceback."""
    ds = tmp_path / "ds"
    ds.mkdir()
    for i in range(2):
        textured(640, 640, seed=i).save(ds / f"p{i}.png")
    (ds / "curate.toml").write_text('[caption]\nformat = "jsonl"\n')
    for raw in (
        b'{"file_name": "p0.png", "text": "one, a"}\n[1, 2]\n"text"\n{"file_name": "p1.png", "text": "two, b"}\n',
        '{"file_name": "p0.png", "text": "café, a"}\n{"file_name": "p1.png", "text": "two, b"}\n'.encode(
            "cp1252"
        ),
    ):
        (ds / "metadata.jsonl").write_bytes(raw)
        r = run(app, ["check", str(ds), "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout) == {"ok": True, "violations": []}
    (ds / "metadata.jsonl").write_bytes(b'{"file_name": "p0.png", "text": "one, a"}\n')
    r = run(app, ["check", str(ds), "--json"])  # p1 has no caption now: a violation, not a crash
    assert r.exit_code == 1
    assert {(v["path"], v["rule"]) for v in json.loads(r.stdout)["violations"]} == {("p1.png", "no-caption")}


def _git(repo: Path, *args: str) -> None:
    import subprocess

    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@e",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@e",
    }
    subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, env={**__import__("os").environ, **env}
    )


def test_check_git_judges_only_what_the_commit_holds(tmp_path):
    """As a pre-commit hook, `curate check .` failed the commit over images git ignores (a raw/ folder in
    .gitignore) or that were never added; `--git` (the hook's argument) looks only at tracked files."""
    import shutil

    import pytest

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = small_set(tmp_path / "repo")
    r = run(app, ["check", str(repo), "--git"])
    assert r.exit_code == 2 and "not in a git work tree" in r.output and "Traceback" not in r.output, r.output
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_text(".curate/\nraw/\n")
    (repo / "raw").mkdir()
    shutil.copy(repo / "tiny.png", repo / "raw" / "junk.png")  # ignored: tiny and a duplicate
    shutil.copy(repo / "img2.png", repo / "raw" / "img2_again.png")  # ignored copy of a tracked image
    shutil.copy(repo / "img1.png", repo / "untracked_copy.png")  # never added
    _git(repo, "add", ".gitignore", "img1.png", "img1.txt", "img2.png", "img2.txt", "tiny.png", "tiny.txt")
    doc = json.loads(run(app, ["check", str(repo), "--json"]).stdout)  # the whole folder, as before
    assert {v["path"] for v in doc["violations"]} >= {"raw/junk.png", "untracked_copy.png", "img1_mirror.png"}
    r = run(app, ["check", str(repo), "--git", "--json"])
    doc = json.loads(r.stdout)
    assert r.exit_code == 1
    assert {(v["path"], v["rule"]) for v in doc["violations"]} == {("tiny.png", "too-small")}
    # the user keeps it by hand: the commit passes
    assert run(app, ["keep", str(repo), "tiny.png"]).exit_code == 0
    r = run(app, ["check", str(repo), "--git"])
    assert r.exit_code == 0, r.output
    # the hook passes the flag
    hooks = (Path(__file__).resolve().parents[1] / ".pre-commit-hooks.yaml").read_text()
    assert 'args: [".", "--git"]' in hooks


def test_diffusers_export_keeps_the_users_metadata_columns(tmp_path):
    """An imagefolder dataset's metadata.jsonl columns besides text (style, score, ...) were dropped by
    `export --format diffusers`: the hand-off lost the user's data."""
    ds = tmp_path / "ds"
    (ds / "sub").mkdir(parents=True)
    rows = [
        {"file_name": "p0.png", "text": "photo 0", "style": "oil", "score": 7},
        {"file_name": "sub/p1.png", "text": "photo 1", "style": "ink", "score": 3},
    ]
    for i, row in enumerate(rows):
        textured(640, 640, seed=i).save(ds / row["file_name"])
    (ds / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    textured(640, 640, seed=5).save(ds / "sub" / "p2.png")  # no entry: text only
    (ds / "sub" / "p2.txt").write_text("photo 2\n")
    assert run(app, ["scan", str(ds)]).exit_code == 0
    r = run(app, ["export", str(ds), str(tmp_path / "out"), "--format", "diffusers"])
    assert r.exit_code == 0, r.output
    lines = [
        json.loads(ln) for ln in (tmp_path / "out" / "train" / "metadata.jsonl").read_text().splitlines()
    ]
    got = sorted(({k: v for k, v in ln.items() if k != "file_name"} for ln in lines), key=lambda d: d["text"])
    assert got == [
        {"text": "photo 0", "style": "oil", "score": 7},
        {"text": "photo 1", "style": "ink", "score": 3},
        {"text": "photo 2"},
    ]
    assert all((tmp_path / "out" / "train" / ln["file_name"]).is_file() for ln in lines)


def test_a_multi_line_caption_set_by_hand_keeps_its_tags_apart(tmp_path):
    """`Dataset.set_caption` (and the review page's text box) joined lines with a space: "smile\\nhat"
    became the one tag "smile hat"."""
    from curate.dataset import Dataset

    ds = small_set(tmp_path / "ds")
    d = Dataset.open(ds)
    try:
        d.set_caption("img2.png", "thing 2, smile\nred hat,\nblue sky")
    finally:
        d.close()
    assert (ds / "img2.txt").read_text() == "thing 2, smile, red hat, blue sky\n"
    d = Dataset.open(ds)
    try:
        d.set_caption("img2.png", "A photo of a thing\nin the rain.")  # a sentence: a space
    finally:
        d.close()
    assert (ds / "img2.txt").read_text() == "A photo of a thing in the rain.\n"


def test_filter_summary_names_rejects_kept_by_hand(tmp_path):
    """After `curate keep tiny.png`, `curate filter` still said "1 of 4 images rejected" with an empty
    example column, though tiny.png is exported."""
    ds = small_set(tmp_path / "ds")
    assert run(app, ["keep", str(ds), "tiny.png"]).exit_code == 0
    doc = json.loads(run(app, ["filter", str(ds), "--json"]).stdout)["filter"]
    assert (doc["checked"], doc["rejected"], doc["kept_by_hand"]) == (4, 1, ["tiny.png"])
    out = " ".join(run(app, ["filter", str(ds)]).output.split())
    assert "tiny.png" in out and "kept by hand" in out


def test_dedupe_summary_says_which_decisions_by_hand_win(tmp_path):
    """With the mirror kept by hand, `curate dedupe` printed "kept img1.png, dropped img1_mirror.png" and
    nothing else, though export takes both; a keeper rejected by hand (its exact copy is a duplicate)
    was shown as kept."""
    import shutil

    ds = small_set(tmp_path / "ds")
    shutil.copy(ds / "img2.png", ds / "img2_copy.png")
    assert run(app, ["scan", str(ds)]).exit_code == 0
    assert run(app, ["keep", str(ds), "img1_mirror.png"]).exit_code == 0
    doc = json.loads(run(app, ["dedupe", str(ds), "--json"]).stdout)["dedupe"]
    keepers = {g["keeper"] for g in doc["groups"]}
    assert keepers == {"img1.png", "img2.png"}
    assert doc["by_hand"] == {"kept": ["img1_mirror.png"], "rejected": []}
    assert run(app, ["reject", str(ds), "img2.png", "--reason", "worse"]).exit_code == 0
    doc = json.loads(run(app, ["dedupe", str(ds), "--json"]).stdout)["dedupe"]
    assert {g["keeper"] for g in doc["groups"]} == keepers
    assert doc["by_hand"] == {"kept": ["img1_mirror.png"], "rejected": ["img2.png"]}
    out = " ".join(run(app, ["dedupe", str(ds)]).output.split())
    assert "img1_mirror.png kept by hand" in out and "img2.png rejected by hand" in out, out
    # no decision by hand: no note, no key
    ds2 = small_set(tmp_path / "ds2")
    doc = json.loads(run(app, ["dedupe", str(ds2), "--json"]).stdout)["dedupe"]
    assert "by_hand" not in doc


def test_an_image_fixed_by_the_user_is_not_quarantined_for_its_old_faults(tmp_path):
    """The user crops the panorama and replaces the tiny picture, then rescans: the filter's rejects of the
    old bytes stayed on the paths, so export left the fixed images out and `curate apply` quarantined
    them, while `curate check` said all rules pass."""
    ds = tmp_path / "ds"
    ds.mkdir()
    textured(640, 640, seed=1).save(ds / "good.png")
    textured(2400, 600, seed=2).save(ds / "pano.png")
    textured(100, 100, seed=3).save(ds / "small.png")
    for cmd in ("scan", "filter", "dedupe"):
        assert run(app, [cmd, str(ds)]).exit_code == 0
    textured(2400, 600, seed=2).crop((0, 0, 800, 600)).save(ds / "pano.png")
    textured(700, 700, seed=9).save(ds / "small.png")
    doc = json.loads(run(app, ["scan", str(ds), "--json"]).stdout)
    assert doc["changed"] == 2
    assert json.loads(run(app, ["status", str(ds), "--json"]).stdout)["rejected"] == []
    r = run(app, ["export", str(ds), str(tmp_path / "out"), "--json"])
    doc = json.loads(r.stdout)
    assert doc["train"] == 3
    (w,) = [w for w in doc["warnings"] if "changed since" in w]
    assert "2 image(s)" in w and "curate filter" in w and "curate dedupe" in w
    r = run(app, ["apply", str(ds), "--json"])
    assert json.loads(r.stdout)["moved"] == []
    assert sorted(p.name for p in ds.glob("*.png")) == ["good.png", "pano.png", "small.png"]
    # filter and dedupe again: the warning goes, and the new bytes are judged (both pass now)
    for cmd in ("filter", "dedupe"):
        assert run(app, [cmd, str(ds)]).exit_code == 0
    doc = json.loads(run(app, ["export", str(ds), str(tmp_path / "out2"), "--json"]).stdout)
    assert doc["train"] == 3 and not [w for w in doc["warnings"] if "changed since" in w]


def test_nothing_kept_says_everything_was_rejected_not_to_scan(tmp_path):
    """When the filter rejected every image, split and export said "run `curate scan` first"."""
    from tests.test_roundtrip_train import one_line_error

    ds = tmp_path / "ds"
    ds.mkdir()
    for s in (1, 2):
        textured(100, 100, seed=s).save(ds / f"small{s}.png")
    for cmd in ("scan", "filter"):
        assert run(app, [cmd, str(ds)]).exit_code == 0
    for cmd in (["split", str(ds)], ["export", str(ds), str(tmp_path / "out")]):
        r = run(app, cmd)
        assert r.exit_code == 2
        one_line_error(r.output, "all 2 files are rejected or unusable", "curate status")
        assert "curate scan" not in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(app, ["scan", str(empty)]).exit_code == 0
    r = run(app, ["split", str(empty)])
    one_line_error(r.output, "no images", "curate scan")


def test_a_move_made_in_review_survives_curate_split(tmp_path):
    """Moving an image to val in `curate review` was undone silently by the next `curate split` (or
    `curate run`)."""
    import pytest

    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from curate.dataset import Dataset
    from curate.review.server import running

    ds = tmp_path / "ds"
    ds.mkdir()
    for s in range(6):
        textured(640, 640, seed=s).save(ds / f"img{s}.png")
    for cmd in (["scan"], ["filter"], ["dedupe"], ["split", "--val", "0.2"]):
        assert run(app, [cmd[0], str(ds), *cmd[1:]]).exit_code == 0

    def sides() -> dict[str, str]:
        d = Dataset.open(ds, create=False, write=False)
        try:
            return {r.path: r.split for r in d.kept()}
        finally:
            d.close()

    seeded = sides()
    moved = next(p for p, s in seeded.items() if s == "train")
    sha = {r.path: r.sha256 for r in Dataset.open(ds, create=False, write=False).kept()}[moved]
    with running(ds) as url:
        status, out = _post(url, "move", {"sha": sha, "side": "val"})
        assert status == 200 and out["ok"], out
    r = run(app, ["split", str(ds), "--val", "0.2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["moved_by_hand"] == 1
    assert sides() == {**seeded, moved: "val"}
    r = run(app, ["split", str(ds), "--val", "0.2"])
    assert "moved by hand" in " ".join(r.output.split())
    # undo in the review forgets the move for later splits too
    with running(ds) as url:
        assert _post(url, "undo", {})[0] == 200
    assert run(app, ["split", str(ds), "--val", "0.2"]).exit_code == 0
    assert sides() == seeded
    # and --clear-moves forgets every move
    with running(ds) as url:
        assert _post(url, "move", {"sha": sha, "side": "val"})[0] == 200
    r = run(app, ["split", str(ds), "--val", "0.2", "--clear-moves", "--json"])
    assert json.loads(r.stdout)["moved_by_hand"] == 0 and sides() == seeded


def test_keep_refuses_a_file_that_is_gone(tmp_path):
    """`curate keep DS tiny.png` after tiny.png was deleted (and rescanned) said "kept 1 file(s) by hand"."""
    from tests.test_roundtrip_train import one_line_error

    ds = small_set(tmp_path / "ds")
    (ds / "tiny.png").unlink()
    assert run(app, ["scan", str(ds)]).exit_code == 0
    for cmd in ("keep", "reject"):
        r = run(app, [cmd, str(ds), "tiny.png"])
        assert r.exit_code == 2, r.output
        one_line_error(r.output, "tiny.png", "gone")
    assert json.loads(run(app, ["status", str(ds), "--json"]).stdout)["manual_keep"] == 0
    # forgetting a decision on a file that went away still works
    ds2 = small_set(tmp_path / "ds2")
    assert run(app, ["keep", str(ds2), "tiny.png"]).exit_code == 0
    (ds2 / "tiny.png").unlink()
    assert run(app, ["scan", str(ds2)]).exit_code == 0
    assert run(app, ["keep", str(ds2), "tiny.png", "--undo"]).exit_code == 0


def test_files_moved_into_a_concept_folder_keep_their_rejects_and_decisions(tmp_path):
    """Reorganising after a scan (tiny.png and the mirrored copy moved into 3_stuff/) made both count as new
    files: export took the tiny picture and the duplicate; a keep by hand was lost the same way."""
    ds = small_set(tmp_path / "ds")
    textured(640, 640, seed=7).save(ds / "mine.png")
    for cmd in ("scan", "filter", "dedupe"):
        assert run(app, [cmd, str(ds)]).exit_code == 0
    assert run(app, ["reject", str(ds), "mine.png", "--reason", "off-model"]).exit_code == 0
    (ds / "3_stuff").mkdir()
    for name in ("tiny.png", "tiny.txt", "img1_mirror.png", "img1_mirror.txt", "mine.png"):
        (ds / name).rename(ds / "3_stuff" / name)
    doc = json.loads(run(app, ["scan", str(ds), "--json"]).stdout)
    assert doc["missing"] == 3 and doc["moved"] == 3
    st = json.loads(run(app, ["status", str(ds), "--json"]).stdout)
    assert {(r["path"], r["reason"]) for r in st["rejected"]} == {
        ("3_stuff/tiny.png", "too-small"),
        ("3_stuff/img1_mirror.png", "duplicate"),
        ("3_stuff/mine.png", "off-model"),
    }
    doc = json.loads(run(app, ["export", str(ds), str(tmp_path / "out"), "--json"]).stdout)
    assert doc["train"] == 2  # img1 and img2 only
