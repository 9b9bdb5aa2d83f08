"""`curate check` as a real pre-commit hook, run by the real pre-commit tool in a temporary git repo."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.images import textured

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_precommit_hook_blocks_bad_images_and_passes_clean(tmp_path: Path):
    if shutil.which("pre-commit") is None or shutil.which("git") is None:
        pytest.fail("pre-commit and git are part of the dev extra; install with pip install -e '.[dev]'")
    repo = tmp_path / "dataset"
    repo.mkdir()
    env = {
        **os.environ,
        "PRE_COMMIT_HOME": str(tmp_path / "pc-home"),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env=env)

    git("init", "-q")
    (repo / ".gitignore").write_text(".curate/\n")
    for s in (1, 2):
        textured(640, 640, seed=s).save(repo / f"img{s}.png")
    git("add", "-A")

    def try_repo() -> subprocess.CompletedProcess:
        # try-repo installs this checkout (uncommitted changes included) the way users get it.
        return subprocess.run(
            ["pre-commit", "try-repo", str(ROOT), "curate-check", "--all-files", "--verbose"],
            cwd=repo,
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )

    ok = try_repo()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Passed" in ok.stdout
    textured(120, 90, seed=3).save(repo / "tiny.png")
    git("add", "tiny.png")
    bad = try_repo()
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "Failed" in bad.stdout
    assert "too-small" in bad.stdout and "tiny.png" in bad.stdout
