"""dedupe --method auto (the default) on real photos: every scraper transform is grouped with its original,
hard negatives are not, the original is kept with the rule that decided, and split keeps groups whole."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curate import Dataset
from curate.cli import app
from curate.eval import TRANSFORMS, build_set, caption_bar, source_photos, transform

runner = CliRunner()
pytestmark = pytest.mark.slow


def cli(*args: str) -> dict:
    r = runner.invoke(app, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout) if "--json" in args else {}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict]:
    """astronaut: original + one copy per transform family + an exact copy and a (shorter-named) symlink;
    chelsea: hard negatives only (four disjoint crops, and a meme under the same caption bar)."""
    pytest.importorskip("skimage")
    from PIL import Image

    photos = source_photos()
    root = tmp_path_factory.mktemp("local") / "ds"
    truth = build_set(
        root, sources={"astronaut": photos["astronaut"], "chelsea": photos["chelsea"]}, n_negative_sources=0
    )
    shutil.rmtree(root / "chelsea")  # chelsea's original and copies go; its hard negatives come next
    chelsea = Image.open(photos["chelsea"]).convert("RGB")
    w, h = chelsea.size
    cw, ch = int(w * 0.46), int(h * 0.46)
    negs = []
    for q, (x0, y0) in enumerate([(0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch)]):
        rel = f"neg/chelsea_part{q}.png"
        (root / "neg").mkdir(exist_ok=True)
        chelsea.crop((x0, y0, x0 + cw, y0 + ch)).save(root / rel)
        negs.append(rel)
    caption_bar(chelsea).save(root / "neg/chelsea_meme.jpg", quality=88)  # same bar text as astronaut/meme
    negs.append("neg/chelsea_meme.jpg")
    shutil.copy(root / "astronaut/original.png", root / "astronaut/original_copy.png")  # exact copy
    os.symlink(root / "astronaut/original.png", root / "l.png")  # shortest path, but a link
    copies = sorted(p for p, t in truth.transform.items() if p.startswith("astronaut/") and t != "original")
    return root, {"copies": copies, "negatives": negs}


@pytest.fixture(scope="module")
def deduped(planted):
    root, info = planted
    cli("scan", str(root))
    out = cli("dedupe", str(root), "--json")["dedupe"]
    return root, info, out


def test_every_transform_grouped_with_its_original_and_kept_original(deduped):
    root, info, out = deduped
    (group,) = [g for g in out["groups"] if "astronaut/original.png" in g["members"]]
    assert group["method"] == "auto"
    assert group["keeper"] == "astronaut/original.png"  # a real file beats the shorter symlink l.png
    members = set(group["members"])
    missing = [c for c in info["copies"] if c not in members]
    assert not missing, missing
    assert {"astronaut/original_copy.png", "l.png"} <= members
    assert len(info["copies"]) == len(TRANSFORMS)
    # The explanation names the deciding rule for every dropped copy, and why each link was made.
    text = "\n".join(group["explain"])
    for rule in ("not upscaled", "no padding or caption bar", "uncropped", "colour over grey", "no overlay"):
        assert rule in text, rule
    assert "dropped astronaut/upscale.jpg" in text and "RANSAC inliers" in text
    for c in info["copies"]:
        line = next(x for x in group["explain"] if x.startswith(f"dropped {c} "))
        assert "keeper wins on rule: " in line
    mirror = next(e for e in group["edges"] if "astronaut/mirror.jpg" in (e["a"], e["b"]))
    assert mirror["mirror"] is True and mirror["inliers"] >= 10 and mirror["ncc"] >= 0.5


def test_hard_negatives_not_linked_and_no_mixed_groups(deduped):
    _, info, out = deduped
    seen: dict[str, int] = {}
    for g in out["groups"]:
        sources = {p.split("/")[0] if "/" in p else "astronaut" for p in g["members"]}
        assert len(sources) == 1, g["members"]  # no group mixes photos
        for p in g["members"]:
            assert p not in seen, f"{p} listed in two groups"
            seen[p] = g["id"]
    for p in info["negatives"]:
        assert p not in seen, f"hard negative {p} was grouped"


def test_decisions_match_the_json_groups(deduped):
    root, _, out = deduped
    with Dataset.open(root) as ds:
        rejected = {
            p for p, st in ds.manifest.rejected_paths().items() if any(s == "dedupe" for s, _, _ in st)
        }
    expected = {p for g in out["groups"] for p in g["members"] if p != g["keeper"]}
    assert rejected == expected
    assert out["rejected"] == len(expected)


def test_split_keeps_crops_and_mirrors_with_their_original(deduped):
    """Even when every copy is kept (the person overrides dedupe), split deals each group to one side."""
    from curate.stages.dedupe import hex_to_u64, popcount64

    root, _, out = deduped
    with Dataset.open(root) as ds:
        by_path = {p: r for r in ds.manifest.images() for p in r.paths}
        ph = {p: hex_to_u64([r.phash])[0] for p, r in by_path.items()}
        orig = ph["astronaut/original.png"]
        # pHash alone (split's own safety net, <= 10 bits) does not tie these copies to the original:
        far = [c for c in ("astronaut/mirror.jpg", "astronaut/crop25.jpg", "astronaut/letterbox.jpg")]
        assert all(int(popcount64(orig ^ ph[c])) > 10 for c in far)
        ds.manifest.set_rejects("dedupe", {})  # keep every copy
    for seed in range(3):
        cli("split", str(root), "--val", "0.5", "--seed", str(seed), "--json")
        with Dataset.open(root) as ds:
            side = {p: r.split for r in ds.manifest.images() for p in r.paths}
        for g in out["groups"]:
            assert len({side[p] for p in g["members"]}) == 1, g["members"]
        assert set(side.values()) == {"train", "val"}
    cli("dedupe", str(root), "--json")  # restore the decisions for the other tests


def test_features_from_scan_and_lazily_for_old_manifests(planted, deduped):
    root, _, out = deduped
    with Dataset.open(root) as ds:
        n = ds.manifest.conn.execute("SELECT count(*) FROM dedupe_features").fetchone()[0]
        assert n == len(ds.manifest.images(include_errors=False))  # scan stored them, one per content hash
        ds.manifest.conn.execute("DELETE FROM dedupe_features")  # as if scanned before this version
    again = cli("dedupe", str(root), "--json")["dedupe"]
    assert again["stats"]["features_computed"] == n
    assert [sorted(g["members"]) for g in again["groups"]] == [sorted(g["members"]) for g in out["groups"]]


def test_without_opencv_auto_falls_back_to_hash_with_a_notice(planted, deduped, monkeypatch):
    from curate.stages import features

    root, _, _ = deduped
    monkeypatch.setattr(features, "_CV2", [False])
    with Dataset.open(root) as ds:
        res = ds.dedupe()
    assert "needs OpenCV" in res.stats["notice"]
    assert all(g.method in ("hash", "exact") for g in res.groups)


def test_transform_helper_is_deterministic():
    pytest.importorskip("skimage")
    from PIL import Image

    img = Image.open(source_photos()["astronaut"]).convert("RGB")
    assert transform(img, "crop25", seed=3).size == transform(img, "crop25", seed=3).size == (384, 384)


def test_images_too_small_for_features_are_marked_not_decoded_again(tmp_path, monkeypatch):
    """A thumbnail-sized image has no features; the manifest says so, and re-grouping decodes nothing."""
    from PIL import Image

    import curate.io

    root = tmp_path / "ds"
    root.mkdir()
    pytest.importorskip("skimage")
    img = Image.open(source_photos()["astronaut"]).convert("RGB")
    img.resize((200, 200)).save(root / "big.png")
    img.resize((12, 12)).save(root / "tiny.png")
    img.resize((10, 40)).save(root / "thin.png")
    cli("scan", str(root))
    with Dataset.open(root) as ds:
        rows = dict(ds.manifest.conn.execute("SELECT length(codes), signals FROM dedupe_features").fetchall())
        assert sorted(rows) == [0, 64]  # one marker row shape (two images), one real row of 8 codes
        ds.manifest.conn.execute("DELETE FROM dedupe_features")  # as if scanned before this version
    calls = []
    real = curate.io.decode_image
    monkeypatch.setattr(curate.io, "decode_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = cli("dedupe", str(root), "--json")["dedupe"]
    assert first["stats"]["features_computed"] == 3 and len(calls) == 3  # backfill decoded all three
    with Dataset.open(root) as ds:
        marks = ds.manifest.conn.execute("SELECT signals FROM dedupe_features WHERE codes = x''").fetchall()
    assert [json.loads(s)["none"] for (s,) in marks] == ["too small", "too small"]
    calls.clear()
    second = cli("dedupe", str(root), "--json")["dedupe"]
    assert calls == [] and "features_computed" not in second["stats"]


def test_thorough_verifies_with_sift_and_finds_the_same_groups(deduped):
    root, info, out = deduped
    thorough = cli("dedupe", str(root), "--thorough", "--json")["dedupe"]
    (group,) = [g for g in thorough["groups"] if "astronaut/original.png" in g["members"]]
    missing = [c for c in info["copies"] if c not in group["members"]]
    assert not missing, missing
    for g in thorough["groups"]:  # no group mixes astronaut and chelsea (the shared caption bar)
        assert len({p.startswith("neg/") for p in g["members"]}) == 1, g["members"]
        # SIFT also finds that each disjoint chelsea part is a crop of chelsea's meme (true links, 17 % of
        # its frame, which ORB misses); the parts themselves are never linked to each other
        for e in g["edges"]:
            assert not ("_part" in e["a"] and "_part" in e["b"]), e
    # SIFT was used: its match counts differ from ORB's on the same pairs
    inl = {(e["a"], e["b"]): e.get("inliers") for e in group["edges"]}
    (orb_group,) = [g for g in out["groups"] if "astronaut/original.png" in g["members"]]
    orb_inl = {(e["a"], e["b"]): e.get("inliers") for e in orb_group["edges"]}
    common = [k for k in inl if k in orb_inl and inl[k] and orb_inl[k]]
    assert common and any(inl[k] != orb_inl[k] for k in common)
    cli("dedupe", str(root), "--json")  # back to the default decisions


def test_vote_index_ivf_finds_the_same_planted_pairs_as_the_exact_index():
    """The large-set IVF (fixed list size, HNSW over the centroids) must keep the votes of real copies."""
    pytest.importorskip("faiss")
    import numpy as np

    from curate.stages.local_match import vote_candidates

    rng = np.random.default_rng(3)
    n, k = 160, 100
    descs = [rng.integers(0, 256, (k, 32), dtype=np.uint8) for _ in range(n)]
    mdescs = [rng.integers(0, 256, (k, 32), dtype=np.uint8) for _ in range(n)]
    planted = set()
    for i in range(0, 40, 2):  # image i+1 is a copy of image i: 70 of its descriptors, ~12 bits changed
        d = descs[i][:70].copy()
        flips = rng.integers(0, 256, (70, 12))
        for row, bits in enumerate(flips):
            for b in bits:
                d[row, b // 8] ^= np.uint8(1 << (b % 8))
        descs[i + 1][:70] = d
        planted.add((i, i + 1))
    exact, kind_exact = vote_candidates(descs, mdescs)
    ivf, kind_ivf = vote_candidates(descs, mdescs, flat_max=0)
    assert kind_exact == "faiss-flat"
    assert kind_ivf == "faiss-ivf31-hnsw"  # 16000 descriptors / 512 per list
    assert set(exact) == planted  # random descriptors are > 64 bits apart: no vote between others
    assert set(ivf) == planted
    # nearly every planted descriptor still votes through the inverted lists
    assert min(ivf[p] for p in planted) >= 0.9 * min(exact[p] for p in planted)
    assert min(exact[p] for p in planted) >= 60


def test_keeper_checks_on_the_pool_and_bounded_find_the_same_groups(deduped, monkeypatch):
    """Keeper checks in pool batches, with the two-link bound on every component of more than 3 images,
    give the groups and keepers of the default run."""
    from functools import partial

    from curate.stages import dedupe_auto

    root, info, out = deduped
    monkeypatch.setattr(dedupe_auto, "SMALL_COMPONENT", 3)
    monkeypatch.setattr(dedupe_auto, "PairChecker", partial(dedupe_auto.PairChecker, workers=2, min_batch=1))
    with Dataset.open(root) as ds:
        res = ds.dedupe(method="auto")
    got = sorted((g.keeper, sorted(g.members)) for g in res.groups)
    want = sorted((g["keeper"], sorted(g["members"])) for g in out["groups"])
    assert got == want
    assert any(len(m) > 3 for _, m in got)  # the bound applied to at least one component
    assert res.stats["keeper_checks"] > 0  # and some members were checked against the keeper, on the pool
    cli("dedupe", str(root), "--json")  # back to the default decisions


def test_near_keeper_is_two_links_inside_the_component():
    from curate.stages.dedupe_auto import _near_keeper

    adj = {0: {1}, 1: {0, 2, 9}, 2: {1, 3}, 3: {2}, 9: {1}}  # chain 0-1-2-3, and 9 outside the component
    assert _near_keeper(0, [0, 1, 2, 3], adj) == {1, 2}
    assert _near_keeper(2, [0, 1, 2, 3], adj) == {0, 1, 3}
    assert _near_keeper(3, [3], adj) == set()


def _collage(*photos, widths):
    """Photos side by side (each resized to its share of a 640 x 360 frame)."""
    import numpy as np
    from PIL import Image

    parts = [
        np.asarray(Image.open(p).convert("RGB").resize((w, 360))) for p, w in zip(photos, widths, strict=True)
    ]
    return Image.fromarray(np.concatenate(parts, axis=1))


def test_collages_sharing_one_photo_are_not_linked_but_a_crop_is():
    """The policy for shared parts: two collages that hold the same photo beside different ones are not
    duplicates (each has its own content over as much of the frame); a crop of one, wholly inside it, is."""
    pytest.importorskip("skimage")
    from curate.stages import features as F
    from curate.stages.local_match import verify

    src = source_photos()
    a = _collage(src["coffee"], src["chelsea"], widths=(320, 320))
    b = _collage(src["coffee"], src["coins"], widths=(320, 320))
    fa, fb = (F.decode_row(F.extract(im)) for im in (a, b))
    v = verify(fa, fb)
    assert not v.ok and "shared part" in v.why, v.why
    # the tile median alone (the rule before) would have linked them: the coffee half matches exactly
    assert v.inliers >= 10 and v.ncc >= 0.5 and min(v.cover_a, v.cover_b) > 0.9
    crop = a.crop((0, 0, 448, 360))  # the shared photo and part of its neighbour: all of it is in a
    vc = verify(fa, F.decode_row(F.extract(crop)))
    assert vc.ok and vc.inliers >= 10 and vc.cover_b > 0.9, vc.why
