"""dedupe and tag with --engine ray give the same groups, evidence and score cache as the local engine."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _rows(root: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(root / ".curate" / "manifest.db")
    try:
        return sorted(conn.execute(sql).fetchall(), key=repr)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def planted_pair(tmp_path_factory):
    """A scanned planted set (two photos, every scraper transform of each) and an identical copy of it,
    with a third of the stored features dropped in both so dedupe has to compute them again."""
    pytest.importorskip("skimage")
    pytest.importorskip("cv2")
    from curate import Dataset
    from curate.eval import build_set, source_photos

    photos = source_photos()
    base = tmp_path_factory.mktemp("raydedupe")
    a = base / "a"
    build_set(a, sources={k: photos[k] for k in ("astronaut", "chelsea")}, n_negative_sources=0, max_side=320)
    with Dataset.open(a) as ds:
        ds.scan()
        conn = ds.manifest.conn
        shas = sorted(r[0] for r in conn.execute("SELECT sha256 FROM dedupe_features"))
        with ds.manifest.transaction():
            conn.executemany("DELETE FROM dedupe_features WHERE sha256=?", [(s,) for s in shas[::3]])
    b = base / "b"
    shutil.copytree(a, b, symlinks=True)
    return a, b, len(shas)


def test_ray_dedupe_equals_local(planted_pair, local_ray):
    from curate import Dataset
    from curate.engine import ray_engine

    a, b, n_images = planted_pair
    with Dataset.open(a) as ds:
        ra = ds.dedupe()
    calls = []
    mapper = ray_engine.task_mapper(chunk=8)

    def counting(fn, it):
        for res in mapper(fn, it):
            calls.append(fn.__name__)
            yield res

    counting.chunk = 8
    from curate.stages import dedupe as dedupe_stage

    with Dataset.open(b) as ds:
        cfg = ds.config.dedupe
        rb = dedupe_stage.dedupe(ds.manifest, cfg, mapper=counting)
    sa, sb = ra.stats, rb.stats
    assert sa["features_computed"] == sb["features_computed"] == len(range(0, n_images, 3))
    assert sa["pairs_verified"] == sb["pairs_verified"] >= 8
    assert sa["pairs_accepted"] == sb["pairs_accepted"] >= 4
    # every verification chunk and feature chunk went through Ray tasks
    assert calls.count("verify_rows") == -(-sb["pairs_verified"] // 8)
    assert calls.count("compute_files") == -(-sb["features_computed"] // 16)
    ga = [g.as_dict() for g in ra.groups]
    gb = [g.as_dict() for g in rb.groups]
    assert len(ga) >= 2 and any(len(g["members"]) >= 10 for g in ga)
    assert ga == gb  # same groups, keepers, explanations and link evidence (inliers, NCC, ...)
    assert any("RANSAC inliers" in line for g in gb for line in g["explain"])
    for sql in (
        "SELECT sha256, dup_group, dup_keeper, dup_explain FROM images",
        "SELECT path, stage, reason, detail FROM rejects",
        "SELECT sha256, version, thumb, codes, orb, signals FROM dedupe_features",
    ):
        assert _rows(a, sql) == _rows(b, sql), sql


def test_cli_dedupe_engine_ray_and_unknown_engine(planted_pair, local_ray):
    from typer.testing import CliRunner

    from curate.cli import app

    a, b, _ = planted_pair
    runner = CliRunner()
    r = runner.invoke(app, ["dedupe", str(b), "--engine", "ray", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)["dedupe"]
    ref = json.loads(runner.invoke(app, ["dedupe", str(a), "--json"]).stdout)["dedupe"]
    assert out["groups"] == ref["groups"] and out["rejected"] == ref["rejected"] > 0
    r = runner.invoke(app, ["dedupe", str(b), "--engine", "spark"])
    assert r.exit_code != 0 and "unknown engine 'spark'" in r.output


def _tag_set(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    from curate import Dataset

    root.mkdir()
    rng = np.random.default_rng(3)
    for i in range(11):
        w, h = 20 + 7 * i, 60 - 3 * i
        base = rng.uniform(0, 255, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
        Image.fromarray(base).resize((w, h), Image.BILINEAR).save(root / f"img{i:02d}.png")
    with Dataset.open(root) as ds:
        ds.scan()
    (root / "img05.png").unlink()  # gone after the scan: both engines report it as unreadable
    return root


def _tag_state(root: Path) -> dict:
    return {
        "scores": [r[:3] for r in _rows(root, "SELECT sha256, model, scores, at FROM tag_scores")],
        "labels": _rows(root, "SELECT model, name, category FROM tag_labels"),
        "captions": _rows(root, "SELECT sha256, caption, tags FROM images"),
        "files": {p.name: p.read_text() for p in sorted(root.glob("*.txt"))},
    }


@pytest.fixture()
def tag_pair(tmp_path):
    import tests.tiny_wd14 as tiny_wd14

    model = tiny_wd14.build(tmp_path / "tagger")
    return _tag_set(tmp_path / "a"), _tag_set(tmp_path / "b"), str(model)


def test_ray_tag_equals_local(tag_pair, local_ray):
    from curate import Dataset

    a, b, model = tag_pair
    opts = dict(model=model, device="cpu", batch_size=3, general=0.35, trigger=("zzt",))
    with Dataset.open(a) as ds:
        ra = ds.tag(**opts).run
    with Dataset.open(b) as ds:
        rb = ds.tag(engine="ray", **opts).run
    assert (ra.inferred, ra.cached) == (rb.inferred, rb.cached) == (10, 0)
    assert ra.failed and [p for p, _ in ra.failed] == [p for p, _ in rb.failed] == ["img05.png"]
    assert rb.decode == "ray actors x 1" and rb.backend == "onnx"
    sa, sb = _tag_state(a), _tag_state(b)
    assert len(sa["scores"]) == 10 and len(sa["files"]) == 10
    assert all(t.startswith("zzt, ") for t in sa["files"].values())
    assert sa == sb  # the same score cache, labels, tags and caption files
    with Dataset.open(b) as ds:  # a rerun on Ray takes every score from the cache
        again = ds.tag(engine="ray", **opts).run
    assert (again.inferred, again.cached, [p for p, _ in again.failed]) == (0, 10, ["img05.png"])


def test_interrupted_ray_tag_keeps_committed_batches(tag_pair, local_ray):
    from curate import Dataset
    from curate.engine import ray_engine
    from curate.stages.tag import tag_config, tag_images

    a, b, model = tag_pair
    real = ray_engine.tag_runner()

    class Stop:
        def __init__(self, cfg):
            self.inner = real(cfg)
            self.info, self.actors = self.inner.info, self.inner.actors

        def map(self, paths, batch_size):
            for n, out in enumerate(self.inner.map(paths, batch_size)):
                if n == 2:
                    raise KeyboardInterrupt  # as Ctrl-C / a killed driver after two batches came back
                yield out

        def close(self):
            self.inner.close()

    with Dataset.open(b) as ds:
        cfg = tag_config(ds, model=model, device="cpu", batch_size=3)
        with pytest.raises(KeyboardInterrupt):
            tag_images(ds.manifest, cfg, runner=Stop)
        # two committed batches of three; the second holds the missing img05.png
        assert len(_rows(b, "SELECT sha256 FROM tag_scores")) == 5
        rest = tag_images(ds.manifest, cfg, runner=ray_engine.tag_runner())
    assert (rest.inferred, rest.cached) == (10 - 5, 5)
    with Dataset.open(a) as ds:
        tag_images(ds.manifest, cfg)
    assert _tag_state(a)["scores"] == _tag_state(b)["scores"]


def test_cli_tag_engine_ray_and_errors(tag_pair, local_ray):
    from typer.testing import CliRunner

    from curate.cli import app

    _, b, model = tag_pair
    runner = CliRunner()
    r = runner.invoke(app, ["tag", str(b), "--model", model, "--engine", "ray", "--json"])
    assert r.exit_code == 0, r.output
    run = json.loads(r.stdout)["run"]
    assert run["inferred"] == 10 and run["decode"] == "ray actors x 1"
    assert run["decode_why"] == "--engine ray: the actors decode on their CPUs"  # was "" (printed as "()")
    r = runner.invoke(app, ["tag", str(b), "--model", model, "--engine", "ray", "--num-gpus", "2", "--force"])
    assert r.exit_code != 0 and "the Ray cluster has 0 GPU(s)" in r.output
    r = runner.invoke(app, ["tag", str(b), "--model", str(b / "nope"), "--engine", "ray", "--force"])
    assert r.exit_code != 0 and "Traceback" not in r.output and "nope" in r.output, r.output


def test_unreachable_address_one_line(tag_pair):
    import os
    import subprocess
    import sys

    _, b, model = tag_pair
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    for args in (["tag", str(b), "--model", model], ["dedupe", str(b)]):
        out = subprocess.run(
            [sys.executable, "-m", "curate", *args, "--engine", "ray", "--address", "127.0.0.1:1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        text = out.stdout + out.stderr
        assert out.returncode != 0 and "cannot connect to Ray at 127.0.0.1:1" in text, text
        assert "Traceback" not in text


def test_ray_clip_embeddings_equal_local(tmp_path, local_ray, monkeypatch):
    pytest.importorskip("open_clip")
    from curate import Dataset
    from curate.stages import embed
    from tests.clip_helpers import make_tiny_model
    from tests.test_clip import FLIP_THRESHOLD, make_set

    tiny = make_tiny_model(tmp_path / "tiny")
    opts = {"model": str(tiny), "device": "cpu", "workers": 0, "batch_size": 4, "threshold": FLIP_THRESHOLD}
    out = {}
    for name, engine in (("a", "local"), ("b", "ray")):
        with Dataset.open(make_set(tmp_path / name)) as ds:
            ds.scan()
            if engine == "ray":  # this process must not encode: the actor does
                monkeypatch.setattr(embed, "encode_paths", lambda *a, **k: pytest.fail("encoded locally"))
            res = ds.dedupe(method="clip", clip=opts, engine=engine)
        out[name] = (
            [g.as_dict() for g in res.groups],
            _rows(tmp_path / name, "SELECT sha256, model, pretrained, dim, vec FROM clip_embeddings"),
        )
    groups, vecs = out["a"]
    assert len(vecs) == 10 and sorted(map(sorted, (g["members"] for g in groups))) == [
        ["img0.png", "img0_flip.png"],
        ["img1.png", "img1_small.jpg"],
    ]
    assert out["a"] == out["b"]  # same groups and bit-identical cached embeddings
