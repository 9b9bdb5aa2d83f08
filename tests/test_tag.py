"""WD14 tagging on a tiny ONNX model with the real layout: preprocessing, score cache, caption files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tests.tiny_wd14 as tiny_wd14
from curate import Dataset  # noqa: E402
from curate.errors import CurateError  # noqa: E402
from curate.models import wd14  # noqa: E402
from curate.models.clip_tokenizer import token_counter  # noqa: E402


def reference_preprocess(img: Image.Image, size: int) -> np.ndarray:
    """The reference tagger's steps, written out independently: alpha on white, centred white pad,
    bicubic resize, float32, RGB->BGR."""
    if img.mode == "RGBA":
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        bg.alpha_composite(img)
        img = bg.convert("RGB")
    w, h = img.size
    s = max(w, h)
    arr = np.full((s, s, 3), 255, np.uint8)
    top, left = (s - h) // 2, (s - w) // 2
    arr[top : top + h, left : left + w] = np.asarray(img)
    sq = Image.fromarray(arr)
    if s != size:
        sq = sq.resize((size, size), Image.BICUBIC)
    return np.asarray(sq).astype(np.float32)[..., [2, 1, 0]]


def _img(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    if mode == "RGBA":
        a = np.full((h, w), 255, np.uint8)
        a[: h // 2] = 0  # top half transparent
        a[h // 2 :, : w // 3] = 128
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(a))
    return img


SIZES = [(50, 30), (20, 41), (16, 16), (120, 64), (33, 90), (64, 64)]


@pytest.fixture()
def model_dir(tmp_path):
    return tiny_wd14.build(tmp_path / "tagger")


@pytest.fixture()
def ds_path(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    for i, (w, h) in enumerate(SIZES):
        _img(w, h, i).save(root / f"img{i}.png")
    _img(40, 24, 99, "RGBA").save(root / "alpha.png")
    with Dataset.open(root) as ds:
        ds.scan()
    return root


def _stored(ds: Dataset, model: str) -> dict[str, dict[str, float]]:
    from curate.stages.tag import load_scores, model_key

    return load_scores(ds.manifest, model_key(model))


def test_preprocess_matches_reference_recipe():
    for i, (w, h) in enumerate([(50, 30), (21, 40), (448, 448), (7, 3), (640, 300)]):
        img = _img(w, h, i)
        for size in (16, 448):
            ours, ref = wd14.preprocess(img, size), reference_preprocess(img, size)
            assert ours.shape == (size, size, 3) and ours.dtype == np.float32
            assert np.array_equal(ours, ref), (w, h, size)
    rgba = _img(30, 20, 5, "RGBA")
    ours, ref = wd14.preprocess(rgba, 16), reference_preprocess(rgba, 16)
    assert np.array_equal(ours, ref)
    # padding is white and the image is centred: 50x30 at its own size has 10 white rows above and below
    sq = wd14.preprocess(_img(50, 30, 0), 50)
    assert (sq[:10] == 255).all() and (sq[40:] == 255).all() and not (sq[10:40] == 255).all()
    # channel order is BGR
    red = Image.new("RGB", (4, 4), (200, 10, 30))
    assert wd14.preprocess(red, 4)[0, 0].tolist() == [30.0, 10.0, 200.0]


def test_tag_scores_equal_reference_and_are_cached(ds_path, model_dir):
    with Dataset.open(ds_path) as ds:
        runs0 = wd14.RUNS
        out = ds.tag(model=str(model_dir), device="cpu", batch_size=3, general=0.35, character=0.85)
        assert out.run.inferred == 7 and out.run.cached == 0
        assert wd14.RUNS - runs0 == 3  # 7 images in batches of 3
        stored = _stored(ds, str(model_dir))
        names = [n for n, _ in tiny_wd14.TAGS]
        cats = dict(tiny_wd14.TAGS)
        for rec in ds.kept():
            img = Image.open(ds_path / rec.path)
            img = img if img.mode == "RGBA" else img.convert("RGB")
            ref = tiny_wd14.reference_probs(reference_preprocess(img, tiny_wd14.SIZE)[None])[0]
            expect = {n: p for n, p in zip(names, ref, strict=True) if p >= 0.05 or cats[n] == 9}
            got = stored[rec.sha256]
            assert set(got) == set(expect), rec.path
            for n, p in expect.items():
                assert abs(got[n] - p) < 2e-4, (rec.path, n)
        # the caption in the manifest and the file agree, and only tags >= thresholds are in it
        for rec in ds.kept():
            txt = (ds_path / rec.path).with_suffix(".txt").read_text()
            assert txt == rec.caption
            sc = stored[rec.sha256]
            chosen = [
                n for n, p in sc.items() if (cats[n] == 0 and p >= 0.35) or (cats[n] == 4 and p >= 0.85)
            ]
            assert len(rec.tags) <= len(chosen)


def test_fixed_batch_model_gives_same_scores(tmp_path, monkeypatch):
    x = np.random.default_rng(3).uniform(0, 255, (5, tiny_wd14.SIZE, tiny_wd14.SIZE, 3)).astype(np.float32)
    dyn = wd14.WD14Tagger(str(tiny_wd14.build(tmp_path / "d")), device="cpu")
    fixed_dir = tiny_wd14.build(tmp_path / "f", batch=1)
    rewritten = wd14.WD14Tagger(str(fixed_dir), device="cpu")
    assert dyn.dynamic and rewritten.dynamic  # batch-1 export rewritten with a dynamic batch dim
    monkeypatch.setattr(wd14, "_dynamic_copy", lambda p: None)
    threaded = wd14.WD14Tagger(str(fixed_dir), device="cpu")
    assert not threaded.dynamic
    r0 = wd14.RUNS
    p_threaded = threaded.predict(x)
    assert wd14.RUNS - r0 == 5  # one run per image, spread over threads
    ref = tiny_wd14.reference_probs(x)
    for p in (dyn.predict(x), rewritten.predict(x), p_threaded):
        assert np.abs(p - ref).max() < 1e-5


def test_rethreshold_runs_no_model(ds_path, model_dir):
    with Dataset.open(ds_path) as ds:
        ds.tag(model=str(model_dir), device="cpu", general=0.35, implied=False)
        before = {r.path: r.tags for r in ds.kept()}
        wd14._CACHE.clear()
        for f in model_dir.iterdir():  # the model is gone: re-thresholding must not need it
            f.unlink()
        runs0 = wd14.RUNS
        out = ds.tag(general=0.6)
        assert wd14.RUNS == runs0 and out.run.inferred == 0 and out.run.cached == 7
        after = {r.path: r.tags for r in ds.kept()}
    assert sum(map(len, after.values())) < sum(map(len, before.values()))
    for p in before:
        assert set(after[p]) <= set(before[p])


def test_user_captions_survive_retag(ds_path, model_dir):
    (ds_path / "img1.txt").write_text("my own words about img1")
    with Dataset.open(ds_path) as ds:
        out = ds.tag(model=str(model_dir), device="cpu", general=0.35)
        assert out.captions.write.kept_user == ["img1.txt"]
        assert (ds_path / "img1.txt").read_text() == "my own words about img1"
        (ds_path / "img2.txt").write_text("hand edited caption")
        old3 = (ds_path / "img3.txt").read_text()
        out = ds.tag(general=0.1, trigger="mychar")
        assert (ds_path / "img2.txt").read_text() == "hand edited caption"
        assert out.captions.write.kept_edited == ["img2.txt"]
        assert (ds_path / "img3.txt").read_text() != old3
        assert (ds_path / "img3.txt").read_text().startswith("mychar, ")
        by_path = {r.path: r for r in ds.kept()}
        assert by_path["img2.png"].caption == "hand edited caption"
        # --overwrite replaces them, with a backup of what was there
        out = ds.edit(overwrite=True)
        assert sorted(out.captions.write.backed_up) == ["img1.txt", "img2.txt"]
        bdir = Path(out.captions.write.backup_dir)
        assert (bdir / "img2.txt").read_text() == "hand edited caption"
        assert (bdir / "img1.txt").read_text() == "my own words about img1"
        assert (ds_path / "img2.txt").read_text().startswith("mychar, ")


def test_sidecar_name_collision_is_reported(ds_path, model_dir):
    Image.open(ds_path / "img3.png").convert("RGB").rotate(90).save(ds_path / "img3.jpg", quality=95)
    with Dataset.open(ds_path) as ds:
        ds.scan()
        out = ds.tag(model=str(model_dir), device="cpu")
    assert out.captions.write.collisions == ["img3.png"]  # img3.jpg sorts first and owns img3.txt
    assert len(out.captions.write.written) == 7


def test_jsonl_format_keeps_foreign_entries(ds_path, model_dir):
    (ds_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "img0.png", "text": "user text"}) + "\n"
        + json.dumps({"file_name": "other/x.png", "text": "unrelated"}) + "\n"
    )  # fmt: skip
    with Dataset.open(ds_path) as ds:
        ds.tag(model=str(model_dir), device="cpu", format="jsonl", trigger="zz")
    lines = [json.loads(x) for x in (ds_path / "metadata.jsonl").read_text().splitlines()]
    by = {e["file_name"]: e["text"] for e in lines}
    assert by["img0.png"] == "user text" and by["other/x.png"] == "unrelated"
    assert len(by) == 8 and all(by[f"img{i}.png"].startswith("zz") for i in range(1, 6))
    assert not list(ds_path.glob("*.txt"))


def test_check_rule_captions(ds_path, model_dir):
    with Dataset.open(ds_path) as ds:
        assert ds.check(["captions"]) == []  # fresh dataset: rule inactive
        ds.tag(model=str(model_dir), device="cpu", trigger="mychar")
        assert ds.check(["captions"]) == []
        (ds_path / "img4.txt").unlink()
        (ds_path / "img5.txt").write_text("1girl, solo")
        (ds_path / "img0.txt").write_text("mychar, " + ", ".join(f"tag number {i}" for i in range(40)))
        v = {(x.path, x.rule) for x in ds.check(["captions"])}
    expect = {("img4.png", "no-caption"), ("img5.png", "no-trigger"), ("img0.png", "caption-too-long")}
    if token_counter() is None:  # no CLIP tokenizer installed (open_clip missing): no length rule
        expect.discard(("img0.png", "caption-too-long"))
    assert v == expect


def test_missing_model_message(ds_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(ds_path / "no-cache"))
    with Dataset.open(ds_path) as ds, pytest.raises(CurateError) as e:
        ds.tag(model="SmilingWolf/wd-swinv2-tagger-v3")
    msg = e.value.message
    assert "hf download SmilingWolf/wd-swinv2-tagger-v3 model.onnx selected_tags.csv --local-dir wd-" in msg
    assert "\n" not in msg


def test_cli_tag_edit_tags(ds_path, model_dir):
    from typer.testing import CliRunner

    from curate.cli import app

    r = CliRunner()
    res = r.invoke(app, ["tag", str(ds_path), "--model", str(model_dir), "--device", "cpu", "--general", "0.2",
                         "--trigger", "mychar", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["run"]["inferred"] == 7 and d["captions"]["keep_tokens"] == 1
    res = r.invoke(app, ["edit", str(ds_path), "--remove", "solo", "--replace", "1girl=woman", "--json"])
    assert res.exit_code == 0, res.output
    caps = [p.read_text() for p in ds_path.glob("*.txt")]
    assert all(c.startswith("mychar") for c in caps) and not any(", solo" in c for c in caps)
    assert not any("1girl" in c for c in caps)
    res = r.invoke(app, ["tags", str(ds_path), "--json"])
    st = json.loads(res.stdout)
    assert st["tagged"] == 7 and "mychar" in st["always"] and len(st["tokens"]) == 7
    res = r.invoke(app, ["tag", str(ds_path), "--general", "1.5"])
    assert res.exit_code == 2 and "between 0 and 1" in res.output


def test_toml_options_in_tag_and_caption_sections(ds_path, model_dir):
    (ds_path / "curate.toml").write_text(
        f'[tag]\nmodel = "{model_dir}"\ndevice = "cpu"\ngeneral = 0.6\ntrigger = "tt"\n\n'
        '[caption]\ncharacter = 0.3\nblacklist = ["solo"]\nimplied = false\n'
    )
    cats = dict(tiny_wd14.TAGS)
    with Dataset.open(ds_path) as ds:
        ds.tag()
        stored = _stored(ds, str(model_dir))
        for rec in ds.kept():
            sc = stored[rec.sha256]
            want_c = sorted((n for n, p in sc.items() if cats[n] == 4 and p >= 0.3), key=lambda n: -sc[n])
            want_g = sorted(
                (n for n, p in sc.items() if cats[n] == 0 and p >= 0.6 and n != "solo"), key=lambda n: -sc[n]
            )
            want = ["tt"] + [wd14_readable(n) for n in want_c + want_g]
            assert rec.tags == want, rec.path
        before = sum(len(r.tags) for r in ds.kept())
        ds.tag(general=0.2)  # a flag beats the file
        assert sum(len(r.tags) for r in ds.kept()) > before


def wd14_readable(n: str) -> str:
    from curate.stages.captions import escape, readable

    return escape(readable(n))
