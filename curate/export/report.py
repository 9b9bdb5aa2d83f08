"""`curate report`: one HTML page with the summary, duplicate groups as contact sheets and rejects."""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path

from PIL import Image

from ..io import STATE_DIR, atomic_write_text, open_rgb
from ..manifest import ImageRecord, Manifest

THUMB = 160

# Other stages add sections: callables (manifest) -> HTML fragment.
SECTIONS: list = []


def _thumb(manifest: Manifest, rec: ImageRecord, path: str) -> str:
    """Relative URL of a cached thumbnail (made once per content hash), or '' if undecodable."""
    tdir = manifest.state_dir / "thumbs"  # beside the manifest when the dataset is read-only
    out = tdir / f"{rec.sha256[:20]}.jpg"
    if not out.exists():
        src = manifest.root / path
        if not src.exists():  # applied decisions live in the quarantine
            src = manifest.root / STATE_DIR / "quarantine" / path
        try:
            img = open_rgb(src, max_side=THUMB * 2)
            img.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
            tdir.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            img.save(tmp, "JPEG", quality=85)
            tmp.replace(out)
        except Exception:
            return ""
    return f"thumbs/{out.name}"


def _card(src: str, caption: str, cls: str = "") -> str:
    img = f'<img src="{html.escape(src)}" loading="lazy">' if src else '<div class="noimg">no preview</div>'
    return f'<figure class="{cls}">{img}<figcaption>{caption}</figcaption></figure>'


def _dup_notes(explain: str) -> dict[str, str]:
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


def build_report(manifest: Manifest, out: Path | None = None) -> Path:
    """Write the report (default ``.curate/report.html``) and return its path."""
    out = out or manifest.state_dir / "report.html"
    recs = manifest.images(include_errors=True, statuses=("ok", "quarantined"))
    by_path = {p: r for r in recs for p in r.paths}
    rejected = manifest.rejected_paths()
    counts = manifest.counts()
    reasons = Counter(r for items in rejected.values() for _, reason, _ in items for r in reason.split(","))
    parts = [
        "<!doctype html><meta charset=utf-8><title>curate report</title><style>",
        "body{font:14px system-ui,sans-serif;margin:2em;color:#222}figure{display:inline-block;margin:4px;"
        "width:170px;vertical-align:top}figure img{max-width:160px;max-height:160px;display:block}"
        "figcaption{font-size:11px;word-break:break-all}.keep{outline:3px solid #2a2}.drop{outline:3px solid #c33}"
        ".why{color:#555}.group{border:1px solid #ddd;padding:6px;margin:8px 0}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.noimg{width:160px;height:60px;background:#eee}",
        "</style>",
        f"<h1>curate report: {html.escape(manifest.root.name)}</h1>",
        "<h2>Summary</h2><table>",
    ]
    for k, v in counts.items():
        parts.append(f"<tr><th>{k}</th><td>{v}</td></tr>")
    parts.append("</table><h3>Rejects by reason</h3><table>")
    for k, v in reasons.most_common():
        parts.append(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>")
    parts.append("</table>")

    groups: dict[int, list[ImageRecord]] = {}
    for r in recs:
        if r.dup_group is not None:
            groups.setdefault(r.dup_group, []).append(r)
    parts.append(f"<h2>Duplicate groups ({len(groups)})</h2>")
    for gid, members in sorted(groups.items()):
        parts.append(f'<div class="group"><b>group {gid}</b><br>')
        explain = next((m.dup_explain for m in members if m.dup_explain), "")
        notes = _dup_notes(explain or "")
        for m in sorted(members, key=lambda r: not r.dup_keeper):
            for p in m.paths:
                dropped = p in rejected and any(s == "dedupe" for s, _, _ in rejected[p])
                cls = "drop" if dropped else "keep"
                note = notes.get(p, "")
                caption = html.escape(p) + (
                    f'<br><span class="why">{html.escape(note)}</span>' if note else ""
                )
                parts.append(_card(_thumb(manifest, m, p), caption, cls))
        parts.append(f"<pre>{html.escape(explain or '')}</pre></div>")

    parts.append(f"<h2>Rejected files ({len(rejected)})</h2>")
    for path, items in sorted(rejected.items()):
        rec = by_path.get(path)
        why = "<br>".join(
            f"<b>{html.escape(reason)}</b> ({s}): {html.escape(d or '')}" for s, reason, d in items
        )
        src = _thumb(manifest, rec, path) if rec and not rec.error else ""
        parts.append(_card(src, f"{html.escape(path)}<br>{why}", "drop"))
    for section in SECTIONS:
        parts.append(section(manifest))
    atomic_write_text(out, "\n".join(parts))
    return out
