"""The README's pre-commit example is one a user can paste: parsed here, checked against .pre-commit-hooks.yaml,
and run by the real pre-commit tool in a temporary dataset repository."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.images import textured

ROOT = Path(__file__).resolve().parents[1]


def _precommit_blocks() -> list[dict]:
    """The YAML blocks of the README's "## Pre-commit" section, parsed."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Pre-commit\n", 1)[1].split("\n## ", 1)[0]
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S)]


def _local_hook() -> dict:
    local = _precommit_blocks()[0]["repos"][0]
    assert local["repo"] == "local"
    (hook,) = local["hooks"]
    return hook


def test_readme_local_hook_runs_curate_check_on_git_files():
    hook = _local_hook()
    assert shlex.split(hook["entry"]) + [str(a) for a in hook["args"]] == ["curate", "check", ".", "--git"]
    assert hook["language"] == "system"  # the curate the user installed, nothing installed by pre-commit
    assert hook["pass_filenames"] is False  # `curate check` takes the dataset folder, not file names
    for key in ("id", "name", "entry", "language"):  # what pre-commit requires of a local hook
        assert hook[key]


def test_hook_manifest_is_valid_and_matches_the_readme():
    manifest = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
    assert isinstance(manifest, list)
    by_id = {h["id"]: h for h in manifest}
    remote = by_id["curate-check"]
    for key in ("id", "name", "entry", "language"):
        assert isinstance(remote[key], str) and remote[key]
    assert remote["language"] == "python"  # pre-commit pip-installs the clone into the hook's environment
    local = _local_hook()
    for key in ("id", "entry", "pass_filenames", "always_run"):
        assert remote[key] == local[key], key
    assert [str(a) for a in remote["args"]] == [str(a) for a in local["args"]]
    # the README's remote example names a hook the manifest defines, and no made-up tag as its rev
    remote_block = _precommit_blocks()[1]["repos"][0]
    assert [h["id"] for h in remote_block["hooks"]] == ["curate-check"]
    assert not re.match(r"v?\d+\.\d+", str(remote_block["rev"]))


@pytest.mark.slow
def test_readme_local_hook_with_real_precommit(tmp_path: Path):
    if shutil.which("pre-commit") is None or shutil.which("git") is None:
        pytest.fail("pre-commit and git are part of the dev extra; install with pip install -e '.[dev]'")
    # `curate` on the PATH is this checkout, as `pip install` would put it there
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "curate"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m curate "$@"\n')
    shim.chmod(0o755)
    repo = tmp_path / "dataset"
    repo.mkdir()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "PRE_COMMIT_HOME": str(tmp_path / "pc-home"),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Pre-commit\n", 1)[1]
    (repo / ".pre-commit-config.yaml").write_text(re.search(r"```yaml\n(.*?)```", section, re.S)[1])
    (repo / ".gitignore").write_text(".curate/\n")
    for s in (1, 2):
        textured(640, 640, seed=s).save(repo / f"img{s}.png")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=repo, capture_output=True, text=True, env=env, timeout=600)

    run("git", "init", "-q")
    run("git", "add", "-A")
    ok = run("pre-commit", "run", "--all-files", "--verbose")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "curate check (dataset rules)" in ok.stdout and "Passed" in ok.stdout
    textured(120, 90, seed=3).save(repo / "tiny.png")
    run("git", "add", "tiny.png")
    bad = run("pre-commit", "run", "--all-files", "--verbose")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "Failed" in bad.stdout and "too-small" in bad.stdout and "tiny.png" in bad.stdout
