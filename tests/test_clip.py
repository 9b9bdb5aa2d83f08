"""CLIP near-duplicates and outliers on a tiny random-init open_clip model loaded from a local folder."""

from __future__ import annotations

import json
from pathlib import Path

import faiss  # noqa: E402,F401  (the clip extra; a missing install must fail, not skip)
import numpy as np
import open_clip  # noqa: E402,F401
import pytest
from PIL import Image

from curate import Dataset  # noqa: E402
from curate.errors import CurateError  # noqa: E402
from tests.clip_helpers import make_tiny_model, pattern  # noqa: E402

FLIP_THRESHOLD = 0.999  # tiny random model: distinct test images reach 0.991, flips 1.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def make_set(root: Path, n: int = 8) -> Path:
    """n distinct images, a mirrored copy of image 0, and a half-size JPEG of image 1."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        pattern(k).save(root / f"img{k}.png")
    pattern(0).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "img0_flip.png")
    pattern(1).resize((64, 64), Image.Resampling.LANCZOS).save(root / "img1_small.jpg", quality=92)
    return root


def opened(root: Path) -> Dataset:
    ds = Dataset.open(root)
    ds.scan()
    return ds


def clip_opts(tiny: Path, **kw):
    return {"model": str(tiny), "device": "cpu", "workers": 0, **kw}


def groups_of(res) -> list[set[str]]:
    return [set(g.members) for g in res.groups]


def test_local_folder_model_matches_open_clip_preprocessing(tiny):
    import torch

    from curate.models.clip import load_clip
    from curate.stages.embed import crop_for

    cm = load_clip(str(tiny), None, "cpu")
    assert cm.model_id == "local:tiny-test" and cm.pretrained.startswith("sha256:")
    assert cm.dtype == torch.float32 and cm.image_size == 64
    assert load_clip(str(tiny), None, "cpu") is cm  # instance cached
    imgs = [pattern(k, size=120 + 17 * k) for k in range(4)]  # odd sizes: resize + crop path
    ours = cm.encode(torch.stack([torch.from_numpy(crop_for(i, cm.preprocess_spec)) for i in imgs]))
    pre = open_clip.image_transform(64, is_train=False, mean=cm.mean, std=cm.std, interpolation="bicubic")
    with torch.no_grad():
        ref = torch.nn.functional.normalize(
            cm.model.encode_image(torch.stack([pre(i) for i in imgs])), dim=-1
        )
    assert torch.allclose(ours.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert (ours * ref).sum(-1).min().item() > 0.9999


def test_flip_found_by_clip_not_by_phash(tiny, tmp_path):
    import imagehash

    ds = opened(make_set(tmp_path / "ds"))
    flip_dist = imagehash.phash(pattern(0)) - imagehash.phash(pattern(0).transpose(0))
    assert flip_dist > 20  # pHash sees a different image
    hash_res = ds.dedupe(method="phash")
    assert {"img0.png", "img0_flip.png"} not in groups_of(hash_res)

    res = ds.dedupe(method="clip", clip=clip_opts(tiny, threshold=FLIP_THRESHOLD))
    # The flip and the resized JPEG (which pHash finds too), nothing else.
    assert sorted(map(sorted, groups_of(res))) == [
        ["img0.png", "img0_flip.png"],
        ["img1.png", "img1_small.jpg"],
    ]
    g = next(g for g in res.groups if "img0.png" in g.members)
    assert g.method == "clip"
    assert g.edges[0]["clip"] >= 0.9999
    assert any("CLIP similarity" in line for line in g.explain)
    # Every other pair sits below the threshold (measured max 0.991 on this model).
    rejected = ds.manifest.rejected_paths()
    assert sorted(p for p, st in rejected.items() if any(s == "dedupe" for s, _, _ in st)) == [
        "img0.png",  # same pixels count: the keeper is the first path, img0_flip.png
        "img1_small.jpg",
    ]


def test_embeddings_cached_second_run_does_no_inference(tiny, tmp_path):
    from curate.models.clip import load_clip

    root = make_set(tmp_path / "ds")
    cm = load_clip(str(tiny), None, "cpu")
    calls = []
    hook = cm.model.visual.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        ds = opened(root)
        opts = clip_opts(tiny, threshold=FLIP_THRESHOLD, batch_size=4)
        first = ds.dedupe(method="clip", clip=opts)
        assert sum(calls) == 10 and len(calls) == 3  # 10 images in batches of 4
        n_rows = ds.manifest.conn.execute("SELECT count(*), min(dim) FROM clip_embeddings").fetchone()
        assert tuple(n_rows) == (10, 32)
        calls.clear()
        second = ds.dedupe(method="clip", clip=opts)
        assert calls == []  # nothing recomputed
        assert groups_of(second) == groups_of(first)
        # One new image: exactly one image is encoded.
        pattern(9).save(root / "new.png")
        ds.scan()
        ds.dedupe(method="clip", clip=opts)
        assert sum(calls) == 1
        # The cache is keyed by the model too: other weights -> new rows.
        blob = ds.manifest.conn.execute("SELECT vec FROM clip_embeddings LIMIT 1").fetchone()[0]
        vec = np.frombuffer(blob, np.float16)
        assert vec.dtype == np.float16 and abs(float(np.linalg.norm(vec.astype(np.float32))) - 1) < 2e-3
    finally:
        hook.remove()
        ds.close()


def test_threshold_respected_against_brute_force(tiny, tmp_path):
    from curate.models.clip import load_clip
    from curate.stages.embed import embed_records

    ds = opened(make_set(tmp_path / "ds"))
    recs = ds.manifest.images(include_errors=False)
    cm = load_clip(str(tiny), None, "cpu")
    ok, (emb,) = embed_records(ds.manifest, recs, [cm], workers=0)
    assert ok.all()
    sims = emb @ emb.T
    from curate.stages.clip_dedupe import clip_pair_finder

    for t in (0.9, 0.95, 0.98, FLIP_THRESHOLD):
        pairs = clip_pair_finder(ds.manifest, **clip_opts(tiny, threshold=t))(recs)
        got = {(a, b) for a, b, _ in pairs}
        want = {(a, b) for a in range(len(recs)) for b in range(a + 1, len(recs)) if sims[a, b] >= t - 1e-4}
        # float16 storage: allow pairs within 1e-3 of the threshold either way
        border = {(a, b) for a, b in want | got if abs(sims[a, b] - t) < 1e-3}
        assert got - border == want - border
        assert all(info["clip"] >= t - 1e-3 for _, _, info in pairs)
    n_low = len(clip_pair_finder(ds.manifest, **clip_opts(tiny, threshold=0.9))(recs))
    n_high = len(clip_pair_finder(ds.manifest, **clip_opts(tiny, threshold=FLIP_THRESHOLD))(recs))
    assert n_low > 10 > n_high == 2


def test_both_merges_hash_and_clip_groups_and_keeps_best(tiny, tmp_path):
    root = make_set(tmp_path / "ds")
    # A 2x upscaled copy of the flip: pHash links it to the flip, CLIP links the flip to the original.
    # (pattern 3: a gradient like pattern 0 has an unstable pHash, 32 bits flip on upscaling)
    pattern(3).transpose(0).save(root / "img3_flip.png")
    pattern(3).transpose(0).resize((192, 192), Image.Resampling.BICUBIC).save(root / "img3_flip_big.png")
    ds = opened(root)
    hash_only = ds.dedupe(method="hash")
    assert {"img3_flip.png", "img3_flip_big.png"} in groups_of(hash_only)
    assert not any("img3.png" in g for g in groups_of(hash_only))
    assert {"img1.png", "img1_small.jpg"} in groups_of(hash_only)
    res = ds.dedupe(method="both", clip=clip_opts(tiny, threshold=FLIP_THRESHOLD))
    groups = {frozenset(g.members): g for g in res.groups}
    g0 = groups[frozenset({"img3.png", "img3_flip.png", "img3_flip_big.png"})]
    assert g0.keeper == "img3_flip_big.png"  # more pixels wins
    assert g0.method == "both"
    kinds = {(e["a"], e["b"]): set(e) - {"a", "b"} for e in g0.edges}
    assert any("clip" in k and "phash" not in k for k in kinds.values())
    assert any("phash" in k for k in kinds.values())
    g1 = groups[frozenset({"img1.png", "img1_small.jpg"})]
    assert g1.keeper == "img1.png" and g1.method in ("hash", "both")
    rejected = ds.manifest.rejected_paths()
    assert {"img3.png", "img3_flip.png", "img1_small.jpg"} <= set(rejected)
    assert "img3_flip_big.png" not in rejected
    report = Path(ds.report()).read_text()
    assert "CLIP similarity 1.0" in report


def test_missing_weights_give_one_line_offline_errors(tmp_path):
    import torch

    from curate.models.clip import load_clip

    with pytest.raises(
        CurateError, match=r"timm/vit_base_patch32_clip_224\.openai open_clip_model\.safetensors"
    ):
        load_clip("ViT-B-32", "openai", "cpu")
    with pytest.raises(CurateError, match="not in the local Hugging Face cache.*huggingface-cli download"):
        load_clip("hf-hub:nobody/no-such-clip", None, "cpu")
    with pytest.raises(CurateError, match="unknown CLIP model"):
        load_clip("ViT-Nope-99", "openai", "cpu")
    with pytest.raises(CurateError, match="unknown pretrained tag"):
        load_clip("ViT-B-32", "no-such-tag", "cpu")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    torch.save({"x": torch.zeros(1)}, pickled / "open_clip_pytorch_model.bin")
    with pytest.raises(CurateError, match="does not load pickled"):
        load_clip(str(pickled), None, "cpu")
    with pytest.raises(CurateError, match="no open_clip_config.json"):
        load_clip(str(tmp_path), None, "cpu")


def test_cli_dedupe_clip_errors_and_json(tiny, tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    root = make_set(tmp_path / "ds")
    runner = CliRunner()
    assert runner.invoke(app, ["scan", str(root), "--json"]).exit_code == 0
    r = runner.invoke(app, ["dedupe", str(root), "--method", "clip", "--device", "cpu"])
    assert r.exit_code == 2
    assert "huggingface-cli download" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["dedupe", str(root), "--method", "clip", "--threshold", "1.5"])
    assert r.exit_code == 2 and "between -1 and 1" in r.output
    (root / "curate.toml").write_text("[clip]\nworkers = 0\n")
    r = runner.invoke(
        app,
        ["dedupe", str(root), "--method", "both", "--model", str(tiny), "--device", "cpu",
         "--threshold", str(FLIP_THRESHOLD), "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    members = [set(g["members"]) for g in out["dedupe"]["groups"]]
    stats = out["dedupe"]["clip"]
    assert stats["index"] == "flat" and stats["embedded"] == 10 and stats["model"] == "local:tiny-test"
    assert {"img0.png", "img0_flip.png"} in members and {"img1.png", "img1_small.jpg"} in members


def test_outliers_flags_the_odd_one_and_stores_scores(tiny, tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    root = tmp_path / "ds"
    root.mkdir()
    base = np.asarray(pattern(0), np.float32)
    rng = np.random.default_rng(1)
    for k in range(12):  # a consistent subject: the same picture, lightly varied
        arr = np.clip(base * (0.85 + 0.02 * k) + rng.normal(0, 4, base.shape), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(root / f"subject{k:02d}.png")
    pattern(2).save(root / "junk.png")  # noise: a scraped junk image
    (root / "curate.toml").write_text("[clip]\nworkers = 0\n")
    runner = CliRunner()
    assert runner.invoke(app, ["scan", str(root), "--json"]).exit_code == 0
    r = runner.invoke(
        app, ["outliers", str(root), "--model", str(tiny), "--device", "cpu", "--k", "5", "--json"]
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)["outliers"]
    assert out["scores"][0]["path"] == "junk.png"
    assert out["flagged"] == ["junk.png"]
    assert out["scores"][0]["knn_similarity"] < out["median"] - 0.05
    with Dataset.open(root) as ds:
        rec = next(r for r in ds.images() if r.path == "junk.png")
        assert rec.scores["clip_knn"] == out["scores"][0]["knn_similarity"]
        assert ds.manifest.rejected_paths() == {}  # flagged for review, not rejected
    r = runner.invoke(app, ["outliers", str(root), "--model", str(tiny), "--device", "cpu", "--k", "5"])
    assert r.exit_code == 0 and "junk.png" in r.output and "review" in r.output


def test_ivf_index_recall_against_exact():
    from curate.stages.similarity import exact_pairs, similar_pairs

    rng = np.random.default_rng(0)
    n, dim = 6000, 64
    x = rng.normal(size=(n, dim)).astype(np.float32)
    src = rng.choice(n, 300, replace=False)
    x[n - 300 :] = x[src] + rng.normal(scale=0.25, size=(300, dim))  # planted near-duplicates
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    i, j, _ = exact_pairs(x, 0.9)
    truth = set(zip(i.tolist(), j.tolist(), strict=True))
    assert 250 <= len(truth) <= 300
    res = similar_pairs(x, 0.9, exact_max=1000)
    assert res.index.startswith("ivf")
    found = set(zip(res.i.tolist(), res.j.tolist(), strict=True))
    assert found <= truth  # range search never invents pairs
    assert len(found) / len(truth) >= 0.95
    assert res.recall is not None and res.recall >= 0.9


def test_torch_exact_pairs_match_faiss_flat():
    from curate.stages.similarity import exact_pairs, exact_pairs_torch

    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    x[2000:] = x[:1000] + rng.normal(scale=0.3, size=(1000, 32))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a = exact_pairs(x, 0.95)
    b = exact_pairs_torch(x, 0.95, "cpu", block=700)  # odd block: crosses block edges
    assert len(a[0]) > 500
    assert set(zip(*map(np.ndarray.tolist, a[:2]), strict=True)) == set(
        zip(*map(np.ndarray.tolist, b[:2]), strict=True)
    )


def test_two_models_share_one_decode(tiny, tmp_path, monkeypatch):
    from curate import io as cio
    from curate.models.clip import load_clip
    from curate.stages import embed

    root = make_set(tmp_path / "ds")
    make_tiny_model(tmp_path / "tiny2", seed=1)
    a, b = load_clip(str(tiny), None, "cpu"), load_clip(str(tmp_path / "tiny2"), None, "cpu")
    assert a.pretrained != b.pretrained
    decodes = []
    real = cio.decode_image
    monkeypatch.setattr(cio, "decode_image", lambda *x, **k: decodes.append(1) or real(*x, **k))
    paths = sorted(str(p) for p in root.iterdir())
    ok, (ea, eb) = embed.encode_paths(paths, [a, b], workers=0, batch_size=3)
    assert ok.all() and len(decodes) == len(paths)
    _, (ea1,) = embed.encode_paths(paths, [a], workers=0)
    assert np.allclose(ea, ea1, atol=1e-5) and not np.allclose(ea, eb)
