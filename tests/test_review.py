"""`curate review`: the page driven in headless Chromium (Playwright), then the manifest, caption files and
`curate export` checked; the state layer's group split / merge / leak-free move / undo without a browser."""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import ImageFilter
from typer.testing import CliRunner

from curate.cli import app
from curate.dataset import Dataset
from tests.images import textured

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

runner = CliRunner()
CHROMIUM = "/usr/bin/chromium"
CAPTIONS = {
    "img0": "ohwx, red hat, smile, outdoors",
    "img1": "ohwx, blue sky, outdoors",
    "img2": "ohwx, smile, red hat",
    "img3": "ohwx, indoors, lamp",
    "img4": "ohwx, smile, watermark",
    "img5": "ohwx, outdoors, watermark, tree",
}


def build_dataset(root: Path) -> Path:
    """Six distinct images with hand captions, two planted near-duplicates, a blurred and a tiny reject,
    a wide image (cropped by its bucket); scan, filter, dedupe, split, bucket and the trigger word run."""
    root.mkdir(parents=True)
    for i in range(6):
        (textured(768, 576, seed=i) if i % 2 else textured(640, 640, seed=i)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(CAPTIONS[f"img{i}"] + "\n")
    textured(640, 640, seed=0).resize((600, 600)).save(root / "img0_copy.png")
    textured(768, 576, seed=1).resize((700, 525)).save(root / "img1_small.png")
    textured(1200, 560, seed=9).save(root / "wide.png")
    textured(640, 640, seed=7).filter(ImageFilter.GaussianBlur(12)).save(root / "blur.png")
    textured(300, 300, seed=8).save(root / "tiny.png")
    steps = (
        ["scan"],
        ["filter"],
        ["dedupe"],
        ["split", "--val", "0.3"],
        ["bucket"],
        ["edit", "--trigger", "ohwx"],
    )
    for cmd in steps:
        res = runner.invoke(app, [cmd[0], str(root), *cmd[1:]])
        assert res.exit_code == 0, res.output
    return root


def _get(url: str, headers: dict | None = None) -> tuple[int, dict[str, str]]:
    u = urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    c.request("GET", u.path + (f"?{u.query}" if u.query else ""), headers=headers or {})
    r = c.getresponse()
    r.read()
    c.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}


def _state(root: Path):
    with Dataset.open(root, create=False, write=False) as d:
        recs = {r.path: r for r in d.manifest.images()}
        kept = {p for r in d.kept() for p in r.paths}
        rejected = d.manifest.rejected_paths()
        decisions = d.manifest.decisions()
    return recs, kept, rejected, decisions


@pytest.mark.slow
def test_review_in_the_browser(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no Chromium at /usr/bin/chromium (apt-get install chromium)")
    from curate.review.server import running

    root = build_dataset(tmp_path / "ds")
    recs, kept, rejected, _ = _state(root)
    assert recs["img0.png"].dup_keeper and not recs["img0_copy.png"].dup_keeper
    assert {"img0_copy.png", "img1_small.png"} <= rejected.keys() and "blur.png" in rejected
    with Dataset.open(root, create=False) as d:  # tag scores as `curate tag` caches them
        from curate.stages.tag import TABLES

        d.manifest.ensure_table(TABLES)
        d.manifest.conn.execute(
            "INSERT INTO tag_scores(sha256, model, scores, at) VALUES (?,?,?,0)",
            (recs["img1.png"].sha256, "wd-test", json.dumps({"blue_sky": 0.91, "outdoors": 0.66})),
        )
        d.manifest.set_meta("tag.model", "wd-test")
    with running(root) as url, sync_api.sync_playwright() as p:
        base, token = url.split("?")
        # -- a request without the token (or with another host name) is refused
        assert _get(base + "dups")[0] == 403
        assert _get(base + "dups?token=wrong")[0] == 403
        assert _get(url, {"Host": f"example.com:{urlsplit(url).port}"})[0] == 403
        status, headers = _get(base + "dups?" + token)
        assert status == 200
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert _get(base + "captions", {"Cookie": cookie.split(";")[0]})[0] == 200

        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        expect = sync_api.expect
        flash = page.locator("#flash")

        # -- duplicates: the keeper in words and colour, the evidence, then a new keeper
        page.goto(url)
        page.wait_for_url("**/dups")
        group = page.locator("section.group", has=page.locator('[data-path="img0_copy.png"]'))
        expect(group.locator(".card.keeper .label")).to_have_text("KEEPER")
        assert group.locator(".card.keeper").get_attribute("data-path") == "img0.png"
        copy = group.locator('.card[data-path="img0_copy.png"]')
        expect(copy.locator(".label")).to_have_text("DROPPED — duplicate of img0.png")
        assert "pHash distance" in copy.locator(".evidence").inner_text()
        assert (
            page.evaluate("getComputedStyle(document.querySelector('.card.keeper')).borderTopColor")
            == "rgb(34, 170, 34)"
        )
        copy.get_by_role("button", name="Make keeper").click()
        expect(flash).to_contain_text("keep img0_copy.png instead of img0.png")
        recs, kept, rejected, _ = _state(root)
        assert recs["img0_copy.png"].dup_keeper and not recs["img0.png"].dup_keeper
        assert "img0_copy.png" in kept and "img0.png" not in kept
        assert rejected["img0.png"] == [("dedupe", "duplicate", "near-duplicate of img0_copy.png "
                                         "(keeper chosen in curate review)")]  # fmt: skip

        # -- split a wrong group: the small copy of img1 leaves its group and is kept again
        group = page.locator("section.group", has=page.locator('[data-path="img1_small.png"]'))
        group.locator('.card[data-path="img1_small.png"] input.pick').check()
        group.get_by_role("button", name="Split selected copies off").click()
        expect(flash).to_contain_text("split off img1_small.png")
        recs, kept, _, _ = _state(root)
        assert recs["img1_small.png"].dup_group is None and {"img1.png", "img1_small.png"} <= kept

        # -- rejects: score and threshold shown, keep one anyway, preview and apply a threshold
        page.goto(base + "rejects")
        blur = page.locator('.card.reject[data-path="blur.png"]')
        expect(blur.locator(".threshold")).to_have_text("threshold 10.0")
        blur.get_by_role("button", name="Keep anyway").click()
        expect(flash).to_contain_text("keep anyway blur.png")
        _, kept, _, decisions = _state(root)
        assert decisions["blur.png"][0] == "keep" and "blur.png" in kept
        page.fill('input.thr[data-threshold="min_side"]', "256")
        expect(page.locator("#preview")).to_contain_text("-1 freed")  # tiny.png (300 px) would pass
        preview = page.locator("#preview").inner_text()
        assert preview.startswith("would reject 1 images (now 2)"), preview  # only blur.png is left
        page.get_by_role("button", name="Apply thresholds").click()
        expect(flash).to_contain_text("filter with min_side 256")
        _, _, rejected, _ = _state(root)
        assert "tiny.png" not in rejected and "blur.png" not in rejected  # blur.png: kept by hand
        with Dataset.open(root, create=False, write=False) as d:
            raw = d.manifest.rejected_paths(raw=True)
        assert raw["blur.png"] == [("filter", "blurry", "sharpness 2.5 < 10.0 (lower with --min-sharpness)")]

        # -- undo the threshold: tiny.png is rejected again, exactly as the filter recorded it
        page.get_by_role("button", name="Undo").click()
        expect(flash).to_contain_text("undid: filter with min_side 256")
        _, _, rejected, _ = _state(root)
        assert rejected["tiny.png"] == [
            ("filter", "too-small", "short side 300px < 512px (lower with --min-side)")
        ]

        # -- captions: chips with the trigger pinned, edit one, remove a chip, bulk-remove a tag, undo
        page.goto(base + "captions")
        row2 = page.locator('.caption-row[data-path="img2.png"]')
        expect(row2.locator(".chip").first).to_have_class("chip trigger")
        assert "CLIP tokens" in row2.locator(".tokens").inner_text()
        row2.locator(".chip").first.click()  # focus stays on the page for the keyboard
        row2.get_by_role("button", name="Edit text (e)").click()
        row2.locator("textarea").fill("ohwx, smile, red hat, sunset")
        row2.get_by_role("button", name="Save").click()
        expect(flash).to_contain_text("edit caption of img2.png")
        assert (root / "img2.txt").read_text() == "ohwx, smile, red hat, sunset\n"
        page.locator('.caption-row[data-path="img3.png"] .add-tag').fill("warm light")
        page.locator('.caption-row[data-path="img3.png"] .add-tag').press("Enter")
        expect(flash).to_contain_text("edit caption of img3.png")
        assert (root / "img3.txt").read_text() == "ohwx, indoors, lamp, warm light\n"
        row1 = page.locator('.caption-row[data-path="img1.png"]')
        assert row1.locator('.chip[data-tag="blue sky"] .score').inner_text() == "0.91"
        row1.locator('.chip[data-tag="blue sky"]').get_by_title("move right").click()
        expect(flash).to_contain_text("edit caption of img1.png")
        assert (root / "img1.txt").read_text() == "ohwx, outdoors, blue sky\n"
        page.keyboard.press("u")  # undo from the keyboard
        expect(flash).to_contain_text("undid: edit caption of img1.png")
        assert (root / "img1.txt").read_text() == "ohwx, blue sky, outdoors\n"
        page.keyboard.press("j")
        page.keyboard.press("e")
        expect(page.locator(".card.current textarea")).to_be_focused()
        page.locator("#bulk-op").select_option("remove")
        page.fill("#bulk-tag", "watermark")
        page.get_by_role("button", name="Apply to all kept images (or the selection)").click()
        expect(flash).to_contain_text("remove 'watermark' over all kept images: 2 captions written")
        assert (root / "img4.txt").read_text() == "ohwx, smile\n"
        assert (root / "img5.txt").read_text() == "ohwx, outdoors, tree\n"
        page.get_by_role("button", name="Undo").click()
        expect(flash).to_contain_text("undid: remove 'watermark'")
        assert (root / "img4.txt").read_text() == "ohwx, smile, watermark\n"
        assert (root / "img5.txt").read_text() == "ohwx, outdoors, watermark, tree\n"
        assert (root / "img2.txt").read_text() == "ohwx, smile, red hat, sunset\n"  # earlier edit stays

        # -- train / val: move one image across
        recs, *_ = _state(root)
        val = sorted(p for p in ("img1.png", "img2.png", "img3.png", "img4.png", "img5.png", "wide.png")
                     if recs[p].split == "val")  # fmt: skip
        assert val
        page.goto(base + "split")
        page.locator(f'.side[data-side="val"] .card[data-path="{val[0]}"]').get_by_role(
            "button", name="Move to train"
        ).click()
        expect(flash).to_contain_text(f"move {val[0]} to train")
        recs, *_ = _state(root)
        assert recs[val[0]].split == "train"

        # -- keyboard: j selects the first card, x rejects it by hand
        page.goto(base + "buckets")
        expect(page.locator(".crop")).to_have_count(len(page.locator(".card").all()))
        page.keyboard.press("j")
        first = page.locator(".card.current").get_attribute("data-path")
        page.keyboard.press("x")
        expect(flash).to_contain_text(f"reject by hand {first}")
        assert _state(root)[3][first][0] == "reject"
        browser.close()
        assert errors == []
    thumbs = list((root / ".curate" / "review_thumbs").glob("*.jpg"))
    assert len(thumbs) >= 7  # made on first view, kept on disk for the next

    # -- the CLI sees the same state: export writes the new keeper and the edited caption
    out = tmp_path / "out"
    res = runner.invoke(app, ["export", str(root), str(out)])
    assert res.exit_code == 0, res.output
    exported = {i["source"]: i for i in json.loads((out / "curate_export.json").read_text())["images"]}
    assert "img0_copy.png" in exported and "img0.png" not in exported and "blur.png" in exported
    assert first not in exported
    img2 = exported["img2.png"]
    assert (out / img2["file"]).with_suffix(".txt").read_text().strip() == "ohwx, smile, red hat, sunset"


def test_groups_split_merge_and_leak_free_move(tmp_path):
    """The state layer: split a group, merge it back, move a kept near-duplicate pair together, undo."""
    from curate.review.state import Review

    root = build_dataset(tmp_path / "ds")
    rv = Review(root)
    try:
        by = {r.path: r for r in rv.records()}
        g0, g1 = by["img0.png"].dup_group, by["img1.png"].dup_group
        assert g0 is not None and g1 is not None and g0 != g1
        msg = rv.split_group([by["img0_copy.png"].sha256])
        assert msg == f"group {g0}: split off img0_copy.png"
        _, kept, rejected, _ = _state(root)
        assert "img0_copy.png" in kept and "img0_copy.png" not in rejected  # no longer a duplicate
        by = {r.path: r for r in rv.records()}
        assert by["img0_copy.png"].dup_group is None and by["img0.png"].dup_group is None
        # merge the two-image group of img1 into ... a group needs two groups: rebuild one by undo
        assert rv.undo() == f"undid: group {g0}: split off img0_copy.png"
        by = {r.path: r for r in rv.records()}
        assert by["img0_copy.png"].dup_group == g0 and by["img0.png"].dup_keeper
        msg = rv.merge_groups(g0, g1)
        assert msg == f"merge group {g1} into group {g0} (keeper img0.png)"
        recs, kept, rejected, _ = _state(root)
        assert {recs[p].dup_group for p in ("img0.png", "img0_copy.png", "img1.png", "img1_small.png")} == {
            g0
        }
        assert "img1.png" not in kept and rejected["img1.png"][0][:2] == ("dedupe", "duplicate")
        rv.undo()
        _, kept, _, _ = _state(root)
        assert "img1.png" in kept
        # leak-free move: keep both copies of img0, then moving one moves the other with it
        rv.decide(["img0_copy.png"], "keep")
        from curate.stages.split import split

        with rv.writer() as m:
            split(m, 0.3, 0)
        recs, *_ = _state(root)
        side = recs["img0.png"].split
        assert recs["img0_copy.png"].split == side
        other = "val" if side == "train" else "train"
        msg = rv.move(recs["img0.png"].sha256, other)
        assert msg == f"move img0.png to {other} with 1 near-duplicate(s) (no leak across the split)"
        recs, *_ = _state(root)
        assert recs["img0.png"].split == recs["img0_copy.png"].split == other
        rv.undo()
        recs, *_ = _state(root)
        assert recs["img0.png"].split == recs["img0_copy.png"].split == side
        msg = rv.bulk("replace", "smile", "grin", paths=["img2.png", "img4.png"])
        assert msg == "replace 'smile' by 'grin' over 2 selected: 2 captions written"
        assert (root / "img2.txt").read_text() == "ohwx, grin, red hat\n"
        assert (root / "img0.txt").read_text() == "ohwx, red hat, smile, outdoors\n"  # not selected
        rv.undo()
        assert (root / "img2.txt").read_text() == "ohwx, smile, red hat\n"
        history = rv.history()
        assert [h[2] for h in history[:3]] == [True, True, False]  # replace and move undone, the keep not
        assert json.loads(rv.reader.get_meta("caption.trigger")) == ["ohwx"]
    finally:
        rv.close()


def test_review_command_errors(tmp_path):
    """One-line errors: no manifest, port taken."""
    import socket

    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["review", str(tmp_path / "empty"), "--no-open"])
    assert res.exit_code == 2 and "run `curate scan" in res.output
    root = tmp_path / "ds"
    root.mkdir()
    textured(600, 600, seed=1).save(root / "a.png")
    assert runner.invoke(app, ["scan", str(root)]).exit_code == 0
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        res = runner.invoke(app, ["review", str(root), "--no-open", "--port", str(s.getsockname()[1])])
    finally:
        s.close()
    assert res.exit_code == 2 and "pick another --port" in res.output, res.output


def test_review_command_serves_until_interrupted(tmp_path):
    """`curate review DS --no-open` prints the address with the token, serves it, stops on Ctrl-C."""
    import re
    import signal
    import subprocess
    import sys

    root = tmp_path / "ds"
    root.mkdir()
    textured(600, 600, seed=1).save(root / "a.png")
    assert runner.invoke(app, ["scan", str(root)]).exit_code == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "curate", "review", str(root), "--no-open"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/\?token=\S+", line).group(0)
        status, _ = _get(url.replace("/?", "/rejects?"))
        assert status == 200
        assert _get(url.split("?")[0] + "rejects")[0] == 403
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "curate review stopped" in out and "Traceback" not in err


def _dedupe(root: Path, *args: str) -> dict:
    res = runner.invoke(app, ["dedupe", str(root), "--json", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)["dedupe"]


def _groups(out: dict) -> dict[str, tuple[str, ...]]:
    """keeper -> other members, for every group dedupe reported."""
    return {g["keeper"]: tuple(sorted(m for m in g["members"] if m != g["keeper"])) for g in out["groups"]}


def post_api(url: str, api: str, body: object) -> tuple[int, dict]:
    """POST a JSON body to the review page's /api/<api> (with the page's token query); (status, reply)."""
    u = urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    c.request("POST", f"/api/{api}?{u.query}", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    out = json.loads(r.read())
    c.close()
    return r.status, out


def _post(url: str, api: str, body: dict) -> dict:
    status, out = post_api(url, api, body)
    assert status == 200 and out["ok"], out
    return out


def test_hand_choices_survive_dedupe_reruns_and_undo(tmp_path):
    """Keeper, merge and split made on the page are replayed by every `curate dedupe` (any --method), export
    keeps the hand-chosen copy, undo forgets a choice, and --clear-overrides forgets them all."""
    from curate.review.server import running
    from curate.review.state import Review

    root = build_dataset(tmp_path / "ds")
    auto = {"img0.png": ("img0_copy.png",), "img1.png": ("img1_small.png",)}
    assert _groups(_dedupe(root)) == auto
    recs, *_ = _state(root)
    sha = {p: r.sha256 for p, r in recs.items()}
    g0, g1 = recs["img0.png"].dup_group, recs["img1.png"].dup_group
    with running(root) as url:  # the page's own endpoints, with this run's token
        msg = _post(url, "keeper", {"sha": sha["img0_copy.png"]})["message"]
        assert msg == f"group {g0}: keep img0_copy.png instead of img0.png"
        _post(url, "merge", {"groups": [g0, g1]})
    st = json.loads(runner.invoke(app, ["status", str(root), "--json"]).output)
    assert st["dedupe_overrides"] == 2

    merged = {"img0_copy.png": ("img0.png", "img1.png", "img1_small.png")}
    for method in ("auto", "hash", "phash"):
        out = _dedupe(root, "--method", method)
        assert _groups(out) == merged, method
        assert [(o["kind"], o["source"], o["result"]) for o in out["overrides"]["applied"]] == [
            ("keeper", "review", "keeper"),
            ("merge", "review", "merged 2 group(s)"),
        ]
        assert out["overrides"]["ignored"] == 0
        (group,) = out["groups"]
        assert group["explain"][0].endswith(": keeper chosen by hand")
        assert "img0.png ~ img0_copy.png" in "\n".join(group["explain"])  # the automatic evidence stays
    res = runner.invoke(app, ["dedupe", str(root)])
    words = " ".join(res.output.split())  # rich wraps the summary line
    assert res.exit_code == 0 and "2 hand choice(s) from curate review applied" in words, res.output

    rv = Review(root)
    try:  # split img1 and its copy back off the merged group, on the state layer
        by = {r.path: r for r in rv.records()}
        rv.split_group([by["img1.png"].sha256, by["img1_small.png"].sha256])
    finally:
        rv.close()
    split = {"img0_copy.png": ("img0.png",), "img1.png": ("img1_small.png",)}
    assert _groups(_dedupe(root, "--method", "dhash")) == split
    assert _groups(_dedupe(root)) == split
    _, kept, rejected, _ = _state(root)
    assert rejected["img0.png"] == [
        ("dedupe", "duplicate", "near-duplicate of img0_copy.png (auto; keeper chosen by hand; "
         "groups merged by hand; group split by hand)")
    ]  # fmt: skip
    out = tmp_path / "out"
    res = runner.invoke(app, ["export", str(root), str(out)])
    assert res.exit_code == 0, res.output
    exported = {i["source"] for i in json.loads((out / "curate_export.json").read_text())["images"]}
    assert {"img0_copy.png", "img1.png"} <= exported and not {"img0.png", "img1_small.png"} & exported

    rv = Review(root)
    try:  # undo the split and the merge: the keeper choice alone is left
        assert rv.undo().startswith("undid: group ")
        assert rv.undo().startswith("undid: merge group")
    finally:
        rv.close()
    out = _dedupe(root, "--method", "hash")
    assert _groups(out) == {"img0_copy.png": ("img0.png",), "img1.png": ("img1_small.png",)}
    assert [o["kind"] for o in out["overrides"]["applied"]] == ["keeper"]
    with running(root) as url:
        assert _post(url, "undo", {})["message"].startswith("undid: group")  # the keeper choice
    out = _dedupe(root)
    assert _groups(out) == auto and "overrides" not in out  # back to the automatic result
    st = json.loads(runner.invoke(app, ["status", str(root), "--json"]).output)
    assert st["dedupe_overrides"] == 0

    # --clear-overrides forgets every choice; a choice whose images are gone is ignored and counted
    rv = Review(root)
    try:
        by = {r.path: r for r in rv.records()}
        rv.set_keeper(by["img0_copy.png"].sha256)
        rv.split_group([by["img1_small.png"].sha256])
    finally:
        rv.close()
    (root / "img1_small.png").unlink()  # a file of this test, made in tmp_path
    assert runner.invoke(app, ["scan", str(root)]).exit_code == 0
    out = _dedupe(root)
    assert _groups(out) == {"img0_copy.png": ("img0.png",)}
    assert out["overrides"]["ignored"] == 1 and len(out["overrides"]["applied"]) == 1
    res = runner.invoke(app, ["dedupe", str(root)])
    assert "1 ignored (their images are gone)" in " ".join(res.output.split()), res.output
    out = _dedupe(root, "--clear-overrides")
    assert out["overrides_cleared"] == 2 and _groups(out) == {"img0.png": ("img0_copy.png",)}
