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
        "img0_flip.png",  # same pixels, format and rules: the keeper rules (curate.stages.keeper) end on
        "img1_small.jpg",  # file size, then the first path; img0.png is kept
    ]
    assert any(
        line.startswith("dropped img0_flip.png") and "keeper wins on rule" in line for line in g.explain
    )


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
    with pytest.raises(CurateError, match="Hugging Face cache.*.*`hf download nobody/no-such-clip"):
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
    assert "hf download timm/" in r.output and "Traceback" not in r.output
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


# GPU JPEG decode path (nvJPEG on CUDA); the same code runs on CPU tensors here, with torchvision's CPU decoder.


def photo(w: int, h: int, seed: int) -> Image.Image:
    """Photo-like content: smooth colour field plus mid-frequency detail."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC
    )
    mid = Image.fromarray(rng.integers(0, 256, (h // 12, w // 12), dtype=np.uint8)).resize((w, h))
    arr = np.asarray(low, np.float32) * 0.8 + np.asarray(mid, np.float32)[..., None] * 0.2
    return Image.fromarray(arr.astype(np.uint8))


def mixed_set(root: Path) -> dict[str, Path]:
    """One file per routing case of the byte-reading workers."""
    root.mkdir(parents=True, exist_ok=True)
    files = {}

    def save(name, img, **kw):
        files[name] = root / name
        img.save(files[name], **kw)

    save("a_base.jpg", photo(150, 110, 0), quality=90)
    save("b_grey.jpg", photo(90, 130, 1).convert("L"), quality=90)
    save("c_prog.jpg", photo(120, 100, 2), quality=90, progressive=True)
    save("d.png", photo(100, 140, 3))
    exif = Image.Exif()
    exif[0x0112] = 6
    save("e_rot.jpg", photo(140, 100, 4), quality=90, exif=exif.tobytes())
    save("f_cmyk.jpg", photo(110, 110, 5).convert("CMYK"), quality=90)
    data = (root / "a_base.jpg").read_bytes()
    files["g_trunc.jpg"] = root / "g_trunc.jpg"
    files["g_trunc.jpg"].write_bytes(data[: len(data) // 2])
    files["h_junk.jpg"] = root / "h_junk.jpg"
    files["h_junk.jpg"].write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 8)
    save("i_base.jpg", photo(300, 200, 6), quality=85)
    return files


def test_byte_workers_send_plain_jpegs_to_gpu_and_decode_the_rest(tmp_path):
    from curate.stages.embed import _Images, jpeg_gpu_size

    files = mixed_set(tmp_path)
    names = sorted(files)
    ds = _Images([str(files[n]) for n in names], [(64, "bicubic", "shortest")], raw=True)
    route = {}
    for k, name in enumerate(names):
        idx, ok, crops, raw = ds[k]
        assert idx == k
        route[name] = "bytes" if raw is not None else ("cpu" if ok else "fail")
        if raw is not None:
            assert crops is None and raw[0].tobytes() == files[name].read_bytes()
            assert raw[1] == np.prod(Image.open(files[name]).size)  # pixels, for the GPU memory budget
        else:
            assert crops[0].shape == (3, 64, 64) and raw is None
    assert route == {
        "a_base.jpg": "bytes", "b_grey.jpg": "bytes", "i_base.jpg": "bytes",
        "c_prog.jpg": "cpu", "d.png": "cpu", "e_rot.jpg": "cpu", "f_cmyk.jpg": "cpu",
        "g_trunc.jpg": "fail", "h_junk.jpg": "fail",
    }  # fmt: skip
    assert jpeg_gpu_size(files["i_base.jpg"].read_bytes()) == (300, 200)
    # without raw every file is decoded in the worker, as before
    plain = _Images([str(files["a_base.jpg"])], [(64, "bicubic", "shortest")])
    assert plain[0][3] is None and plain[0][1]


@pytest.mark.parametrize("spec", [(64, "bicubic", "shortest"), (224, "bicubic", "shortest"),
                                  (64, "bilinear", "shortest"), (64, "bicubic", "squash")])  # fmt: skip
def test_resize_crop_matches_pil_crop(spec):
    import torch

    from curate.stages.embed import _to_uint8, crop_for, resize_crop

    for k, (w, h) in enumerate([(300, 200), (181, 397), (640, 480), (50, 70), (64, 64), (1024, 517)]):
        img = photo(w, h, seed=10 + k)
        ref = crop_for(img, spec).astype(np.float32)
        t = torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())
        ours = _to_uint8(resize_crop(t, spec)).numpy().astype(np.float32)
        assert ours.shape == ref.shape == (3, spec[0], spec[0])
        diff = np.abs(ours - ref)
        assert diff.mean() < 2.0, (w, h, diff.mean())
        assert np.percentile(diff, 99) <= 12, (w, h)
    grey = torch.from_numpy(np.asarray(photo(120, 90, 3).convert("L"))[None].copy())
    g = _to_uint8(resize_crop(grey, spec))
    assert g.shape == (3, spec[0], spec[0]) and torch.equal(g[0], g[2])


def test_gpu_path_on_cpu_tensors_matches_cpu_path_in_order(tiny, tmp_path, monkeypatch):
    """The whole byte-worker + batched decode + resize/crop path, run on CPU: same rows, same embeddings."""
    from curate.models.clip import load_clip
    from curate.stages import embed

    mixed_set(tmp_path / "mixed")
    for k in range(12):  # more plain JPEGs, odd sizes, to cross chunk and batch edges
        photo(97 + 13 * k, 180 - 5 * k, 20 + k).save(tmp_path / "mixed" / f"z{k:02d}.jpg", quality=90)
    paths = sorted(str(p) for p in (tmp_path / "mixed").iterdir())
    cm = load_clip(str(tiny), None, "cpu")
    assert embed.gpu_decode_available("cpu")  # probe once before counting decodes
    decoded = []
    real = embed._decode_jpegs
    monkeypatch.setattr(embed, "_decode_jpegs", lambda d, dev: decoded.append(len(d)) or real(d, dev))
    ok_c, (ec,) = embed.encode_paths(paths, [cm], workers=0, batch_size=5, gpu_decode=False)
    assert decoded == []
    for workers in (0, 2):
        decoded.clear()
        ok_g, (eg,) = embed.encode_paths(paths, [cm], workers=workers, batch_size=5, gpu_decode=True)
        assert sum(decoded) == 15  # a_base, b_grey, i_base + 12: one decode each, in batched calls
        assert max(decoded) > 1
        assert np.array_equal(ok_g, ok_c)
        bad = [Path(p).name for p, o in zip(paths, ok_g, strict=True) if not o]
        assert bad == ["g_trunc.jpg", "h_junk.jpg"]
        cos = (eg[ok_g] * ec[ok_g]).sum(1)
        assert cos.min() > 0.99, cos.min()
        assert not eg[~ok_g].any()
    # a small GPU memory budget splits each batch into several decode calls; nothing changes
    monkeypatch.setattr(embed, "GPU_BATCH_PIXELS", 40_000)
    decoded.clear()
    ok_b, (eb,) = embed.encode_paths(paths, [cm], workers=0, batch_size=8, gpu_decode=True)
    assert sum(decoded) == 15 and max(decoded) <= 3 and len(decoded) >= 6, decoded
    assert np.array_equal(ok_b, ok_g) and np.allclose(eb, eg, atol=1e-5)
    monkeypatch.undo()
    monkeypatch.setattr(embed, "_decode_jpegs", lambda d, dev: decoded.append(len(d)) or real(d, dev))
    # cpu_share: the workers decode half of the plain JPEGs themselves; same rows, same answers
    decoded.clear()
    ok_s, (es,) = embed.encode_paths(paths, [cm], workers=2, batch_size=5, gpu_decode=True, cpu_share=0.5)
    assert 4 <= sum(decoded) <= 11 and np.array_equal(ok_s, ok_c)
    assert (es[ok_s] * ec[ok_s]).sum(1).min() > 0.99
    # rows stay in place: a shuffled order gives the same per-file embeddings
    perm = np.random.default_rng(0).permutation(len(paths))
    ok_p, (ep,) = embed.encode_paths([paths[i] for i in perm], [cm], workers=2, batch_size=4, gpu_decode=True)
    assert np.array_equal(ok_p, ok_g[perm]) and np.allclose(ep, eg[perm], atol=1e-5)


def test_gpu_decode_failure_is_isolated_to_its_image(tiny, tmp_path, monkeypatch):
    import torch

    from curate.models.clip import load_clip
    from curate.stages import embed

    files = mixed_set(tmp_path / "m")
    good = torch.frombuffer(bytearray(files["a_base.jpg"].read_bytes()), dtype=torch.uint8)
    junk = torch.frombuffer(bytearray(files["h_junk.jpg"].read_bytes()), dtype=torch.uint8)
    out = embed._decode_jpegs([good, junk, good], "cpu")
    assert out[1] is None and out[0].shape == out[2].shape == (3, 110, 150)
    # a corrupt file that gets past the header check is marked not ok, its neighbours are not
    monkeypatch.setattr(embed, "jpeg_gpu_size", lambda data: (1, 1))
    paths = [str(files[n]) for n in ("a_base.jpg", "h_junk.jpg", "i_base.jpg", "g_trunc.jpg")]
    cm = load_clip(str(tiny), None, "cpu")
    ok, (e,) = embed.encode_paths(paths, [cm], workers=0, gpu_decode=True)
    assert ok.tolist() == [True, False, True, False]
    assert not e[1].any() and np.allclose(np.linalg.norm(e[[0, 2]], axis=1), 1, atol=1e-4)


def test_gpu_decode_option_resolution(tiny, monkeypatch):
    from curate.models.clip import load_clip
    from curate.stages import embed

    cm = load_clip(str(tiny), None, "cpu")
    assert embed._resolve_gpu_decode(None, [cm]) is None  # auto: CPU model -> CPU decode
    assert embed._resolve_gpu_decode(False, [cm]) is None
    assert embed._resolve_gpu_decode(True, [cm]) == "cpu"
    monkeypatch.setattr(embed, "gpu_decode_available", lambda dev: False)
    with pytest.raises(CurateError, match="gpu_decode = false"):
        embed._resolve_gpu_decode(True, [cm])


def test_decode_thread_errors_reach_the_caller_and_threads_stop(tiny, tmp_path, monkeypatch):
    import threading

    from curate.models.clip import load_clip
    from curate.stages import embed

    files = mixed_set(tmp_path)
    cm = load_clip(str(tiny), None, "cpu")
    calls = []

    def boom(chunk, *a):
        calls.append(len(chunk.idx))
        raise RuntimeError("boom in decode thread")

    monkeypatch.setattr(embed, "_decode_crop", boom)
    with pytest.raises(RuntimeError, match="boom in decode thread"):
        embed.encode_paths([str(files["a_base.jpg"])] * 12, [cm], workers=0, batch_size=2, gpu_decode=True)
    assert 1 <= len(calls) <= 2  # each thread stops at its first failure; no batch is encoded
    assert not any(t.name.startswith("curate-jpeg-decode") for t in threading.enumerate())
