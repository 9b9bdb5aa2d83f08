"""Train/validation split, grouped so that no near-duplicate pair ever straddles the two sides.

Groups are the connected components of: dedupe's ``dup_group`` (when dedupe has run) united with every
pair of kept images whose 64-bit pHashes differ in at most ``phash_threshold`` bits (so the split is
safe even before dedupe). Whole groups are then dealt to validation in a seeded random order until the
validation share is as close to the target as group sizes allow; with ``balance_tag`` this is done per
stratum (e.g. per character), so each stratum gets its share.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..errors import CurateError
from ..manifest import ImageRecord, Manifest
from .dedupe import hex_to_u64, near_pairs

PHASH_THRESHOLD = (
    10  # bits of 64; looser than dedupe's default on purpose: a leak is worse than a lost val image
)
NO_STRATUM = "(none)"


def _find(parent: list[int], a: int) -> int:
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    return a


def leak_groups(records: list[ImageRecord], phash_threshold: int = PHASH_THRESHOLD) -> list[int]:
    """Group label per record: records sharing a label must sit on the same side of the split."""
    n = len(records)
    parent = list(range(n))

    def union(a: int, b: int) -> None:
        ra, rb = _find(parent, a), _find(parent, b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first_of_group: dict[int, int] = {}
    for k, r in enumerate(records):
        if r.dup_group is not None:
            union(first_of_group.setdefault(r.dup_group, k), k)
    hashed = [k for k, r in enumerate(records) if r.phash]
    if len(hashed) > 1:
        i, j, _ = near_pairs(hex_to_u64([records[k].phash for k in hashed]), phash_threshold)  # type: ignore[misc]
        for a, b in zip(i.tolist(), j.tolist(), strict=True):
            union(hashed[a], hashed[b])
    return [_find(parent, k) for k in range(n)]


def stratum_of(rec: ImageRecord, balance_tag: str | None) -> str:
    """The stratum an image is balanced in: its first tag equal to one of the comma-separated names in
    ``balance_tag`` or starting with ``name:`` (so ``character`` matches ``character:alice``)."""
    if not balance_tag:
        return NO_STRATUM
    names = [n.strip() for n in balance_tag.split(",") if n.strip()]
    for tag in rec.tags or []:
        for name in names:
            if tag == name or tag.startswith(name + ":"):
                return tag
    return NO_STRATUM


@dataclass
class SplitResult:
    train: int
    val: int
    groups: int
    grouped_images: int  # images that share a group with at least one other image
    seed: int
    target: float
    strata: dict[str, dict[str, int]] = field(default_factory=dict)  # stratum -> {"train": n, "val": n}
    notes: list[str] = field(default_factory=list)
    moved_by_hand: int = 0  # images put on a side in `curate review`, kept there (with their groups)

    @property
    def val_fraction(self) -> float:
        total = self.train + self.val
        return self.val / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "val_fraction": round(self.val_fraction, 4)}


def assign(
    records: list[ImageRecord],
    val: float,
    seed: int = 0,
    balance_tag: str | None = None,
    phash_threshold: int = PHASH_THRESHOLD,
) -> tuple[dict[str, str], list[int]]:
    """sha256 -> 'train' | 'val' for ``records``, plus each record's group label. Pure and deterministic."""
    labels = leak_groups(records, phash_threshold)
    members: dict[int, list[int]] = {}
    for k, g in enumerate(labels):
        members.setdefault(g, []).append(k)
    # A group's stratum is the most common stratum among its members (ties: alphabetical).
    by_stratum: dict[str, list[list[int]]] = {}
    for idx in members.values():
        counts = Counter(stratum_of(records[k], balance_tag) for k in idx)
        s = min(counts, key=lambda x: (-counts[x], x))
        by_stratum.setdefault(s, []).append(idx)
    out: dict[str, str] = {}
    for s in sorted(by_stratum):
        # A seeded order of each group's own key (its smallest content hash), not a shuffle of the list: images
        # added later fall in between without reordering the others, so a re-split (a larger --val, more
        # images) keeps the earlier validation images there instead of dealing both sides afresh.
        groups = sorted(by_stratum[s], key=lambda idx: _order_key(seed, min(records[k].sha256 for k in idx)))
        n = sum(len(g) for g in groups)
        target = val * n
        taken = 0
        for g in groups:
            side = "train"
            if abs(taken + len(g) - target) < abs(taken - target):
                side = "val"
                taken += len(g)
            for k in g:
                out[records[k].sha256] = side
    if val > 0 and len(members) > 1 and "val" not in out.values():
        # Tiny sets: rounding gave no validation image; move the smallest group.
        smallest = min(members.values(), key=lambda idx: (len(idx), min(records[k].sha256 for k in idx)))
        for k in smallest:
            out[records[k].sha256] = "val"
    return out, labels


def _order_key(seed: int, sha: str) -> str:
    return hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest()


def crossing_groups(
    records: list[ImageRecord], sides: dict[str, str | None], labels: list[int]
) -> list[list[str]]:
    """Groups whose members sit on different sides (paths); empty when the split is leak-free."""
    seen: dict[int, set[str | None]] = {}
    paths: dict[int, list[str]] = {}
    for r, g in zip(records, labels, strict=True):
        seen.setdefault(g, set()).add(sides.get(r.sha256))
        paths.setdefault(g, []).append(r.path)
    return [paths[g] for g, s in seen.items() if len(s - {None}) > 1]


MOVES_KEY = "split.moves"  # meta: {sha256: "train" | "val"}, oldest first, written by `curate review`


def apply_moves(manifest: Manifest, records: list[ImageRecord], sides: dict[str, str], labels: list) -> int:
    """Put the images moved by hand (and everything grouped with them) on their chosen side; the latest
    move wins within a group. Returns how many moves applied (moves of images no longer kept are ignored)."""
    moves = json.loads(manifest.get_meta(MOVES_KEY) or "{}")
    label_of = {r.sha256: g for r, g in zip(records, labels, strict=True)}
    applied = 0
    for sha, side in moves.items():
        if sha not in label_of or side not in ("train", "val"):
            continue
        applied += 1
        for r in records:
            if label_of[r.sha256] == label_of[sha]:
                sides[r.sha256] = side
    return applied


def split(
    manifest: Manifest,
    val: float = 0.1,
    seed: int = 0,
    *,
    balance_tag: str | None = None,
    phash_threshold: int = PHASH_THRESHOLD,
) -> SplitResult:
    """Split the kept images into train/val and store it in ``images.split`` (others get NULL)."""
    if not 0.0 <= val < 1.0:
        raise CurateError(f"--val is the validation fraction, between 0 and 1 (10-20% is typical), got {val}")
    if not 0 <= phash_threshold <= 64:
        raise CurateError(f"--phash-threshold must be between 0 and 64 bits, got {phash_threshold}")
    records = manifest.kept_images()
    if not records:
        raise CurateError(manifest.nothing_kept("split"))
    from ..export.kohya import zero_repeat_folder, zero_repeat_warnings

    # a 0_name folder is neither trained nor validated on (sd-scripts skips it, export leaves it out of both):
    # deal only the others, so it takes no validation share; its images stay on the train side
    skipped = [r for r in records if zero_repeat_folder(r.path) is not None]
    if len(skipped) < len(records):
        records = [r for r in records if zero_repeat_folder(r.path) is None]
    else:  # every kept image is in a 0_name folder: split them as before (plan and export refuse them)
        skipped = []
    sides, labels = assign(records, val, seed, balance_tag, phash_threshold)
    moved = apply_moves(manifest, records, sides, labels)
    crossing = crossing_groups(records, sides, labels)  # type: ignore[arg-type]
    if crossing:  # construction makes this impossible; keep the assertion where it matters
        raise AssertionError(f"near-duplicate group split across train/val: {crossing[0]}")
    updates: dict[str, dict[str, Any]] = {r.sha256: {"split": None} for r in manifest.images()}
    for r in skipped:
        updates[r.sha256] = {"split": "train"}
    for sha, side in sides.items():
        updates[sha] = {"split": side}
    manifest.update_images(updates.items())
    sizes = Counter(labels)
    strata: dict[str, dict[str, int]] = {}
    if balance_tag:
        for r in records:
            c = strata.setdefault(stratum_of(r, balance_tag), {"train": 0, "val": 0})
            c[sides[r.sha256]] += 1
    n_val = sum(1 for s in sides.values() if s == "val")
    res = SplitResult(
        train=len(records) - n_val,
        val=n_val,
        groups=len(sizes),
        grouped_images=sum(n for n in sizes.values() if n > 1),
        seed=seed,
        target=val,
        strata=strata,
        moved_by_hand=moved,
    )
    res.notes += zero_repeat_warnings([r.path for r in skipped])
    if moved:
        res.notes.append(
            f"{moved} image(s) moved by hand in `curate review` stay on their side, with their near-duplicates "
            "(`curate split --clear-moves` forgets the moves)"
        )
    if val and not 0.10 <= res.val_fraction <= 0.20:
        res.notes.append(
            f"validation is {res.val_fraction:.0%} of the images; 10-20% is the usual range"
            + (" (groups of near-duplicates are kept whole)" if res.grouped_images else "")
        )
    if balance_tag and set(strata) == {NO_STRATUM}:
        res.notes.append(f"no image has a tag matching {balance_tag!r}; run the tagger or check the tag name")
    return res


def split_violations(
    manifest: Manifest, phash_threshold: int = PHASH_THRESHOLD
) -> list[tuple[list[str], str]]:
    """(paths, detail) for every duplicate group that straddles train/val; empty when no split is stored."""
    records = [r for r in manifest.kept_images() if r.split is not None]
    if not records:
        return []
    labels = leak_groups(records, phash_threshold)
    sides = {r.sha256: r.split for r in records}
    out = []
    for paths in crossing_groups(records, sides, labels):
        by_path = {r.path: r.split for r in records}
        detail = ", ".join(f"{p}: {by_path[p]}" for p in paths)
        out.append((paths, f"near-duplicates on both sides of the split ({detail}); rerun `curate split`"))
    return out
