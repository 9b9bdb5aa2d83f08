"""--engine ray gives the same manifest as the local pool, and a killed Ray scan resumes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

TABLES = ("images", "files", "dedupe_features", "rejects")
TIME_COLS = {"scanned_at", "seen_at", "updated_at", "created_at", "at", "time"}


def _make(folder: Path, n: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i in range(n):
        arr = rng.integers(0, 255, (80 + i % 5, 120, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:03d}.png")
    Image.fromarray(arr).save(folder / "copy.png")  # an exact copy: one image row, two file rows
    (folder / "broken.jpg").write_bytes(b"not a jpeg")  # a decode error


def _tables(root: Path) -> dict[str, list[tuple]]:
    conn = sqlite3.connect(root / ".curate" / "manifest.db")
    out = {}
    for t in TABLES:
        cols = [r[1] for r in conn.execute(f"PRAGMA table_info({t})") if r[1] not in TIME_COLS]
        if not cols:
            continue
        out[t] = sorted(conn.execute(f"SELECT {','.join(cols)} FROM {t}").fetchall(), key=repr)
    conn.close()
    return out


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_scan_equals_local(tmp_path, local_ray):
    from curate import Dataset

    a, b = tmp_path / "a", tmp_path / "b"
    _make(a, 30)
    _make(b, 30)
    for p in b.iterdir():  # same content and mtimes as folder a
        st = (a / p.name).stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    with Dataset.open(a) as ds:
        ra = ds.scan()
    with Dataset.open(b) as ds:
        rb = ds.scan(engine="ray")
    assert (rb.decoded, rb.scanned, rb.errors) == (ra.decoded, ra.scanned, ra.errors)
    assert ra.decoded == 31 and ra.scanned == 32 and sum(ra.errors.values()) == 1
    ta, tb = _tables(a), _tables(b)
    assert len(ta["images"]) == 31 and len(ta["files"]) == 32
    assert ta == tb
    with Dataset.open(b) as ds:  # a rerun on Ray reads nothing
        again = ds.scan(engine="ray")
    assert again.unchanged == 32 and again.scanned == 0


def test_killed_ray_scan_resumes(tmp_path):
    d, ref = tmp_path / "d", tmp_path / "ref"
    _make(d, 100)
    _make(ref, 100)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    # 0.1 s per file in every Ray worker (tests/slow_site/sitecustomize.py): the first batch of 64 commits
    # seconds before the last, so the kill lands mid-run on any machine.
    slow_env = {
        **env,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "slow_site"), env["PYTHONPATH"]]),
        "CURATE_TEST_SCAN_DELAY": "0.1",
    }
    cmd = [sys.executable, "-m", "curate", "scan", str(d), "--engine", "ray", "--json"]
    proc = subprocess.Popen(
        cmd, env=slow_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    db = d / ".curate" / "manifest.db"
    deadline = time.time() + 60
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        if db.exists():
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                    committed = c.execute("SELECT COUNT(*) FROM files").fetchone()[0]
            except sqlite3.Error:
                continue
            if committed >= 1:
                break
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray processes
    proc.wait()
    assert 1 <= committed < 102, committed  # killed mid-run, not after the end
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    import json

    res = json.loads(out.stdout)
    assert res["unchanged"] >= 1  # committed work was kept, not redone
    subprocess.run(
        [sys.executable, "-m", "curate", "scan", str(ref), "--json"], env=env, capture_output=True, check=True
    )
    tr, td = _tables(ref), _tables(d)
    assert tr["images"] == td["images"]  # every image analysed once, identically
    assert {r[0] for r in tr["files"]} == {r[0] for r in td["files"]}


def test_ray_missing_and_bad_address(tmp_path):
    d = tmp_path / "d"
    _make(d, 3)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-m", "curate", "scan", str(d), "--engine", "ray", "--address", "127.0.0.1:1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "cannot connect to Ray at 127.0.0.1:1" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
