"""`curate report`: one offline HTML page: summary, kept gallery with captions, duplicate groups and rejects
labelled KEPT / DROPPED in words, score histograms with thresholds, tags and buckets."""

from __future__ import annotations

import html
import json
import re
from collections import Counter
from functools import partial
from pathlib import Path

from ..config import FilterConfig
from ..io import atomic_write_text, write_thumbnail
from ..manifest import ImageRecord, Manifest
from .common import make_caption
from .report_svg import histogram

THUMB = 160

# Other stages add sections: callables (manifest) -> HTML fragment.
SECTIONS: list = []


def _thumb(manifest: Manifest, rec: ImageRecord, path: str, tdir: Path | None = None) -> str:
    """Relative URL of a cached thumbnail (made once per content hash, in thumbs/ beside the report),
    or '' if undecodable."""
    tdir = tdir or manifest.state_dir / "thumbs"  # beside the manifest when the dataset is read-only
    out = tdir / f"{rec.sha256[:20]}.jpg"
    if not write_thumbnail(manifest.root, path, out, THUMB):
        return ""
    return f"thumbs/{out.name}"


def _card(src: str, caption: str, cls: str = "", alt: str = "") -> str:
    img = (
        f'<img src="{html.escape(src)}" loading="lazy" alt="{html.escape(alt)}">'
        if src
        else '<div class="noimg">no preview</div>'
    )
    return f'<figure class="{cls}">{img}<figcaption>{caption}</figcaption></figure>'


def dup_notes(explain: str) -> dict[str, str]:
    """Per path of a duplicate group: why it was dropped (the keeper rule) and the evidence of its link."""
    import re

    notes: dict[str, list[str]] = {}
    keeper = ""
    for line in explain.splitlines():
        if line.startswith("kept "):
            keeper = line[5:].split(" (")[0]
        elif line.startswith("dropped "):
            m = re.match(r"dropped (.+?)(?: \(.*?\))?: (.*)$", line)
            if m:
                notes.setdefault(m.group(1), []).append(m.group(2))
        elif line.startswith("  ") and " ~ " in line and ": " in line:
            pair, why = line.strip().split(": ", 1)
            a, b = pair.split(" ~ ", 1)
            other = b if a == keeper else a if b == keeper else None
            for path in (other,) if other else (a, b):
                notes.setdefault(path, []).append(f"link: {why}")
    return {p: "; ".join(v) for p, v in notes.items()}


# (metric, how to read it from a record, {threshold label: FilterConfig field})
METRICS = (
    ("sharpness", lambda r: r.scores.get("sharpness"), {"min": "min_sharpness"}),
    ("brightness", lambda r: r.scores.get("brightness"), {"min": "min_brightness", "max": "max_brightness"}),
    ("entropy", lambda r: r.scores.get("entropy"), {"min": "min_entropy"}),
    ("short side (px)", lambda r: min(r.width, r.height) if r.width and r.height else None, {"min": "min_side"}),
    ("aspect (long/short)", lambda r: max(r.width, r.height) / min(r.width, r.height)
     if r.width and r.height else None, {"max": "max_aspect"}),
)  # fmt: skip
# what a reject's detail says, as "<score> <op> <threshold>" (filter.reasons_for writes these)
_SCORE_RE = re.compile(r"(-?[\d.]+)(?:px| bits)?(?::1)? ([<>]) (-?[\d.]+)")
REASON_FIELD = {"blurry": "min_sharpness", "too-dark": "min_brightness", "too-bright": "max_brightness",
                 "low-information": "min_entropy", "too-small": "min_side", "aspect": "max_aspect"}  # fmt: skip
GALLERY_PAGE = 200  # kept images per page section (<details>), so a 10k set opens fast


def score_and_threshold(detail: str | None) -> tuple[str, str, str] | None:
    """(score, op, threshold) from a reject's detail text, or None when it names none."""
    m = _SCORE_RE.search(detail or "")
    return (m.group(1), m.group(2), m.group(3)) if m else None


def thresholds_in_effect(rejected: dict, cfg: FilterConfig) -> dict[str, float]:
    """FilterConfig field -> threshold in effect: what the recorded rejects say, else the config's."""
    out = {k: float(getattr(cfg, k)) for k in set(REASON_FIELD.values())}
    for items in rejected.values():
        for stage, reason, detail in items:
            for r, d in zip(reason.split(","), (detail or "").split("; "), strict=False):
                st = score_and_threshold(d)
                if stage == "filter" and st and r in REASON_FIELD:
                    out[REASON_FIELD[r]] = float(st[2])
    return out


def trigger_word(manifest: Manifest) -> str | None:
    try:
        words = json.loads(manifest.get_meta("caption.trigger") or "[]")
    except ValueError:
        return None
    return words[0] if words else None


def build_report(manifest: Manifest, out: Path | None = None, filter_cfg: FilterConfig | None = None) -> Path:
    """Write the report (default ``.curate/report.html``) and return its path.

    ``filter_cfg`` gives the thresholds drawn on the histograms where no recorded reject names one."""
    out = out or manifest.state_dir / "report.html"
    recs = manifest.images(include_errors=True, statuses=("ok", "quarantined"))
    by_path = {p: r for r in recs for p in r.paths}
    rejected = manifest.rejected_paths()
    counts = manifest.counts()
    esc = html.escape
    thumb = partial(_thumb, manifest, tdir=out.parent / "thumbs")  # the page and its thumbs travel together
    reasons = Counter(r for items in rejected.values() for _, reason, _ in items for r in reason.split(","))
    kept = [r for r in recs if not r.error and r.paths and not any(p in rejected for p in r.paths)]
    parts = [
        "<!doctype html><html lang=en><meta charset=utf-8><title>curate report</title><style>",
        "body{font:14px system-ui,sans-serif;margin:2em;color:#222}figure{display:inline-block;margin:4px;"
        "width:170px;vertical-align:top}figure img{max-width:160px;max-height:160px;display:block}"
        "figcaption{font-size:11px;overflow-wrap:anywhere}.keep{outline:3px solid #2a2}.drop{outline:3px solid #c33}"
        ".why{color:#555}.group{border:1px solid #ddd;padding:6px;margin:8px 0}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.noimg{width:160px;height:60px;background:#eee}"
        ".label{font-weight:bold;display:block}.keep .label{color:#161}.drop .label{color:#a11}"
        ".caption{display:block;color:#000;margin:2px 0}.meta{color:#555;display:block}"
        "nav a{margin-right:1em}.hist{margin:4px 12px 12px 0;vertical-align:top}",
        "</style>",
        f"<h1>curate report: {esc(manifest.root.name)}</h1>",
        '<nav><a href="#summary">Summary</a><a href="#histograms">Scores</a><a href="#kept">Kept</a>'
        '<a href="#dups">Duplicates</a><a href="#rejects">Rejects</a><a href="#tags">Tags</a>'
        '<a href="#buckets">Buckets</a></nav>',
        '<h2 id="summary">Summary</h2><table>',
    ]
    for k, v in counts.items():
        parts.append(f"<tr><th>{k}</th><td>{v}</td></tr>")
    parts.append(f"<tr><th>kept images</th><td>{len(kept)}</td></tr>")
    parts.append("</table><h3>Rejects by reason</h3><table><tr><th>reason</th><th>files</th></tr>")
    for k, v in reasons.most_common():
        parts.append(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>")
    parts.append("</table>")

    # -- score histograms with the thresholds in effect
    thr = thresholds_in_effect(rejected, filter_cfg or FilterConfig())
    parts.append('<h2 id="histograms">Score histograms</h2><p>All decoded images; dashed red lines are the '
                 "filter thresholds (from the recorded rejects, else the config).</p>")  # fmt: skip
    scored = [r for r in recs if not r.error]
    for name, get, fields in METRICS:
        vals = [float(v) for v in (get(r) for r in scored) if v is not None]
        t = {label: thr[f] for label, f in fields.items() if f in thr}
        parts.append(f'<figure class="histfig" style="width:auto"><figcaption><b>{esc(name)}</b> '
                     f"({len(vals)} images)</figcaption>{histogram(name, vals, t)}</figure>")  # fmt: skip

    # -- kept gallery, in pages
    trigger = trigger_word(manifest)
    parts.append(
        f'<h2 id="kept">Kept images ({len(kept)})</h2><p>Each caption is the text export writes.</p>'
    )
    kept.sort(key=lambda r: r.path)
    for start in range(0, len(kept), GALLERY_PAGE):
        page = kept[start : start + GALLERY_PAGE]
        opened = " open" if start == 0 else ""
        parts.append(f"<details{opened}><summary>images {start + 1}-{start + len(page)}</summary>")
        for r in page:
            cap = make_caption(r, trigger)
            meta = [f"split: {r.split or 'unsplit'}"]
            if r.bucket:
                meta.append(f"bucket: {r.bucket[0]}x{r.bucket[1]}")
            if r.tags:
                meta.append("tags: " + ", ".join(r.tags))
            body = (
                f'<span class="label">KEPT</span><span class="path">{esc(r.path)}</span>'
                f'<span class="caption">{esc(cap)}</span>'
                + "".join(f'<span class="meta">{esc(m)}</span>' for m in meta)
            )
            parts.append(_card(thumb(r, r.path), body, "keep gallery", alt=cap or r.path))
        parts.append("</details>")

    groups: dict[int, list[ImageRecord]] = {}
    for r in recs:
        if r.dup_group is not None:
            groups.setdefault(r.dup_group, []).append(r)
    parts.append(f'<h2 id="dups">Duplicate groups ({len(groups)})</h2>')
    for gid, members in sorted(groups.items()):
        parts.append(f'<div class="group"><b>group {gid}</b><br>')
        explain = next((m.dup_explain for m in members if m.dup_explain), "")
        notes = dup_notes(explain or "")
        keepers = [p for m in members if m.dup_keeper for p in m.paths[:1]]
        keeper = keepers[0] if keepers else ""
        for m in sorted(members, key=lambda r: not r.dup_keeper):
            for p in m.paths:
                dropped = p in rejected and any(s == "dedupe" for s, _, _ in rejected[p])
                note = notes.get(p, "")
                if dropped:
                    label, cls = f"DROPPED — duplicate of {keeper}", "drop dup-dropped"
                else:
                    label, cls = "KEPT", "keep dup-kept"
                caption = f'<span class="label">{esc(label)}</span>{esc(p)}' + (
                    f'<br><span class="why">{esc(note)}</span>' if note else ""
                )
                parts.append(_card(thumb(m, p), caption, cls, alt=f"{label}: {p}"))
        parts.append(f"<pre>{esc(explain or '')}</pre></div>")

    # -- rejects, by reason, with score and threshold
    parts.append(f'<h2 id="rejects">Rejected files ({len(rejected)})</h2>')
    by_reason: dict[str, list[tuple[str, str, str | None]]] = {}
    for path, items in sorted(rejected.items()):
        for stage, reason, detail in items:
            if stage == "dedupe":
                continue  # shown with its group above
            for r, d in (
                zip(reason.split(","), (detail or "").split("; "), strict=False)
                if "," in reason
                else [(reason, detail)]
            ):
                by_reason.setdefault(r, []).append((path, stage, d))
    for reason, items in sorted(by_reason.items()):
        parts.append(f'<h3 class="reason">{esc(reason)} ({len(items)})</h3>')
        for path, stage, d in items:
            rec = by_path.get(path)
            st = score_and_threshold(d)
            num = (f'<span class="score">score {st[0]}</span> {esc(st[1])} '
                   f'<span class="threshold">threshold {st[2]}</span><br>') if st else ""  # fmt: skip
            body = (
                f'<span class="label">DROPPED — {esc(reason)}</span>{esc(path)}<br>{num}'
                f'<span class="why">{esc(stage)}: {esc(d or "")}</span>'
            )
            src = thumb(rec, path) if rec and not rec.error else ""
            parts.append(_card(src, body, "drop reject", alt=f"dropped, {reason}: {path}"))

    # -- tags
    tags = Counter(t for r in kept for t in (r.tags or []))
    parts.append(f'<h2 id="tags">Tags over kept images ({len(tags)})</h2>')
    if tags:
        top = max(tags.values())
        parts.append('<table class="tags"><tr><th>tag</th><th>images</th><th>share</th></tr>')
        for t, n in tags.most_common(200):
            bar = f'<svg width="{1 + 200 * n // top}" height="10" aria-hidden="true"><rect width="100%" height="10" fill="#4a7ab5"/></svg>'
            parts.append(f"<tr><td>{esc(t)}</td><td>{n}</td><td>{bar} {n / len(kept):.0%}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>No tags yet (run <code>curate tag</code>).</p>")

    for section in SECTIONS:
        parts.append(section(manifest))
    # -- buckets: examples per bucket (the counts table comes from the bucket stage's section)
    per_bucket: dict[tuple[int, int], list[ImageRecord]] = {}
    for r in kept:
        if r.bucket:
            per_bucket.setdefault(tuple(r.bucket), []).append(r)
    parts.append('<h2 id="buckets">Bucket examples</h2>')
    if not per_bucket:
        parts.append("<p>Not bucketed yet (run <code>curate bucket</code>).</p>")
    for (bw, bh), items in sorted(per_bucket.items()):
        parts.append(
            f'<div class="group bucket" data-bucket="{bw}x{bh}"><b>{bw}x{bh}: {len(items)} images</b><br>'
        )
        for r in items[:6]:
            parts.append(_card(thumb(r, r.path), esc(r.path), "", alt=f"bucket {bw}x{bh}: {r.path}"))
        parts.append("</div>")
    atomic_write_text(out, "\n".join(parts))
    return out
