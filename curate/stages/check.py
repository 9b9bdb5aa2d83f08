"""`curate check`: every rule the dataset currently violates, for pre-commit hooks and CI.

Rules are functions (manifest, config) -> violations, registered by name, so later stages
(captions, splits) add their own without touching this file's callers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import Config
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
def _duplicates(m: Manifest, cfg: Config) -> list[Violation]:
    method = cfg.dedupe.method if cfg.dedupe.method in ("auto", "phash", "dhash", "hash") else "auto"
    from dataclasses import replace

    groups, _, _ = find_duplicates(m, replace(cfg.dedupe, method=method))
    out = []
    kept = _kept_by_hand(m)
    for g in groups:
        for p in g.members[1:]:
            if p in kept:
                continue
            out.append(Violation(p, "duplicate", f"{g.method} duplicate of {g.keeper}"))
    return out


@rule("split")
def _split(m: Manifest, cfg: Config) -> list[Violation]:
    from .split import split_violations

    return [Violation(paths[0], "split-leak", detail) for paths, detail in split_violations(m)]


@rule("captions")
def _captions(m: Manifest, cfg: Config) -> list[Violation]:
    from .captions import check_captions  # inactive until captions exist or a trigger is configured

    return check_captions(m, cfg)


def check(manifest: Manifest, cfg: Config, rules: list[str] | None = None) -> list[Violation]:
    """Evaluate the named rules (default: all) against the manifest's current state."""
    names = rules or list(RULES)
    out: list[Violation] = []
    for name in names:
        out += RULES[name](manifest, cfg)
    return sorted(out, key=lambda v: (v.path, v.rule))
