"""What the environment does to a command: kills and Ctrl-C, a second curate, damaged manifests, read-only and
full disks. Each answer is one line and a non-zero exit, never a traceback; nothing is left half-done."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curate import faults
from curate import manifest as manifest_mod
from curate.cli import app
from curate.dataset import Dataset
from curate.errors import CurateError
from tests.images import textured

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# -- helpers -------------------------------------------------------------------------------------------
def make_dataset(parent: Path, n: int, *, side: int = 64, workers: int | None = None) -> Path:
    """n distinct small PNGs in a folder whose name is unique on this machine (to find its processes)."""
    root = parent / f"ds-{uuid.uuid4().hex[:12]}"
    root.mkdir(parents=True)
    for i in range(n):
        textured(side, side, seed=i).save(root / f"{i:04d}.png", compress_level=1)
    if workers:
        (root / "curate.toml").write_text(f"[scan]\nworkers = {workers}\n")
    return root


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
    e.pop("CURATE_WAIT", None)
    return e


def curate(*args: str, timeout: float = 60, extra_env: dict[str, str] | None = None):
    r = subprocess.run(
        [sys.executable, "-m", "curate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env(), **(extra_env or {})},
    )
    assert "Traceback" not in r.stderr, r.stderr
    return r


def popen(*args: str, extra_env: dict[str, str] | None = None, session: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "curate", *args],
        stdout=subprocess.PIPE,  # like `curate scan D | tee log`: the pipe must close when curate dies
        stderr=subprocess.PIPE,
        text=True,
        env={**env(), **(extra_env or {})},
        start_new_session=session,
    )


def processes_with(marker: str) -> list[tuple[int, int]]:
    """(pid, ppid) of every live process whose command line contains ``marker``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{name}/cmdline").read_bytes()
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        if marker.encode() in cmd:
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if state != "Z":
                out.append((int(name), int(ppid)))
    return out


def wait_for(cond, timeout: float = 30.0, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return False


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def invoke(*args: str):
    r = CliRunner().invoke(app, list(args))
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    return r


def manifest_consistent(root: Path, n: int) -> None:
    db = sqlite3.connect(root / ".curate" / "manifest.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM files WHERE status='ok'").fetchone()[0] == n
        orphans = db.execute(
            "SELECT count(*) FROM files f LEFT JOIN images i ON i.sha256=f.sha256 WHERE i.sha256 IS NULL"
        ).fetchone()[0]
        assert orphans == 0
        assert db.execute("SELECT count(*) FROM images WHERE error IS NULL").fetchone()[0] == n
    finally:
        db.close()


@pytest.fixture
def mounts():
    """Mount points made by a test, unmounted afterwards (innermost first)."""
    made: list[Path] = []
    yield made
    for m in reversed(made):
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def try_mount(args: list[str]) -> bool:
    return IS_ROOT and subprocess.run(["mount", *args], capture_output=True).returncode == 0


def read_only_view(src: Path, dst: Path, mounts: list[Path]) -> Path:
    """A read-only bind mount of ``src`` at ``dst`` (root only; chmod does not stop root)."""
    dst.mkdir(parents=True)
    if not try_mount(["--bind", str(src), str(dst)]):
        pytest.skip(
            "needs root and mount: chmod -R a-w does not stop root, so only a ro bind mount tests this"
        )
    mounts.append(dst)
    if not try_mount(["-o", "remount,ro,bind", str(dst)]):
        pytest.skip("mount -o remount,ro,bind is not permitted here")
    return dst


# -- processes and signals -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["kill-9", "term", "int"]
)
def test_killed_scan_leaves_no_workers_and_resumes(tmp_path, sig):
    n = 120 if sig == signal.SIGINT else 240  # Ctrl-C: exit code and workers only, no rerun
    root = make_dataset(tmp_path, n, side=40, workers=3)
    p = popen("scan", str(root), session=True)
    try:
        # kill once the pool runs and some batches are committed
        assert wait_for(lambda: sum(pp == p.pid for _, pp in processes_with(str(root))) >= 2), "no pool"
        db = root / ".curate" / "manifest.db"

        def committed() -> int:
            with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(db, timeout=5)) as c:
                return c.execute("SELECT count(*) FROM files").fetchone()[0]
            return 0

        assert wait_for(lambda: committed() >= 64, step=0.02), "no batch committed"
        if sig == signal.SIGINT:
            os.killpg(p.pid, sig)  # a terminal's Ctrl-C reaches the workers too
        else:
            os.kill(p.pid, sig)
        out, err = p.communicate(timeout=30)  # returns only when no worker holds the pipes
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert "Traceback" not in err
    assert p.returncode == {signal.SIGKILL: -9, signal.SIGTERM: 143, signal.SIGINT: 130}[sig], err
    if sig != signal.SIGKILL:
        assert "interrupted" in err
    assert wait_for(lambda: not processes_with(str(root)), timeout=5), processes_with(str(root))

    if sig == signal.SIGINT:
        return
    with Dataset.open(root) as ds:  # the rerun completes what the killed one left
        d = ds.scan().as_dict()
    assert d["total_files"] == n and d["unchanged"] >= 64 and d["decoded"] + d["unchanged"] == n
    manifest_consistent(root, n)


# Put on PYTHONPATH as sitecustomize: the first heavy import (typer, rich or click) that `curate.cli` makes, after
# `python -m curate` has armed its handlers, writes the marker and stalls, so the test's Ctrl-C lands inside the
# heavy imports every time, whatever the machine's load (no sleep to guess).
_STALL_IN_HEAVY_IMPORT = """
import os, sys, time


class _StallFinder:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("typer", "rich", "click") and "curate.cli" in sys.modules:
            sys.meta_path.remove(self)
            sys.stderr.write("stalled importing " + name + "\\n")
            with open(os.environ["CURATE_TEST_STALL_MARKER"], "w") as f:
                f.write(name)
            time.sleep(120)  # Ctrl-C (KeyboardInterrupt) ends it, inside `from .cli import main`
        return None


sys.meta_path.insert(0, _StallFinder())
"""


def test_ctrl_c_while_starting_exits_130_quietly(tmp_path):
    """Ctrl-C during the heavy imports of `python -m curate scan` (typer, rich: before any command runs) exits 130
    with the one interrupted line, no traceback."""
    root = make_dataset(tmp_path, 4, side=48)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_STALL_IN_HEAVY_IMPORT)
    marker = tmp_path / "stalled"
    p = subprocess.Popen([sys.executable, "-m", "curate", "scan", str(root)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env={**env(), "PYTHONPATH": f"{hook}{os.pathsep}{REPO}",
                              "CURATE_TEST_STALL_MARKER": str(marker)})  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists(), f"curate never reached its heavy imports (exit {p.poll()})"
        stalled_in = marker.read_text()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert stalled_in.partition(".")[0] in ("typer", "rich", "click"), stalled_in
    assert f"stalled importing {stalled_in}" in err, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == faults.interrupted_message(), err
    assert not (root / ".curate").exists()  # no command ran: nothing was written


def test_ctrl_c_and_sigterm_in_any_command_exit_130_and_143(planted, monkeypatch):
    assert invoke("scan", str(planted)).exit_code == 0
    for exc, code in ((KeyboardInterrupt(), 130), (faults.Terminated(), 143)):

        def boom(*a, _exc=exc, **k):
            raise _exc

        monkeypatch.setattr(Dataset, "filter", boom)
        r = invoke("filter", str(planted))
        assert r.exit_code == code and "interrupted" in r.stderr


def test_manifest_deleted_mid_scan_is_an_error(tmp_path):
    root = make_dataset(tmp_path, 200, side=48, workers=2)
    ds = Dataset.open(root)
    db = ds.manifest.path

    def progress(done: int, total: int) -> None:
        if done == 100:
            for f in db.parent.glob("manifest.db*"):
                if not f.name.endswith(".lock"):
                    f.unlink()

    with pytest.raises(CurateError, match="deleted or replaced"):
        ds.scan(progress=progress)
    ds.close()
    assert not db.exists()


# -- concurrency ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def hold_writer_lock(root: Path):
    path = root / ".curate" / "manifest.db.lock"
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        os.close(fd)


@pytest.mark.slow
def test_second_writer_is_told_busy_readers_are_not_blocked_and_wait_waits(tmp_path):
    n = 30
    root = make_dataset(tmp_path, n, side=48)
    assert invoke("scan", str(root)).exit_code == 0
    (root / "new.png").write_bytes((root / "0000.png").read_bytes())
    with hold_writer_lock(root):  # as another curate process would (flock is per open file, so this works)
        for cmd in (["scan"], ["filter"], ["dedupe"], ["split"], ["tags"]):
            r = invoke(*cmd, str(root))
            assert r.exit_code == manifest_mod.BUSY_EXIT, r.output
            line = one_error_line(r.stderr)
            assert f"busy: another curate (pid {os.getpid()}) is writing this dataset" in line
            assert "--wait" in line
        for cmd, ok in ((["status", "--json"], 0), (["report"], 0), (["check", "--no-scan"], 1)):
            r = invoke(*cmd, str(root))
            assert r.exit_code == ok and "busy" not in r.stderr, r.output
        waiting = popen("--wait", "scan", str(root), "--json")
        waiting_env = popen("filter", str(root), extra_env={"CURATE_WAIT": "1"})
        for p in (waiting, waiting_env):  # the first thing each prints is that it waits for us
            assert p.stderr.readline().startswith(f"waiting for curate (pid {os.getpid()})")
        assert waiting.poll() is None and waiting_env.poll() is None
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0 and "Traceback" not in err, err
    import json

    d = json.loads(out)
    assert d["total_files"] == n + 1 and d["scanned"] <= 1  # only the new file was read
    waiting_env.communicate(timeout=60)
    assert waiting_env.returncode == 0


@pytest.mark.slow
def test_two_concurrent_scans_decode_each_image_once(tmp_path):
    import json

    n = 80
    root = make_dataset(tmp_path, n, side=48)
    a = popen("--wait", "scan", str(root), "--json")
    b = popen("--wait", "scan", str(root), "--json")
    (oa, ea), (ob, eb) = a.communicate(timeout=60), b.communicate(timeout=60)
    assert a.returncode == 0 and b.returncode == 0, ea + eb
    assert "Traceback" not in ea + eb
    da, db = json.loads(oa), json.loads(ob)
    assert da["decoded"] + db["decoded"] == n
    assert sorted([da["unchanged"], db["unchanged"]]) == [0, n]


def test_sqlite_busy_from_another_program_is_one_line(planted, monkeypatch):
    assert invoke("scan", str(planted)).exit_code == 0
    other = sqlite3.connect(planted / ".curate" / "manifest.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. the sqlite3 shell holding a write transaction
    real = sqlite3.connect
    monkeypatch.setattr(manifest_mod.sqlite3, "connect", lambda *a, **k: real(*a, **{**k, "timeout": 0.2}))
    try:
        r = invoke("filter", str(planted))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert r.exit_code == 75
    assert "busy: another program keeps the manifest" in one_error_line(r.stderr)


# -- damaged manifests ---------------------------------------------------------------------------------
def _corrupt(db: Path, kind: str) -> None:
    data = db.read_bytes()
    if kind == "truncated":
        data = data[: len(data) // 2 + 123]
    elif kind == "garbled":
        data = data[:4096] + bytes((i * 131 + 7) % 256 for i in range(len(data) - 4096))
    elif kind == "bad-header":
        data = b"definitely not a db" + data[19:]
    elif kind == "zero-byte":
        data = b""
    db.write_bytes(data)


@pytest.fixture(scope="module")
def scanned_template(tmp_path_factory) -> Path:
    root = make_dataset(tmp_path_factory.mktemp("tpl"), 12, side=300)
    with Dataset.open(root) as ds:
        ds.scan()
        ds.filter()
    return root


@pytest.mark.parametrize("kind", ["truncated", "garbled", "bad-header", "zero-byte"])
def test_damaged_manifest_is_set_aside_with_one_line_and_rebuilt(tmp_path, scanned_template, kind):
    commands = [["status"], ["filter"], ["dedupe"], ["report"], ["export", str(tmp_path / "out")], ["scan"]]
    for i, cmd in enumerate(commands):
        root = tmp_path / f"{kind}-{i}"
        shutil.copytree(scanned_template, root)
        db = root / ".curate" / "manifest.db"
        _corrupt(db, kind)
        damaged = db.read_bytes()
        r = invoke(cmd[0], str(root), *cmd[1:])
        assert r.exit_code != 0
        line = one_error_line(r.stderr)
        assert "is damaged" in line and "--rebuild" in line, line
        copies = list(db.parent.glob("manifest.db.corrupt-*"))
        assert len(copies) == 1 and copies[0].read_bytes() == damaged  # kept aside, byte for byte
        assert not db.exists()
        # never silently re-created: the next command points at --rebuild again
        r = invoke("scan", str(root))
        assert r.exit_code != 0 and "--rebuild" in one_error_line(r.stderr)
        assert not db.exists()
        assert not (tmp_path / "out").exists()
    r = invoke("scan", str(root), "--rebuild")
    assert r.exit_code == 0, r.output
    with Dataset.open(root, create=False) as ds:
        assert ds.summary()["files"] == 12
    assert len(list(db.parent.glob("manifest.db.corrupt-*"))) == 1


def test_damage_found_after_open_is_one_line(tmp_path, scanned_template, monkeypatch):
    """Big manifests skip quick_check on open; a bad page met later is still one line, file set aside."""
    root = tmp_path / "ds"
    shutil.copytree(scanned_template, root)
    db = root / ".curate" / "manifest.db"
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    for p in range(2, len(data) // page):  # every page but the schema: a clean header, garbage tables
        data[p * page : (p + 1) * page] = bytes((i * 97 + p) % 256 for i in range(page))
    db.write_bytes(bytes(data))
    monkeypatch.setattr(manifest_mod, "QUICK_CHECK_MAX_BYTES", 0)
    r = invoke("status", str(root))
    assert r.exit_code != 0
    assert "is damaged" in one_error_line(r.stderr)
    assert list(db.parent.glob("manifest.db.corrupt-*")) and not db.exists()


def test_healthy_manifest_rebuild_keeps_the_old_one(tmp_path, scanned_template):
    root = tmp_path / "ds"
    shutil.copytree(scanned_template, root)
    r = invoke("scan", str(root), "--rebuild")
    assert r.exit_code == 0
    assert len(list((root / ".curate").glob("manifest.db.before-rebuild-*"))) == 1


# -- read-only dataset ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_read_only_dataset(tmp_path, scanned_template, mounts):
    src = tmp_path / "src"
    shutil.copytree(scanned_template, src)
    ro = read_only_view(src, tmp_path / "ro", mounts)
    out = tmp_path / "out"
    commands = [
        ["scan"], ["filter"], ["dedupe"], ["check"], ["report"], ["apply"], ["restore"], ["status"],
        ["split"], ["bucket"], ["export", str(out)], ["plan"], ["tags"], ["edit"], ["run"],
    ]  # fmt: skip
    for cmd in commands:
        r = invoke(cmd[0], str(ro), *cmd[1:])
        assert r.exit_code != 0, cmd
        line = one_error_line(r.stderr)
        assert f"dataset folder {ro} is read-only; pass --manifest PATH" in line, (cmd, line)

    m = tmp_path / "state" / "manifest.db"
    for cmd in (["scan"], ["filter", "--min-side", "64"], ["dedupe"], ["split"], ["bucket"], ["status"]):
        r = invoke(cmd[0], str(ro), *cmd[1:], "--manifest", str(m))
        assert r.exit_code == 0, (cmd, r.output)
    r = invoke("report", str(ro), "--manifest", str(m))
    assert r.exit_code == 0 and (m.parent / "report.html").is_file()  # beside the manifest
    r = invoke("export", str(ro), str(out), "--manifest", str(m))
    assert r.exit_code == 0 and len(list(out.rglob("*.png"))) == 12
    import tests.tiny_wd14 as tiny_wd14

    r = invoke("tag", str(ro), "--manifest", str(m), "--model", str(tiny_wd14.build(tmp_path / "tagger")))
    assert r.exit_code != 0  # the model ran; caption files cannot go beside read-only images
    assert "read-only" in one_error_line(r.stderr) and not list(ro.glob("*.txt"))
    with Dataset.open(ro, manifest=m) as ds:
        ds.manifest.set_rejects("manual", {"0000.png": ("test", None)})
    r = invoke("apply", str(ro), "--manifest", str(m))
    assert r.exit_code != 0 and "moved 0" not in r.stdout
    assert "cannot move" in one_error_line(r.stderr)
    assert (ro / "0000.png").is_file()

    r = invoke("scan", str(ro), "--manifest", str(ro / "elsewhere" / "m.db"))
    assert r.exit_code != 0
    assert "cannot write the manifest" in one_error_line(r.stderr)


def test_unwritable_manifest_path_is_one_line(tmp_path, planted):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = invoke("scan", str(planted), "--manifest", str(blocker / "m.db"))
    assert r.exit_code != 0
    assert "cannot write the manifest" in one_error_line(r.stderr)


# -- full disk -----------------------------------------------------------------------------------------
def _fill(folder: Path, leave: int) -> Path:
    st = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


@pytest.mark.slow
def test_full_disk_is_one_line_and_leaves_nothing_complete_looking(tmp_path, mounts):
    fs = tmp_path / "small"
    fs.mkdir()
    if not try_mount(["-t", "tmpfs", "-o", "size=2m", "tmpfs", str(fs)]):
        pytest.skip("needs root and mount for a small tmpfs (the monkeypatched test covers the messages)")
    mounts.append(fs)
    root = make_dataset(fs, 20, side=48)
    filler = _fill(fs, 8192)
    r = invoke("scan", str(root))
    assert r.exit_code != 0
    assert "disk full while writing the manifest" in one_error_line(r.stderr)
    assert not (root / ".curate" / "manifest.db").exists()  # no empty file that would read as damaged
    filler.unlink()
    assert invoke("scan", str(root)).exit_code == 0
    assert invoke("filter", str(root), "--min-side", "16").exit_code == 0

    big = make_dataset(tmp_path, 12, side=400)
    assert invoke("scan", str(big)).exit_code == 0
    filler = _fill(fs, 300_000)  # room for the manifest's WAL, not for the export
    out = fs / "export"
    r = invoke("export", str(big), str(out))
    assert r.exit_code != 0
    line = one_error_line(r.stderr)
    assert line.startswith("error: disk full while writing") and str(fs) in line
    assert not out.exists() and not [p for p in fs.iterdir() if p.name.startswith(".export")]
    filler.unlink()
    filler = _fill(fs, 0)
    r = invoke("report", str(big), "--out", str(fs / "r.html"))
    assert r.exit_code != 0 and "disk full" in one_error_line(r.stderr)
    assert not (fs / "r.html").exists()


def test_enospc_anywhere_is_one_line(planted, monkeypatch, tmp_path):
    """Without root: a disk that fills up during the caption / report writes (monkeypatched)."""
    import curate.io as cio

    real = cio.tempfile.mkstemp

    def full(*a, **k):
        fd, name = real(*a, **k)
        os.close(fd)
        os.unlink(name)
        raise OSError(errno.ENOSPC, "No space left on device", name)

    assert invoke("scan", str(planted)).exit_code == 0
    monkeypatch.setattr(cio.tempfile, "mkstemp", full)
    r = invoke("report", str(planted))
    assert r.exit_code == 1
    line = one_error_line(r.stderr)
    assert (
        line == f"error: disk full while writing {planted / '.curate' / 'report.html'}; free space and rerun"
    )
    assert not (planted / ".curate" / "report.html").exists()

    import tests.tiny_wd14 as tiny_wd14

    monkeypatch.setattr(cio.tempfile, "mkstemp", real)
    tagger = str(tiny_wd14.build(tmp_path / "tagger"))  # before the disk "fills"
    monkeypatch.setattr(cio.tempfile, "mkstemp", full)
    r = invoke("tag", str(planted), "--model", tagger)
    assert r.exit_code == 1
    line = one_error_line(r.stderr)
    assert line.startswith("error: disk full while writing ") and line.endswith(".txt; free space and rerun")
    assert not list(planted.rglob("*.txt")) and not list(planted.rglob("*.tmp"))


def test_only_environment_errors_are_translated():
    assert faults.os_error(OSError(errno.ENOENT, "gone", "x")) is None  # could be a bug: keep the traceback
    assert faults.sqlite_error(sqlite3.OperationalError("no such column: foo")) is None
    assert "disk full" in faults.os_error(OSError(errno.ENOSPC, "full", "f")).message
    assert "read-only" in faults.os_error(OSError(errno.EROFS, "ro", "f")).message
    assert "disk full" in faults.sqlite_error(sqlite3.OperationalError("database or disk is full")).message
    assert (
        "read-only"
        in faults.sqlite_error(sqlite3.OperationalError("attempt to write a readonly database")).message
    )

    def bug():
        return 1 / 0

    with pytest.raises(ZeroDivisionError):
        faults.call_translated(bug)
