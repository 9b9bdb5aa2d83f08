"""BLIP captions through the real code path, on a tiny random BLIP saved as safetensors and loaded offline."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import tests.tiny_blip as tiny_blip
import tests.tiny_wd14 as tiny_wd14
from curate import Dataset  # noqa: E402
from curate.errors import CurateError  # noqa: E402
from curate.stages.caption import load_nl_captions  # noqa: E402


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return tiny_blip.build(tmp_path_factory.mktemp("blip"))


@pytest.fixture()
def ds_path(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
            root / f"n{i}.png"
        )
    for i, c in enumerate([(255, 0, 0), (0, 0, 255), (20, 200, 20)]):
        Image.new("RGB", (30 + 10 * i, 60), c).save(root / f"c{i}.png")
    with Dataset.open(root) as ds:
        ds.scan()
    return root


@pytest.mark.slow
def test_blip_batched_equals_unbatched_and_is_cached(ds_path, blip_dir):
    with Dataset.open(ds_path) as ds:
        out = ds.caption(model=str(blip_dir), device="cpu", batch_size=4, num_beams=1, min_length=3,
                         max_length=10, caption={"trigger": "mychar"})  # fmt: skip
        assert out.run.generated == 6 and out.run.cached == 0
        batched = load_nl_captions(ds.manifest)
        assert len(batched) == 6 and len(set(batched.values())) >= 3  # captions depend on the image
        words = set(tiny_blip.WORDS)
        assert all(set(t.split()) <= words for t in batched.values())
        for rec in ds.kept():
            sentence = batched[rec.sha256]
            if sentence:
                assert (ds_path / rec.path).with_suffix(".txt").read_text() == f"mychar, {sentence}"
        again = ds.caption(
            model=str(blip_dir), device="cpu", batch_size=4, num_beams=1, min_length=3, max_length=10
        )
        assert again.run.generated == 0 and again.run.cached == 6
        one = ds.caption(model=str(blip_dir), device="cpu", batch_size=1, num_beams=1, min_length=3,
                         max_length=10, force=True)  # fmt: skip
        assert one.run.generated == 6
        assert load_nl_captions(ds.manifest) == batched
        # new generation options -> captioned again (beam search, a prompt prefix)
        pre = ds.caption(model=str(blip_dir), device="cpu", num_beams=2, max_length=10, prompt="a photo of")
        assert pre.run.generated == 6
        assert all(t.startswith("a photo of") for t in load_nl_captions(ds.manifest).values())


def test_combined_caption_tags_and_sentence(ds_path, blip_dir, tmp_path):
    model = tiny_wd14.build(tmp_path / "tagger")
    with Dataset.open(ds_path) as ds:
        ds.tag(model=str(model), device="cpu", general=0.3, character=0.5, trigger="zz")
        tags = {r.sha256: r.tags for r in ds.kept()}
        ds.caption(model=str(blip_dir), device="cpu", num_beams=1, min_length=3, max_length=8, combine=True)
        nl = load_nl_captions(ds.manifest)
        for r in ds.kept():
            if nl[r.sha256]:
                text = (ds_path / r.path).with_suffix(".txt").read_text()
                parts = text.split(", ")
                assert parts[0] == "zz" and nl[r.sha256] in parts
                assert [p for p in parts if p != nl[r.sha256]] == tags[r.sha256]


def test_missing_blip_message(ds_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(ds_path / "none"))
    with Dataset.open(ds_path) as ds, pytest.raises(CurateError) as e:
        ds.caption(model="Salesforce/blip-image-captioning-large", device="cpu")
    assert "hf download Salesforce/blip-image-captioning-large --local-dir blip-" in e.value.message
