"""Replaying hand choices on duplicate groups (curate/stages/overrides.py), on groups built by hand."""

from __future__ import annotations

from curate.stages.overrides import Group, Override, apply


def _group(shas: str, links: list[str], keeper: str | None = None) -> Group:
    return Group(
        list(shas), keeper or shas[0], {frozenset(p): (f"  {p[0]} ~ {p[1]}: linked", None) for p in links}
    )


def _ov(i: int, kind: str, a: str, b: str) -> Override:
    return Override(i, kind, list(a), list(b), float(i), "review")


def _parts(groups: list[Group]) -> list[str]:
    return sorted("".join(sorted(g.shas)) for g in groups)


def test_split_cuts_the_links_that_cross_when_others_still_connect():
    """Chain a-b-c-d-e plus a-e: splitting a from e cuts a~e, then each image goes to its nearest side."""
    g = _group("abcde", ["ab", "bc", "cd", "de", "ae"])
    out, rep = apply([g], [_ov(1, "split", "a", "e")], set("abcde"), best=min)
    assert _parts(out) == ["abc", "de"]  # c is 2 links from a and 2 from e: a's side reaches it first
    assert [o["result"] for o in rep["applied"]] == ["split 1 group(s)"] and rep["ignored"] == 0
    kept = next(x for x in out if "a" in x.shas)
    assert kept.keeper == "a" and set(kept.links) == {frozenset("ab"), frozenset("bc")}
    other = next(x for x in out if "e" in x.shas)
    assert other.keeper == "d" and other.notes == ["group split by hand"]  # best=min among d, e


def test_split_with_only_direct_links_keeps_the_rest_together():
    g = _group("abc", ["ab", "ac", "bc"])
    out, _ = apply([g], [_ov(1, "split", "c", "ab")], set("abc"), best=min)
    assert _parts(out) == ["ab", "c"]


def test_merge_then_keeper_then_gone_images():
    """Merge joins two groups (a's keeper stays), a later keeper choice wins, a choice on gone images counts."""
    g1, g2 = _group("ab", ["ab"]), _group("cd", ["cd"], keeper="d")
    ovs = [_ov(1, "merge", "ab", "cd"), _ov(2, "keeper", "c", "abd"), _ov(3, "split", "x", "a")]
    out, rep = apply([g1, g2], ovs, set("abcd"), best=min)
    assert _parts(out) == ["abcd"]
    assert out[0].keeper == "c" and out[0].hand_keeper and out[0].shas[0] == "c"
    assert frozenset("ad") in out[0].links  # the hand link between the two keepers
    assert [o["result"] for o in rep["applied"]] == ["merged 2 group(s)", "keeper"]
    assert rep["ignored"] == 1 and rep["ignored_ids"] == [3]
    # The keeper choice only holds while the image shares a group with those it was chosen over.
    out, rep = apply([_group("ce", ["ce"])], [_ov(1, "keeper", "c", "ab")], set("abce"), best=min)
    assert out[0].keeper == "c" and not out[0].hand_keeper
    assert rep["applied"][0]["result"] == "not in its group now"
