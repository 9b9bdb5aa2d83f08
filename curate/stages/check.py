"""`curate check`: every rule the dataset currently violates, for pre-commit hooks and CI.

Rules are functions (manifest, config) -> violations, registered by name, so later stages
(captions, splits) add their own without touching this file's callers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import CurateError
from ..manifest import Manifest
from .dedupe import find_duplicates
from .filter import reasons_for


@dataclass(frozen=True)
class Violation:
    path: str
    rule: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


Rule = Callable[[Manifest, Config], list[Violation]]
Only = set[str] | None  # the files a check judges (None: all); `curate check --git`: what git tracks
RULES: dict[str, Rule] = {}


def rule(name: str) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        RULES[name] = fn
        return fn

    return deco


@rule("unreadable")
def _unreadable(m: Manifest, cfg: Config) -> list[Violation]:
    out = [Violation(r["path"], r["error"], r["error_detail"] or "") for r in m.file_errors()]
    for rec in m.images(include_errors=True):
        if rec.error:
            out += [Violation(p, rec.error, rec.error_detail or "") for p in rec.paths]
    return out


def _kept_by_hand(m: Manifest) -> set[str]:
    """Files `curate keep` kept: the quality and duplicate rules let them pass, as filter and dedupe do."""
    return {p for p, (decision, _) in m.decisions().items() if decision == "keep"}


@rule("quality")
def _quality(m: Manifest, cfg: Config) -> list[Violation]:
    out = []
    kept = _kept_by_hand(m)
    for rec in m.images(include_errors=False):
        for reason, detail in reasons_for(rec, cfg.filter, config_fix=True):
            out += [Violation(p, reason, detail) for p in rec.paths if p not in kept]
    return out


@rule("duplicates")
def _duplicates(m: Manifest, cfg: Config, only: Only = None) -> list[Violation]:
    method = cfg.dedupe.method if cfg.dedupe.method in ("auto", "phash", "dhash", "hash") else "auto"
    from dataclasses import replace

    groups, _, _ = find_duplicates(m, replace(cfg.dedupe, method=method))
    out = []
    kept = _kept_by_hand(m)
    for g in groups:
        members = [p for p in g.members if only is None or p in only]  # a copy git ignores is no duplicate
        for p in members[1:]:
            if p in kept:
                continue
            out.append(Violation(p, "duplicate", f"{g.method} duplicate of {members[0]}"))
    return out


@rule("split")
def _split(m: Manifest, cfg: Config) -> list[Violation]:
    from .split import split_violations

    return [Violation(paths[0], "split-leak", detail) for paths, detail in split_violations(m)]


@rule("captions")
def _captions(m: Manifest, cfg: Config) -> list[Violation]:
    from .captions import check_captions  # inactive until captions exist or a trigger is configured

    return check_captions(m, cfg)


@rule("orphan-captions")
def _orphan_captions(m: Manifest, cfg: Config) -> list[Violation]:
    """Captions left without their image: a metadata.jsonl line naming a file that is not there (HF
    imagefolder fails on it when the folder is loaded) and the .txt / .caption of an image deleted since
    it was scanned."""
    from ..io import IMAGE_EXTENSIONS, STATE_DIR
    from .quarantine import _file_name

    root = m.root
    out: list[Violation] = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not (dirpath == str(root) and d == STATE_DIR)]
        if "metadata.jsonl" not in files:
            continue
        meta = Path(dirpath, "metadata.jsonl")
        rel = meta.relative_to(root).as_posix()
        try:
            lines = meta.read_bytes().splitlines()
        except OSError:
            continue
        for n, line in enumerate(lines, 1):
            name = _file_name(line)
            if name is not None and not os.path.lexists(Path(dirpath, name)):
                out.append(Violation(rel, "caption-without-image", f"line {n} names {name}, which is not there "
                                     "(loading the folder with datasets fails on it): remove the line or put the "
                                     "image back"))  # fmt: skip
    gone = [r[0] for r in m.conn.execute("SELECT path FROM files WHERE status='missing'")]
    for img in gone:
        stem = os.path.splitext(img)[0]
        folder = (root / img).parent
        try:
            others = {e.name for e in os.scandir(folder)}
        except OSError:
            continue
        if any(os.path.splitext(o)[0] == Path(stem).name and os.path.splitext(o)[1].lower() in IMAGE_EXTENSIONS
               for o in others):  # fmt: skip
            continue  # a.jpg is still there beside a deleted a.png: the caption is a.jpg's
        for ext in (".txt", ".caption"):
            if Path(stem).name + ext in others:
                out.append(Violation(stem + ext, "caption-without-image", f"its image {img} is gone since the "
                                     "scan: delete the caption or put the image back"))  # fmt: skip
    return out


def check(
    manifest: Manifest, cfg: Config, rules: list[str] | None = None, only: Only = None
) -> list[Violation]:
    """Evaluate the named rules (default: all) against the manifest's current state; with ``only``, on
    those files alone (duplicates are judged among them)."""
    names = rules or list(RULES)
    out: list[Violation] = []
    for name in names:
        fn = RULES[name]
        out += fn(manifest, cfg, only) if fn is _duplicates else fn(manifest, cfg)  # type: ignore[call-arg]
    if only is not None:
        out = [v for v in out if v.path in only]
    return sorted(out, key=lambda v: (v.path, v.rule))


def git_tracked(root: Path) -> set[str]:
    """Files git tracks under ``root`` (the index: staged files included), relative to ``root``."""
    import subprocess

    try:
        res = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached"], capture_output=True, check=False
        )
    except OSError:
        raise CurateError("--git needs git, which is not installed; leave --git out") from None
    if res.returncode != 0:
        raise CurateError(f"{root} is not in a git work tree; run `git init` there or leave --git out")
    return {os.fsdecode(p) for p in res.stdout.split(b"\0") if p}
