"""Caption building on known scores: thresholds, categories, trigger, common tags, escaping, token counts."""

from __future__ import annotations

import numpy as np
import pytest

from curate.errors import CurateError
from curate.manifest import ImageRecord
from curate.models.wd14 import mcut_threshold
from curate.stages.captions import build_captions, make_config

CATS = {
    "1girl": 0, "solo": 0, "long_hair": 0, "hair": 0, "simple_background": 0, "white_background": 0,
    "smile": 0, "^_^": 0, ">_<": 0, "hatsune_miku_(cosplay)": 0, "blue_eyes": 0, "eyes": 0,
    "hatsune_miku": 4, "kagamine_rin": 4, "general": 9, "sensitive": 9,
}  # fmt: skip


def rec(i: int) -> ImageRecord:
    return ImageRecord(f"sha{i}", f"im{i}.png", [f"im{i}.png"], 1, "PNG", "RGB", 8, 8)


SCORES = {
    "sha0": {"1girl": 0.99, "solo": 0.95, "long_hair": 0.80, "hair": 0.50, "smile": 0.30, "^_^": 0.60,
             "hatsune_miku_(cosplay)": 0.40, "hatsune_miku": 0.90, "kagamine_rin": 0.70,
             "general": 0.8, "sensitive": 0.2},
    "sha1": {"1girl": 0.97, "solo": 0.20, "simple_background": 0.88, "blue_eyes": 0.45, "eyes": 0.36,
             "kagamine_rin": 0.86, "general": 0.3, "sensitive": 0.7},
    "sha2": {"1girl": 0.91, "smile": 0.77, ">_<": 0.5, "white_background": 0.6},
}  # fmt: skip


def texts(**opts) -> dict[str, str]:
    cfg = make_config(opts)
    return {b.sha256: b.text for b in build_captions([rec(0), rec(1), rec(2)], SCORES, CATS, cfg)}


def test_thresholds_categories_order_and_forms():
    t = texts(general=0.35, character=0.85)
    # character first; general by confidence; hair implied by long hair; kaomoji kept; parentheses escaped
    assert t["sha0"] == "hatsune_miku, 1girl, solo, long hair, ^_^, hatsune miku \\(cosplay\\)".replace(
        "hatsune_miku,", "hatsune miku,"
    )
    assert t["sha1"] == "kagamine rin, 1girl, simple background, blue eyes"  # "eyes" implied by "blue eyes"
    assert t["sha2"] == "1girl, smile, white background, >_<"
    t = texts(general=0.35, character=0.6, implied=False, escape=False, underscores=False)
    assert t["sha0"] == (
        "hatsune_miku, kagamine_rin, 1girl, solo, long_hair, ^_^, hair, hatsune_miku_(cosplay)"
    )


def test_trigger_keep_tokens_common_blacklist_replace_max_tags():
    cfg = make_config({"trigger": "mychar, mystyle", "general": 0.35, "drop_common": 0.9})
    assert cfg.keep_tokens == 2
    built = build_captions([rec(0), rec(1), rec(2)], SCORES, CATS, cfg)
    t = {b.sha256: b.text for b in built}
    # 1girl is in all 3 images (> 90%): dropped everywhere, trigger words first
    assert t["sha2"] == "mychar, mystyle, smile, white background, >_<"
    assert built[0].dropped_common == ["1girl"]
    t = texts(general=0.35, drop_common=0.6)  # 1girl 3/3 and smile? (0.30 < 0.35 in sha0) -> only 1girl
    assert t["sha2"] == "smile, white background, >_<"
    t = texts(general=0.35, blacklist=["simple background", "solo"], replace=["1girl=woman", "^_^=happy"])
    assert t["sha0"] == "hatsune miku, woman, long hair, happy, hatsune miku \\(cosplay\\)"
    assert t["sha1"] == "kagamine rin, woman, blue eyes"
    t = texts(general=0.35, max_tags=2, rating=True)
    assert t["sha0"] == "hatsune miku, 1girl, solo, general"
    assert t["sha1"] == "kagamine rin, 1girl, simple background, sensitive"


def test_mcut():
    assert mcut_threshold(np.array([0.9, 0.85, 0.3, 0.2])) == pytest.approx(0.575)
    t = texts(mcut=True)
    # sha0 general: .99 .95 .80 .60 .50 .40 .30 -> largest gap .80 -> .60, threshold .70;
    # characters .90 .70 -> threshold max(0.15, .80)
    assert t["sha0"] == "hatsune miku, 1girl, solo, long hair"
    with pytest.raises(CurateError):
        make_config({"general": 1.5})
    with pytest.raises(CurateError):
        make_config({"replace": ["no-equals"]})


def test_clip_token_counts_equal_open_clip(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    from curate.models.clip_tokenizer import _fast_counter, _transformers_counter, count_tokens

    st = SimpleTokenizer()
    samples = [
        "mychar, 1girl, long hair, hatsune miku \\(cosplay\\), ^_^, >_<",
        "a photograph of a Café — naïve résumé!!  with  spaces",
        "Ünïcödé 日本語 テキスト 😀, o_o, +_+, (o)_(o)",
        ", ".join(f"tag{i} word" for i in range(60)),
    ]
    expect = [len(st.encode(s)) for s in samples]
    assert expect[3] > 75
    assert _fast_counter(tmp_path) is None
    built = _transformers_counter(tmp_path)  # derives vocab.json + merges.txt from open_clip's BPE
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "tokenizer.json").exists()
    fast = _fast_counter(tmp_path)
    assert [built(s) for s in samples] == expect
    assert [fast(s) for s in samples] == expect
    assert count_tokens(samples) == expect


def test_sources_tags_caption_both():
    nl = {"sha0": "a girl with long hair", "sha2": "a smiling girl"}
    recs = [rec(0), rec(1), rec(2)]

    def build(source):
        cfg = make_config({"trigger": ["mychar"], "source": source, "general": 0.9, "character": 0.85})
        return {b.sha256: b.text for b in build_captions(recs, SCORES, CATS, cfg, nl)}

    assert build("caption") == {
        "sha0": "mychar, a girl with long hair",
        "sha1": "mychar, kagamine rin, 1girl",  # no sentence for this image: tags instead
        "sha2": "mychar, a smiling girl",
    }
    assert build("both")["sha0"] == "mychar, hatsune miku, a girl with long hair, 1girl, solo"
    assert build("tags")["sha0"] == "mychar, hatsune miku, 1girl, solo"
    assert build("tags")["sha2"] == "mychar, 1girl"
