"""Text-encoder outputs cached on disk beside the latents: reused by a second `curate train`, recomputed for a caption
edited by hand after tagging; SDXL keeps both encoders' states and the pooled embedding. Tiny models, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from curate.cli import app
from tests.trainer_fixtures import sd15_dir, tiny_sdxl_pipeline  # noqa: F401  (pytest fixtures)
from trainer_bridge import data as D

TINY = ["network_dim=4", "network_alpha=4", "mixed_precision='no'", "batch_size=1", "epochs=1",
        "unet_lr=1e-2", "log_every_n_steps=1", "seed=7", "resolution=64"]  # fmt: skip


COLORS = ["red", "green", "blue"]


def _train(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, ["train", *args, *(a for s in TINY for a in ("--set", s))])
    return r.exit_code, r.stdout, r.output


def _te_files(cache: Path) -> dict[str, tuple[Path, float]]:
    """{caption: (file, mtime)} of the text-encoder cache."""
    out = {}
    for f in (cache / "te").glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            out[sf.metadata()["caption"]] = (f, f.stat().st_mtime_ns)
    return out


def test_hand_edited_caption_is_re_encoded_and_the_rest_reused(sd15_dir, tmp_path):  # noqa: F811
    ds = tmp_path / "ds"
    ds.mkdir()
    for i in range(3):
        low = np.random.default_rng(i).uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        Image.fromarray(low).resize((64, 64), Image.BILINEAR).save(ds / f"p{i}.png")
        # sentences (tag lists would turn shuffle_caption on in the export, and shuffled captions are not cached)
        (ds / f"p{i}.txt").write_text(f"a photo of sks with a {COLORS[i]} ball")
    assert CliRunner().invoke(app, ["scan", str(ds)]).exit_code == 0
    out = tmp_path / "out"

    # first run: 3 captions + "" (caption dropout) encoded in one batch, 3 latents encoded; the summary table
    code, _, text = _train(str(ds), "--base", str(sd15_dir), "--output-dir", str(out))
    assert code == 0, text
    for needle in ("latent cache", "3 images encoded, 0 from the cache", "4 captions encoded, 0 from the cache",
                   "steady speed", "img/s", "total wall time"):  # fmt: skip
        assert needle in text, (needle, text)
    first = _te_files(out / "cache")
    assert sorted(first) == ["", *sorted(f"a photo of sks with a {c} ball" for c in COLORS)]

    # a hand edit of one caption file after tagging: the next train re-scans, re-exports and re-encodes that one
    (ds / "p1.txt").write_text("a photo of sks with a yellow ball")
    code, stdout, text = _train(str(ds), "--base", str(sd15_dir), "--output-dir", str(out), "--json")
    assert code == 0, text
    res = json.loads(stdout)  # --json: the document alone on stdout
    t = res["timings"]
    assert (t["te_encoded"], t["te_cached"]) == (1, 3), t
    assert (t["latents_encoded"], t["latents_cached"]) == (0, 3), t
    assert res["steps"] == 3 and t["total_s"] > t["train_s"] > 0 and t["steady_img_s"] > 0
    second = _te_files(out / "cache")
    for cap in (
        "",
        "a photo of sks with a red ball",
        "a photo of sks with a blue ball",
    ):  # reused, not rewritten
        assert second[cap] == first[cap]
    new = "a photo of sks with a yellow ball"
    assert new in second and second[new][0] not in {f for f, _ in first.values()}

    # the recomputed embedding is the text encoder's output for the new caption (not the stale one)
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(sd15_dir / "tokenizer")
    te = CLIPTextModel.from_pretrained(sd15_dir / "text_encoder").eval()
    with torch.no_grad():
        want, _ = D.encode_prompts([tok], [te], [new], "cpu")
        stale, _ = D.encode_prompts([tok], [te], ["a photo of sks with a green ball"], "cpu")
    with safe_open(str(second[new][0]), "pt") as sf:
        got = sf.get_tensor("emb")
    torch.testing.assert_close(got, want[0], atol=1e-5, rtol=1e-5)
    assert (got - stale[0]).abs().max() > 1e-3


def test_sdxl_both_encoders_and_pooled_cached_and_keyed(tmp_path):
    pipe = tiny_sdxl_pipeline(tmp_path / "tok")
    toks, tes = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
    caps = ["sks, a photo", "sks, red", "sks, a photo", ""]
    tid = D.te_id(toks, tes, "xl", 0, torch.float32)
    with torch.no_grad():
        want, want_pooled = D.encode_prompts(toks, tes, caps, "cpu")
    stats: dict = {}
    emb, pooled = D.encode_text_cached(toks, tes, caps, "cpu", 0, tmp_path / "te", tid, torch.float32,
                                       batch_size=2, stats=stats)  # fmt: skip
    assert stats == {"te_encoded": 3, "te_cached": 0, "te_pruned": 0}  # the repeated caption once
    assert emb.shape == (4, 77, 64) and pooled.shape == (
        4,
        32,
    )  # 32 + 32 hidden (both encoders) + CLIP-G pooled
    torch.testing.assert_close(emb, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, want_pooled, atol=1e-5, rtol=1e-5)
    assert len(list((tmp_path / "te").glob("*.safetensors"))) == 3
    # read back without running the encoders
    stats = {}
    emb2, pooled2 = D.encode_text_cached(toks, [None, None], caps, "cpu", 0, tmp_path / "te", tid, torch.float32,
                                         read_only=True, stats=stats)  # fmt: skip
    assert stats == {"te_encoded": 0, "te_cached": 3}
    assert torch.equal(emb, emb2) and torch.equal(pooled, pooled2)
    # the key covers the text encoders' weights, clip_skip and the dtype
    other = tiny_sdxl_pipeline(tmp_path / "tok2", seed=9)
    ids = {tid, D.te_id(toks, [other.text_encoder, other.text_encoder_2], "xl", 0, torch.float32),
           D.te_id(toks, tes, "xl", 2, torch.float32), D.te_id(toks, tes, "xl", 0, torch.bfloat16)}  # fmt: skip
    assert len(ids) == 4
    with pytest.raises(D.TrainError, match="text-encoder cache miss"):
        D.encode_text_cached(toks, tes, ["new caption"], "cpu", 0, tmp_path / "te", tid, torch.float32,
                             read_only=True)  # fmt: skip
