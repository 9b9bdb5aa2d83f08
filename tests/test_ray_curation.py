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


def test_cli_dedupe_engine_ray_and_bad_address(planted_pair, local_ray):
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
