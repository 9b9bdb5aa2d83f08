"""User journeys: kohya concept folders whose hand captions start with the class token (keep_tokens per
subset), durable dedupe overrides written from the CLI, and the text-encoder and latent caches pruned after
caption and image edits.

Folders are built in tmp_path and the CLI runs through typer's CliRunner; the trainer runs on the tiny
models of tests/trainer_fixtures.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

from curate.cli import app
from tests.test_export import validate_sd_scripts_config
from tests.test_roundtrip_train import TINY, one_line_error, picture
from tests.trainer_fixtures import sd15_dir  # noqa: F401  (pytest fixture)

run = CliRunner().invoke


def train_timings(ds: Path, base: Path, out: Path, sets: list[str]) -> dict:
    """`curate train DS --json` with these --set options: the run's timings (cache counts among them)."""
    r = run(app, ["train", str(ds), "--base", str(base), "--output-dir", str(out), "--json",
                  *(a for s in sets for a in ("--set", s))])  # fmt: skip
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["timings"]


def two_concepts(root: Path) -> dict[Path, bytes]:
    """root/10_mychar/ (every caption starts with mychar) and root/5_otherchar/ (one of three does not).

    Returns the caption files' bytes, to check that nothing rewrote them."""
    caps = {
        "10_mychar/a": "mychar, red hair, smile",
        "10_mychar/b": "mychar, blue sky, outdoors",
        "5_otherchar/c": "otherchar, hat, indoors",
        "5_otherchar/d": "otherchar, sword",
        "5_otherchar/e": "standing, otherchar, night",
    }
    for i, (stem, text) in enumerate(caps.items()):
        picture(root / f"{stem}.png", 64, 64, i)
        (root / f"{stem}.txt").write_text(text)
    return {p: p.read_bytes() for p in root.rglob("*.txt")}


def subsets_by_folder(toml: Path) -> tuple[dict, dict[str, dict]]:
    doc = tomllib.loads(toml.read_text())
    validate_sd_scripts_config(doc)
    return doc["general"], {Path(s["image_dir"]).name: s for d in doc["datasets"] for s in d["subsets"]}


def test_kohya_hand_captions_pin_the_class_token_per_subset(tmp_path):
    ds = tmp_path / "ds"
    originals = two_concepts(ds)
    assert run(app, ["scan", str(ds)]).exit_code == 0
    r = run(app, ["export", str(ds), str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    general, subs = subsets_by_folder(tmp_path / "out" / "dataset.toml")
    assert general["shuffle_caption"] is True and general["keep_tokens"] == 0
    assert subs["10_mychar"]["keep_tokens"] == 1  # every caption starts with mychar: pinned
    assert "keep_tokens" not in subs["5_otherchar"]  # one caption lacks it: the [general] 0
    warns = [w for w in json.loads(r.stdout)["warnings"] if "keep_tokens" in w]
    assert warns == [
        "img/5_otherchar: 1 of 3 caption(s) do not start with 'otherchar', so keep_tokens = 0 there and "
        "shuffle_caption moves it; put it first in those captions to pin it"
    ]
    record = json.loads((tmp_path / "out" / "curate_export.json").read_text())
    assert {s["dir"]: s["keep_tokens"] for s in record["subsets"]} == {
        "img/10_mychar": 1,
        "img/5_otherchar": 0,
    }
    # the exported captions are the hand captions; the user's files are untouched
    assert (tmp_path / "out" / "img" / "5_otherchar").is_dir()
    exported = sorted(p.read_text().strip() for p in (tmp_path / "out" / "img").rglob("*.txt"))
    assert "standing, otherchar, night" in exported
    assert {p: p.read_bytes() for p in ds.rglob("*.txt")} == originals

    # the user fixes the odd caption: both subsets are pinned, no warning, and the fingerprint moved
    (ds / "5_otherchar" / "e.txt").write_text("otherchar, standing, night")
    r = run(app, ["export", str(ds), str(tmp_path / "out2"), "--json"])
    assert r.exit_code == 0, r.output
    general, subs = subsets_by_folder(tmp_path / "out2" / "dataset.toml")
    assert (subs["10_mychar"]["keep_tokens"], subs["5_otherchar"]["keep_tokens"]) == (1, 1)
    assert not [w for w in json.loads(r.stdout)["warnings"] if "keep_tokens" in w]
    assert (
        json.loads((tmp_path / "out2" / "curate_export.json").read_text())["fingerprint"]
        != record["fingerprint"]
    )

    # with --trigger the trigger goes first and both words are pinned where every caption has them
    r = run(app, ["export", str(ds), str(tmp_path / "out3"), "--trigger", "sks", "--json"])
    assert r.exit_code == 0, r.output
    general, subs = subsets_by_folder(tmp_path / "out3" / "dataset.toml")
    assert general["keep_tokens"] == 1 and subs["10_mychar"]["keep_tokens"] == 2
    first = sorted((tmp_path / "out3" / "img" / "10_mychar").glob("*.txt"))[0].read_text()
    assert first.startswith("sks, mychar, ")


def test_no_warning_without_shuffle_or_pin(tmp_path):
    """Sentences do not shuffle, so nothing moves: no keep_tokens warning even when the token is not first."""
    ds = tmp_path / "ds"
    picture(ds / "3_mychar" / "a.png", 64, 64, 0)
    (ds / "3_mychar" / "a.txt").write_text("a photo of mychar standing in a field.")
    picture(ds / "3_mychar" / "b.png", 64, 64, 1)
    (ds / "3_mychar" / "b.txt").write_text("mychar sitting on a chair.")
    assert run(app, ["scan", str(ds)]).exit_code == 0
    r = run(app, ["export", str(ds), str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    general, subs = subsets_by_folder(tmp_path / "out" / "dataset.toml")
    assert general["shuffle_caption"] is False and "keep_tokens" not in subs["3_mychar"]
    assert not [w for w in json.loads(r.stdout)["warnings"] if "keep_tokens" in w]


@pytest.mark.slow
def test_trainer_keeps_the_pinned_class_token_first_and_says_so(tmp_path, sd15_dir, monkeypatch):  # noqa: F811
    """`curate train DS` on the two concept folders: shuffled captions of 10_mychar keep mychar first, those of
    5_otherchar shuffle whole, and the LoRA's ss_datasets records each subset's keep_tokens."""
    from trainer_bridge import data as D
    from trainer_bridge.export import load_lora

    ds = tmp_path / "ds"
    originals = two_concepts(ds)
    seen: list[tuple[str, int, bool, str]] = []
    real = D.process_caption

    def spy(caption, keep_tokens, shuffle, dropout, rng):
        out = real(caption, keep_tokens, shuffle, dropout, rng)
        seen.append((caption, keep_tokens, shuffle, out))
        return out

    monkeypatch.setattr(D, "process_caption", spy)
    sets = [*TINY, "batch_size=4", "max_steps=6", "resolution=64"]

    def check(out: Path) -> None:
        mine = [s for s in seen if s[0].startswith("mychar")]
        other = [s for s in seen if "otherchar" in s[0]]
        assert len(mine) >= 6 and len(other) >= 3, seen
        assert all(k == 1 and sh and o.split(", ")[0] == "mychar" for _, k, sh, o in mine)
        assert all(k == 0 and sh for _, k, sh, _ in other)
        meta = load_lora(out / "lora.safetensors")[1]
        subsets = {s["image_dir"]: s for s in json.loads(meta["ss_datasets"])[0]["subsets"]}
        assert {k: (s["keep_tokens"], s["shuffle_caption"]) for k, s in subsets.items()} == {
            "10_mychar": (1, True),
            "5_otherchar": (0, True),
        }
        assert (subsets["10_mychar"]["img_count"], subsets["10_mychar"]["num_repeats"]) == (2, 10)
        assert meta["ss_shuffle_caption"] == "True"
        assert {p: p.read_bytes() for p in ds.rglob("*.txt")} == originals
        seen.clear()

    # the folder trained as it is (no manifest), shuffling as [train] says: the same pin, said in a note
    r = run(app, ["train", str(ds), "--base", str(sd15_dir), "--output-dir", str(tmp_path / "raw"),
                  *(a for s in [*sets, "shuffle_caption=true"] for a in ("--set", s))])  # fmt: skip
    assert r.exit_code == 0, r.output
    words = " ".join(r.output.split())
    assert "10_mychar: every caption starts with 'mychar': keep_tokens = 1 there" in words, r.output
    assert "5_otherchar: 1 of 3 caption(s) do not start with 'otherchar'" in words, r.output
    check(tmp_path / "raw")

    # curated: `curate train` exports it first, and the dataset TOML's subset keep_tokens is what trains
    assert run(app, ["scan", str(ds)]).exit_code == 0
    out = tmp_path / "out"
    r = run(app, ["train", str(ds), "--base", str(sd15_dir), "--output-dir", str(out),
                  *(a for s in sets for a in ("--set", s))])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "img/5_otherchar: 1 of 3 caption(s)" in " ".join(r.output.split())
    check(out)


def dup_dataset(root: Path) -> Path:
    """Four distinct images, two planted near-duplicates (resized copies); scanned and deduplicated."""
    from tests.images import textured

    root.mkdir(parents=True)
    for i in range(4):
        textured(640, 640, seed=i).save(root / f"img{i}.png")
    textured(640, 640, seed=0).resize((600, 600)).save(root / "img0_copy.png")
    textured(640, 640, seed=1).resize((500, 500)).save(root / "img1_small.png")
    assert run(app, ["scan", str(root)]).exit_code == 0
    return root


def dedupe_json(root: Path, *args: str) -> dict:
    r = run(app, ["dedupe", str(root), "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["dedupe"]


def groups(out: dict) -> dict[str, tuple[str, ...]]:
    return {g["keeper"]: tuple(sorted(m for m in g["members"] if m != g["keeper"])) for g in out["groups"]}


def overrides_count(root: Path) -> int:
    return json.loads(run(app, ["status", str(root), "--json"]).stdout)["dedupe_overrides"]


def test_dedupe_overrides_from_the_command_line(tmp_path):
    ds = dup_dataset(tmp_path / "ds")
    auto = {"img0.png": ("img0_copy.png",), "img1.png": ("img1_small.png",)}
    assert groups(dedupe_json(ds)) == auto

    # the resized copy is the one this person wants: a keeper by hand, recorded and applied in the same run
    out = dedupe_json(ds, "--keeper", "img0_copy.png")
    assert [(r["kind"], r["files"]) for r in out["overrides_recorded"]] == [("keeper", "img0_copy.png")]
    assert groups(out)["img0_copy.png"] == ("img0.png",)
    assert [(o["kind"], o["source"], o["result"]) for o in out["overrides"]["applied"]] == [
        ("keeper", "cli", "keeper")
    ]
    # img2 is another shot of the same thing (dedupe cannot know); img1 and its small copy are not the same
    out = dedupe_json(ds, "--same", str(ds / "img0.png"), "--same", "img2.png",
                      "--not-duplicate", "img1.png", "--not-duplicate", "img1_small.png")  # fmt: skip
    assert [r["kind"] for r in out["overrides_recorded"]] == ["merge", "split"]
    hand = {"img0_copy.png": ("img0.png", "img2.png")}
    assert groups(out) == hand
    assert overrides_count(ds) == 3

    # replayed by later runs, whatever the method; the summary says where they came from
    for method in ("hash", "auto"):
        out = dedupe_json(ds, "--method", method)
        assert groups(out) == hand, method
        assert [o["source"] for o in out["overrides"]["applied"]] == ["cli"] * 3
        assert "overrides_recorded" not in out
    r = run(app, ["dedupe", str(ds)])
    assert "3 hand choice(s) from the command line applied" in " ".join(r.output.split()), r.output

    # the export holds the hand keeper and both images of the split pair
    r = run(app, ["export", str(ds), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    exported = {
        i["source"] for i in json.loads((tmp_path / "out" / "curate_export.json").read_text())["images"]
    }
    assert exported == {"img0_copy.png", "img1.png", "img1_small.png", "img3.png"}

    # mistakes are one line each, and record nothing
    for args, needles in (
        (["--keeper", "nope.png"], ["nope.png", "curate scan"]),
        (["--keeper", str(tmp_path / "elsewhere.png")], ["outside the dataset"]),
        (["--keeper", "img3.png"], ["--keeper img3.png", "no duplicate group"]),
        (["--same", "img0.png"], ["--same needs two or more"]),
        (["--not-duplicate", "img3.png", "--not-duplicate", "img3.png"], ["identical bytes"]),
        (["--same", "img1.png", "--same", "img3.png", "--not-duplicate", "img1.png", "--not-duplicate",
          "img3.png"], ["--same and --not-duplicate"]),
    ):  # fmt: skip
        r = run(app, ["dedupe", str(ds), *args])
        assert r.exit_code == 2, (args, r.output, r.exception)
        one_line_error(r.output, *needles)
    assert overrides_count(ds) == 3
    r = run(app, ["dedupe", str(ds), "--keeper", "img2.png"])  # the merged-in shot as keeper: said in words
    words = " ".join(r.output.split())
    assert r.exit_code == 0 and "recorded: keeper img2.png" in words, r.output
    assert "4 hand choice(s) from the command line applied" in words and overrides_count(ds) == 4

    # --clear-overrides forgets them all: back to the automatic groups
    out = dedupe_json(ds, "--clear-overrides")
    assert out["overrides_cleared"] == 4 and groups(out) == auto and "overrides" not in out
    assert overrides_count(ds) == 0


def test_text_encoder_cache_drops_the_entry_of_an_edited_caption(tmp_path, sd15_dir):  # noqa: F811
    """train, edit one caption, train again: the second run encodes only the edited caption, its old entry is
    removed and the new one written; files the cache did not write (or wrote for another model) stay."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    ds = tmp_path / "ds"
    for i, color in enumerate(["red", "green", "blue"]):
        picture(ds / f"p{i}.png", 64, 64, i)
        (ds / f"p{i}.txt").write_text(
            f"a photo of sks with a {color} ball"
        )  # sentences: not shuffled, cached
    assert run(app, ["scan", str(ds)]).exit_code == 0
    out = tmp_path / "out"
    sets = [*TINY, "batch_size=1", "resolution=64"]

    def train() -> dict:
        return train_timings(ds, sd15_dir, out, sets)

    def entries() -> dict[str, str]:
        got = {}
        for f in (out / "cache" / "te").glob("*.safetensors"):
            with safe_open(str(f), "pt") as sf:
                got[f.name] = (sf.metadata() or {}).get("caption")
        return got

    t = train()
    assert (t["te_encoded"], t["te_cached"], t["te_pruned"]) == (4, 0, 0), t  # 3 captions + "" (dropout)
    te = out / "cache" / "te"
    # beside the cache's files: an entry for another text encoder, and files it never wrote
    other = te / ("ab" * 12 + ".safetensors")
    save_file({"emb": torch.zeros(2)}, str(other), metadata={"caption": "x", "te_id": "another-model"})
    (te / "notes.txt").write_text("mine")
    save_file({"w": torch.zeros(1)}, str(te / "mine.safetensors"), metadata={"te_id": "whatever"})
    first = entries()
    green = next(n for n, c in first.items() if c == "a photo of sks with a green ball")

    (ds / "p1.txt").write_text("a photo of sks with a yellow ball")
    t = train()
    assert (t["te_encoded"], t["te_cached"], t["te_pruned"]) == (1, 3, 1), t
    second = entries()
    assert green not in second and "a photo of sks with a green ball" not in second.values()
    assert list(second.values()).count("a photo of sks with a yellow ball") == 1
    assert {n: c for n, c in first.items() if n != green}.items() <= second.items()
    assert (
        other.is_file() and (te / "notes.txt").read_text() == "mine" and (te / "mine.safetensors").is_file()
    )
    assert len(second) == len(first)  # one out, one in: nothing accumulates

    # a third run with nothing changed encodes nothing and removes nothing
    t = train()
    assert (t["te_encoded"], t["te_cached"], t["te_pruned"]) == (0, 4, 0), t


def test_latent_cache_drops_the_files_of_removed_and_changed_images(tmp_path, sd15_dir):  # noqa: F811
    """train, delete one image and repaint another, train again: only the repainted image is encoded, the two
    stale latent files are removed, the others are reused byte for byte; files the cache did not write (or
    wrote for another VAE) stay."""
    import torch
    from safetensors.torch import save_file

    ds = tmp_path / "ds"
    for i in range(4):
        picture(ds / f"p{i}.png", 64, 64, i)
        (ds / f"p{i}.txt").write_text(f"a photo of sks number {i}")
    assert run(app, ["scan", str(ds)]).exit_code == 0
    out = tmp_path / "out"
    sets = [*TINY, "batch_size=1", "resolution=64"]

    def train() -> dict:
        return train_timings(ds, sd15_dir, out, sets)

    cache = out / "cache"

    def latents() -> dict[str, bytes]:
        return {f.name: f.read_bytes() for f in cache.glob("*_*_*x*.safetensors")}

    t = train()
    assert (t["latents_encoded"], t["latents_cached"], t["latents_pruned"]) == (4, 0, 0), t
    first = latents()
    assert len(first) == 4
    vid = next(iter(first)).split("_")[1]
    # beside the cache's files: a latent of another VAE, and files it never wrote
    other = cache / f"{'ab' * 10}_{'cd' * 6}_64x64.safetensors"
    save_file({"latent": torch.zeros(4, 8, 8), "crop": torch.zeros(2)}, str(other))
    odd = cache / f"{'ef' * 10}_{vid}_64x64.safetensors"  # our name, not our tensors
    save_file({"w": torch.zeros(1)}, str(odd))
    (cache / "notes.txt").write_text("mine")
    te_before = sorted(f.name for f in (cache / "te").iterdir())

    def name_of(img: Path) -> str:
        from trainer_bridge.data import content_hash

        return f"{content_hash(img)}_{vid}_64x64.safetensors"

    gone, repainted = name_of(ds / "p0.png"), name_of(ds / "p1.png")
    assert {gone, repainted} <= first.keys()
    (ds / "p0.png").unlink()
    (ds / "p0.txt").unlink()
    picture(ds / "p1.png", 64, 64, 9)  # the same name, other pixels
    assert run(app, ["scan", str(ds)]).exit_code == 0

    t = train()
    assert (t["latents_encoded"], t["latents_cached"], t["latents_pruned"]) == (1, 2, 2), t
    second = latents()
    assert gone not in second and repainted not in second and name_of(ds / "p1.png") in second
    kept = {n: b for n, b in first.items() if n not in (gone, repainted)}
    assert kept.items() <= second.items()  # the unchanged images' files, untouched
    assert other.name in second and odd.name in second and (cache / "notes.txt").read_text() == "mine"
    assert len(second) == 3 + 2  # this run's three images, plus the two files that are not its own
    te_after = sorted(f.name for f in (cache / "te").iterdir())  # the te cache prunes its own: p0's caption
    assert t["te_pruned"] == 1 and len(te_after) == len(te_before) - 1 and set(te_after) <= set(te_before)


def test_summary_table_says_how_many_stale_cache_files_went():
    from rich.console import Console

    from curate.commands.train import summary_table

    t = {"latent_cache_s": 0.5, "latents_encoded": 1, "latents_cached": 2, "latents_pruned": 2,
         "te_cache_s": 0.1, "te_encoded": 0, "te_cached": 3, "te_pruned": 0}  # fmt: skip
    con = Console(width=200, record=True)
    con.print(summary_table(t))
    text = con.export_text()
    assert "0.5 s (1 images encoded, 2 from the cache, 2 stale removed)" in text
    assert "0.1 s (0 captions encoded, 3 from the cache)" in text  # nothing removed: not mentioned


def test_lora_info_shows_what_each_subset_trained_with(tmp_path, sd15_dir):  # noqa: F811
    """a tiny run on the two concept folders (shuffled): lora-info lists each subset's repeats, keep_tokens,
    shuffle and class token, in the table and in --json."""
    ds = tmp_path / "ds"
    two_concepts(ds)
    out = tmp_path / "out"
    sets = [*TINY, "batch_size=1", "max_steps=2", "resolution=64", "shuffle_caption=true"]
    r = run(app, ["train", str(ds), "--base", str(sd15_dir), "--output-dir", str(out),
                  *(a for s in sets for a in ("--set", s))])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = run(app, ["lora-info", str(out / "lora.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    got = {s["image_dir"]: s for s in info["subsets"]}
    assert {k: (s["img_count"], s["num_repeats"], s["keep_tokens"], s["shuffle_caption"], s["class_tokens"],
                s["is_reg"]) for k, s in got.items()} == {
        "10_mychar": (2, 10, 1, True, "mychar", False),
        "5_otherchar": (3, 5, 0, True, "otherchar", False),
    }  # fmt: skip
    assert info["problems"] == []
    r = run(app, ["lora-info", str(out / "lora.safetensors")])
    assert r.exit_code == 0, r.output
    rows = [
        [c.strip() for c in line.split("│")[1:-1]] for line in r.output.splitlines() if line.count("│") == 8
    ]
    assert sorted(rows) == [  # no regularization subset: no reg column
        ["10_mychar", "2", "10", "1", "yes", "no", "mychar"],
        ["5_otherchar", "3", "5", "0", "yes", "no", "otherchar"],
    ], r.output
