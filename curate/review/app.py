"""The review web app: server-rendered pages (plain HTML, a little JS) and a JSON API for the clicks.

Local only: the server binds 127.0.0.1, every request must carry the per-run token (in the URL, or in the
SameSite=Strict, HttpOnly cookie set on the first visit) and a Host header naming this server, else 403.
Handlers are ``async`` so they all run on the event loop's thread, which owns the SQLite connections.
"""

from __future__ import annotations

import hmac
import html
import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import CurateError
from ..io import write_thumbnail
from ..manifest import ImageRecord
from .state import THRESHOLDS, Review, link_evidence

STATIC = Path(__file__).parent / "static"
THUMB = 256
PAGE = {"dups": 20, "rejects": 60, "captions": 40, "split": 60, "buckets": 60}
esc = html.escape


class TokenGate:
    """ASGI middleware: 403 unless the request carries the token (query or cookie) and names this host."""

    def __init__(self, app, token: str, port: int) -> None:
        self.app, self.token, self.port = app, token, port
        self.cookie = f"curate_review_{port}"

    def _ok(self, value: str | None) -> bool:
        return bool(value) and hmac.compare_digest(value.encode(), self.token.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        req = Request(scope)
        host = req.headers.get("host", "")
        by_query, by_cookie = self._ok(req.query_params.get("token")), self._ok(req.cookies.get(self.cookie))
        if host not in (f"127.0.0.1:{self.port}", f"localhost:{self.port}") or not (by_query or by_cookie):
            resp = PlainTextResponse(
                "forbidden: open the address `curate review` printed (it carries this run's token)\n", 403
            )
            return await resp(scope, receive, send)
        if by_query and not by_cookie:
            cookie = f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict".encode()

            async def send_with_cookie(msg):
                if msg["type"] == "http.response.start":
                    msg = {**msg, "headers": [*msg.get("headers", []), (b"set-cookie", cookie)]}
                await send(msg)

            return await self.app(scope, receive, send_with_cookie)
        return await self.app(scope, receive, send)


# -- pieces of pages ------------------------------------------------------------------------------------
def _page_no(req: Request) -> int:
    try:
        return max(1, int(req.query_params.get("page", "1")))
    except ValueError:
        return 1


def _pager(req: Request, total: int, size: int) -> str:
    pages = max(1, math.ceil(total / size))
    page = min(_page_no(req), pages)
    if pages == 1:
        return ""
    q = {k: v for k, v in req.query_params.items() if k not in ("page", "token")}

    def link(n: int, label: str) -> str:
        return f'<a href="?{esc(urlencode({**q, "page": n}))}" class="pg">{label}</a>'

    parts = [f"page {page} of {pages} ({total})"]
    if page > 1:
        parts.insert(0, link(page - 1, "&larr; previous"))
    if page < pages:
        parts.append(link(page + 1, "next &rarr;"))
    return f'<nav class="pager">{" ".join(parts)}</nav>'


def _slice(req: Request, items: list, size: int) -> list:
    pages = max(1, math.ceil(len(items) / size))
    page = min(_page_no(req), pages)
    return items[(page - 1) * size : page * size]


def _img(rec: ImageRecord, alt: str, crop: tuple[float, float, float, float] | None = None) -> str:
    if rec.error:
        return '<div class="noimg">no preview</div>'
    box = ""
    if crop:
        left, top, w, h = (f"{100 * v:.2f}%" for v in crop)
        box = f'<span class="crop" style="left:{left};top:{top};width:{w};height:{h}"></span>'
    return (
        f'<span class="thumb"><img src="/thumb/{rec.sha256}" loading="lazy" alt="{esc(alt)}" '
        f'width="{THUMB}">{box}</span>'
    )


def _meta(rec: ImageRecord) -> str:
    s = rec.scores.get("sharpness")
    bits = [f"{rec.width}x{rec.height}", f"{rec.size / 1024:.0f} KiB"]
    if s is not None:
        bits.append(f"sharpness {s:.0f}")
    return f'<span class="meta">{esc(", ".join(bits))}</span>'


def _n_rejected(rv: Review) -> int:
    """Files rejected by anything but dedupe (duplicates are counted on their own page)."""
    return sum(1 for items in rv.rejected().values() if any(s != "dedupe" for s, _, _ in items))


def _layout(rv: Review, view: str, title: str, body: str) -> HTMLResponse:
    links = [
        ("dups", f"Duplicates ({len(rv.groups())})"),
        ("rejects", f"Rejects ({_n_rejected(rv)})"),
        ("captions", f"Captions ({len(rv.kept())})"),
        ("split", "Train / val"),
        ("buckets", "Buckets"),
    ]
    nav = "".join(
        f'<a href="/{v}"{" aria-current=page" if v == view else ""}>{esc(label)}</a>' for v, label in links
    )
    hist = rv.history(1)
    last = (
        f'<span class="last">last change: {esc(hist[0][1])}{" (undone)" if hist[0][2] else ""}</span>'
        if hist
        else ""
    )
    page = (
        f"<!doctype html><html lang=en><meta charset=utf-8><title>curate review: {esc(rv.root.name)} — "
        f'{esc(title)}</title><link rel="stylesheet" href="/static/review.css">'
        f'<header><b>curate review</b> <span class="ds">{esc(str(rv.root))}</span><nav>{nav}</nav>'
        f'<button type="button" data-action="undo" title="undo the last change (u)">Undo</button>{last}</header>'
        f'<div id="flash" role="status"></div><main data-view="{view}"><h1>{esc(title)}</h1>{body}</main>'
        "<footer>keys: <kbd>j</kbd>/<kbd>k</kbd> next/previous image · <kbd>x</kbd> reject · "
        "<kbd>K</kbd> (shift+k) keep / make keeper · <kbd>e</kbd> edit caption · <kbd>u</kbd> undo. "
        "Every change is written to the manifest at once.</footer>"
        '<script src="/static/review.js"></script></html>'
    )
    return HTMLResponse(page)


# -- views ----------------------------------------------------------------------------------------------
def view_dups(rv: Review, req: Request) -> HTMLResponse:
    groups = rv.groups()
    rejected = rv.rejected()
    items = list(groups.items())
    out = [
        "<p>Each group keeps one copy (green, <b>KEEPER</b>); the others (red, <b>DROPPED</b>) are left out "
        "of the export. Evidence is what dedupe recorded for each link. Select copies to split them off; "
        "tick two groups to merge them. Each choice is kept: <code>curate dedupe</code> replays it on every "
        "run (<code>--clear-overrides</code> forgets them; <i>Undo</i> takes one back).</p>",
        '<div class="toolbar"><button type="button" data-action="merge">Merge the two ticked groups</button></div>',
        _pager(req, len(items), PAGE["dups"]),
    ]
    if not items:
        out.append(f"<p>No duplicate groups (run <code>curate dedupe {esc(str(rv.root))}</code>).</p>")
    for gid, members in _slice(req, items, PAGE["dups"]):
        keeper = next((m for m in members if m.dup_keeper), None)
        kp = keeper.path if keeper else ""
        links = link_evidence(members[0].dup_explain)
        out.append(
            f'<section class="group" data-group="{gid}" id="g{gid}"><h2><label><input type="checkbox" '
            f'class="group-pick" value="{gid}"> group {gid}</label> · {len(members)} images '
            f'<button type="button" data-action="split" data-group="{gid}">Split selected copies off</button>'
            '</h2><div class="row">'
        )
        for m in members:
            is_keeper = bool(m.dup_keeper)
            label = "KEEPER" if is_keeper else f"DROPPED — duplicate of {kp}"
            ev = [x for x in links if m.path in x[:2]]
            ev_html = "".join(
                f'<li class="ev">{esc(" · ".join(_ev_num(k, v) for k, v in nums.items()) or "link")}'
                f' <span class="why">{esc(a)} ~ {esc(b)}: {esc(words)}</span></li>'
                for a, b, nums, words in (ev if not is_keeper else ev[:3])
            )
            also = "".join(f'<span class="also">also at {esc(p)}</span>' for p in m.paths[1:])
            other = [f"{s}: {r}" for p in m.paths for s, r, _ in rejected.get(p, []) if s != "dedupe"]
            note = f'<span class="note">also rejected ({esc(", ".join(other))})</span>' if other else ""
            button = (
                ""
                if is_keeper
                else f'<button type="button" data-action="keeper" data-sha="{m.sha256}">Make keeper</button>'
            )
            out.append(
                f'<figure class="card {"keeper" if is_keeper else "dropped"}" data-sha="{m.sha256}" '
                f'data-path="{esc(m.path)}">{_img(m, f"{label}: {m.path}")}<figcaption>'
                f'<span class="label">{esc(label)}</span><span class="path">{esc(m.path)}</span>{also}'
                f'{_meta(m)}{note}<ul class="evidence">{ev_html}</ul><label class="sel"><input type="checkbox" '
                f'class="pick" value="{m.sha256}"> select</label> {button}</figcaption></figure>'
            )
        out.append("</div></section>")
    out.append(_pager(req, len(items), PAGE["dups"]))
    return _layout(rv, "dups", f"Duplicate groups ({len(items)})", "".join(out))


def _ev_num(key: str, v: float) -> str:
    names = {"phash": "pHash distance", "dhash": "dHash distance", "inliers": "inliers", "ncc": "NCC",
             "clip": "CLIP cosine"}  # fmt: skip
    return f"{names.get(key, key)} {v:g}"


SLIDERS = {  # threshold -> (label, min, max, step, metric of a record)
    "min_sharpness": ("min sharpness", 0.0, None, 0.5, lambda r: r.scores.get("sharpness")),
    "min_brightness": ("min brightness", 0.0, 1.0, 0.01, lambda r: r.scores.get("brightness")),
    "max_brightness": ("max brightness", 0.0, 1.0, 0.01, lambda r: r.scores.get("brightness")),
    "min_entropy": ("min entropy (bits)", 0.0, 8.0, 0.05, lambda r: r.scores.get("entropy")),
    "min_side": ("min short side (px)", 0, None, 8, lambda r: min(r.width, r.height) if r.width else None),
    "max_aspect": ("max aspect", 1.0, None, 0.05, lambda r: max(r.width, r.height) / min(r.width, r.height)
                   if r.width and r.height else None),
}  # fmt: skip


def view_rejects(rv: Review, req: Request) -> HTMLResponse:
    from ..export.report import score_and_threshold

    cfg = rv.filter_config()
    recs = [r for r in rv.records() if not r.error]
    sliders = []
    for name in THRESHOLDS:
        label, lo, hi, step, get = SLIDERS[name]
        vals = sorted(float(v) for v in (get(r) for r in recs) if v is not None)
        cur = float(getattr(cfg, name))
        top = vals[int(0.98 * (len(vals) - 1))] if vals else 1.0
        hi = hi if hi is not None else max(cur * 2, top * 1.2, lo + step)
        sliders.append(
            f'<label class="slider">{esc(label)} <input type="range" data-threshold="{name}" min="{lo}" '
            f'max="{hi:.6g}" step="{step}" value="{cur:g}"><input type="number" class="thr" '
            f'data-threshold="{name}" step="{step}" value="{cur:g}" aria-label="{esc(label)}"></label>'
        )
    by_path = {p: r for r in rv.records() for p in r.paths}
    rows: list[tuple[str, str, str, str | None]] = []  # (reason, path, stage, detail)
    for path, found in sorted(rv.rejected().items()):
        for stage, reason, detail in found:
            if stage == "dedupe":
                continue  # shown with their groups
            pairs = (
                zip(reason.split(","), (detail or "").split("; "), strict=False)
                if "," in reason
                else [(reason, detail)]
            )
            rows += [(r, path, stage, d) for r, d in pairs]
    reasons: dict[str, int] = {}
    for r, *_ in rows:
        reasons[r] = reasons.get(r, 0) + 1
    want = req.query_params.get("reason")
    shown = [x for x in rows if want in (None, "", x[0])]
    shown.sort(key=lambda x: (x[0], x[1]))
    tabs = " ".join(
        f'<a href="?{esc(urlencode({"reason": r}))}"{" aria-current=page" if r == want else ""}>'
        f"{esc(r)} ({n})</a>"
        for r, n in sorted(reasons.items())
    )
    out = [
        '<section class="thresholds"><h2>Thresholds</h2><p>Move a slider (or type a value) to preview how '
        "many images it would reject, from the stored scores; <b>Apply</b> records it as "
        "<code>curate filter --min-sharpness ...</code> would.</p>",
        "".join(sliders),
        '<p><output id="preview">-</output> <button type="button" data-action="filter-apply">Apply '
        "thresholds</button></p></section>",
        f'<nav class="tabs"><a href="/rejects"{"" if want else " aria-current=page"}>all ({len(rows)})</a> {tabs}</nav>',
        _pager(req, len(shown), PAGE["rejects"]),
        '<div class="row">',
    ]
    for reason, path, stage, detail in _slice(req, shown, PAGE["rejects"]):
        rec = by_path.get(path)
        st = score_and_threshold(detail)
        num = (
            f'<span class="score">score {esc(st[0])}</span> {esc(st[1])} '
            f'<span class="threshold">threshold {esc(st[2])}</span>'
            if st
            else ""
        )
        keep = (
            ""
            if stage == "scan"
            else f'<button type="button" data-action="keep" data-path="{esc(path)}">Keep anyway</button>'
        )
        img = _img(rec, f"rejected, {reason}: {path}") if rec else '<div class="noimg">no preview</div>'
        out.append(
            f'<figure class="card dropped reject" data-path="{esc(path)}" data-reason="{esc(reason)}">{img}'
            f'<figcaption><span class="label">REJECTED — {esc(reason)}</span><span class="path">{esc(path)}'
            f'</span>{num}<span class="why">{esc(stage)}: {esc(detail or "")}</span>{keep}</figcaption></figure>'
        )
    out.append("</div>")
    out.append(_pager(req, len(shown), PAGE["rejects"]))
    kept = sorted(p for p, (d, _) in rv.reader.decisions().items() if d == "keep")
    if kept:
        out.append(f'<h2>Kept by hand ({len(kept)})</h2><ul class="kept-by-hand">')
        out += [
            f'<li>{esc(p)} <button type="button" data-action="forget" data-path="{esc(p)}">Forget decision'
            "</button></li>"
            for p in kept[:200]
        ]
        out.append("</ul>")
    return _layout(rv, "rejects", f"Rejects ({_n_rejected(rv)} files)", "".join(out))


def view_captions(rv: Review, req: Request) -> HTMLResponse:
    from ..models.clip_tokenizer import MAX_TOKENS, count_tokens

    trig = rv.trigger()
    want = req.query_params.get("tag")
    recs = rv.kept()
    if want:
        recs = [r for r in recs if want in rv.parts(r)]
    freq = rv.tag_frequency()
    top = freq[0][1] if freq else 1
    chart = "".join(
        f'<li><a href="?{esc(urlencode({"tag": t}))}" class="bar-label">{esc(t)}</a>'
        f'<span class="bar" style="width:{max(2, 240 * n // top)}px"></span> {n}</li>'
        for t, n in freq[:30]
    )
    page = _slice(req, recs, PAGE["captions"])
    tokens = count_tokens([rv.caption(r) for r in page]) if page else []
    scores = rv.tag_scores()
    out = [
        f'<section class="freq"><h2>Tag frequency ({len(freq)} tags over {len(rv.kept())} kept images)</h2>'
        f'<ol class="chart">{chart}</ol></section>'
        if freq
        else "<p>No captions or tags yet.</p>",
        '<section class="bulk"><h2>Bulk edit</h2><select id="bulk-op" aria-label="bulk operation">'
        '<option value="remove">remove tag</option><option value="replace">replace tag</option>'
        '<option value="prepend">prepend tag</option></select> <input id="bulk-tag" placeholder="tag" '
        'aria-label="tag"> <input id="bulk-new" placeholder="new tag (replace)" aria-label="new tag"> '
        '<label><input type="checkbox" id="bulk-selected"> only the selected images</label> '
        '<button type="button" data-action="bulk">Apply to all kept images (or the selection)</button>'
        "</section>",
        f"<p>{'Showing images tagged <b>' + esc(want) + '</b>. <a href=/captions>all</a>' if want else ''}"
        f"{' Trigger word <b>' + esc(trig) + '</b> is pinned first.' if trig else ''}</p>",
        _pager(req, len(recs), PAGE["captions"]),
        '<label><input type="checkbox" id="select-page"> select all on this page</label>',
    ]
    for r, n in zip(page, tokens, strict=True):
        parts = rv.parts(r)
        sc = scores.get(r.sha256, {})
        chips = []
        for k, p in enumerate(parts):
            if trig and p == trig and k == 0:
                chips.append(f'<span class="chip trigger" title="trigger word, pinned first">{esc(p)}</span>')
                continue
            s = sc.get(p.lower().replace("\\(", "(").replace("\\)", ")"))
            score = f' <small class="score">{s:.2f}</small>' if s is not None else ""
            chips.append(
                f'<span class="chip" data-tag="{esc(p)}">{esc(p)}{score}<button type="button" data-action="tag-left" '
                f'title="move left">&lsaquo;</button><button type="button" data-action="tag-right" title="move right">'
                f'&rsaquo;</button><button type="button" data-action="tag-remove" aria-label="remove {esc(p)}">'
                "&times;</button></span>"
            )
        over = " over" if n is not None and n > MAX_TOKENS else ""
        tok = f'<span class="tokens{over}">{n} CLIP tokens</span>' if n is not None else ""
        text = rv.caption(r)
        out.append(
            f'<figure class="card caption-row" data-sha="{r.sha256}" data-path="{esc(r.path)}" '
            f'data-parts="{esc(json.dumps(parts))}" data-trigger="{esc(trig or "")}">'
            f"{_img(r, r.path)}<figcaption><label class=sel><input type=checkbox class=pick "
            f'value="{esc(r.path)}"> <span class="path">{esc(r.path)}</span></label> {tok}'
            f'<div class="chips">{"".join(chips)}<input class="add-tag" placeholder="add tag" '
            f'aria-label="add tag"></div><p class="text">{esc(text)}</p><div class="edit" hidden>'
            f'<textarea aria-label="caption text">{esc(text)}</textarea><button type="button" '
            'data-action="save-text">Save</button></div><button type="button" data-action="edit">Edit text (e)'
            "</button></figcaption></figure>"
        )
    out.append(_pager(req, len(recs), PAGE["captions"]))
    return _layout(rv, "captions", f"Captions ({len(recs)})", "".join(out))


def view_split(rv: Review, req: Request) -> HTMLResponse:
    kept = rv.kept()
    sides = {s: [r for r in kept if r.split == s] for s in ("train", "val")}
    unsplit = sum(1 for r in kept if r.split is None)
    out = [
        "<p>Moving an image moves every near-duplicate of it too (its dedupe group and images within "
        "10 bits of pHash), so no duplicate sits on both sides.</p>"
    ]
    if unsplit:
        out.append(
            f"<p>{unsplit} kept images are not split yet: run <code>curate split {esc(str(rv.root))}</code>.</p>"
        )
    out.append('<div class="split">')
    for side, other in (("train", "val"), ("val", "train")):
        recs = sides[side]
        out.append(f'<section class="side" data-side="{side}"><h2>{side} ({len(recs)})</h2><div class="row">')
        for r in _slice(req, recs, PAGE["split"]):
            out.append(
                f'<figure class="card" data-sha="{r.sha256}" data-path="{esc(r.path)}">{_img(r, r.path)}'
                f'<figcaption><span class="label">{side.upper()}</span><span class="path">{esc(r.path)}</span>'
                f'<button type="button" data-action="move" data-sha="{r.sha256}" data-side="{other}">'
                f"Move to {other}</button></figcaption></figure>"
            )
        out.append("</div></section>")
    out.append("</div>")
    out.append(_pager(req, max(len(v) for v in sides.values()), PAGE["split"]))
    return _layout(rv, "split", f"Train / val ({len(sides['train'])} / {len(sides['val'])})", "".join(out))


def view_buckets(rv: Review, req: Request) -> HTMLResponse:
    per: dict[tuple[int, int], list[ImageRecord]] = {}
    for r in rv.kept():
        if r.bucket:
            per.setdefault(tuple(r.bucket), []).append(r)
    want = req.query_params.get("bucket")
    s = rv.settings_text()
    out = [
        "<p>The bright box on each thumbnail is the part the trainer keeps: the image is scaled to cover its "
        f"bucket, then centre-cropped. {('Settings: ' + esc(s)) if s else ''}</p>"
    ]
    if not per:
        out.append(f"<p>Not bucketed yet: run <code>curate bucket {esc(str(rv.root))}</code>.</p>")
    order = sorted(per.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    out.append(
        '<nav class="tabs">'
        + " ".join(f'<a href="?bucket={w}x{h}">{w}x{h} ({len(v)})</a>' for (w, h), v in order)
        + "</nav>"
    )
    for (w, h), recs in order:
        if want and want != f"{w}x{h}":
            continue
        shown = _slice(req, recs, PAGE["buckets"]) if want else recs[:8]
        more = "" if want or len(recs) <= 8 else f' <a href="?bucket={w}x{h}">all {len(recs)}</a>'
        out.append(
            f'<section class="bucket" data-bucket="{w}x{h}"><h2>{w}x{h} · {len(recs)} images{more}</h2><div class="row">'
        )
        for r in shown:
            crop = rv.crop_box(r)
            lost = 1 - crop[2] * crop[3] if crop else 0.0
            out.append(
                f'<figure class="card" data-sha="{r.sha256}" data-path="{esc(r.path)}">'
                f"{_img(r, f'bucket {w}x{h}: {r.path}', crop)}<figcaption><span class=path>{esc(r.path)}</span>"
                f'<span class="meta">{r.width}x{r.height} → {w}x{h}, crop {lost:.0%}</span></figcaption></figure>'
            )
        out.append("</div></section>")
        if want:
            out.append(_pager(req, len(recs), PAGE["buckets"]))
    return _layout(rv, "buckets", f"Buckets ({len(per)})", "".join(out))


# -- the app ----------------------------------------------------------------------------------------------
def make_app(rv: Review, token: str, port: int) -> Starlette:
    thumbs = rv.reader.state_dir / "review_thumbs"

    def page(fn):
        async def endpoint(req: Request):
            try:
                return fn(rv, req)
            except CurateError as exc:
                return HTMLResponse(f"<p>error: {esc(exc.message)}</p>", 400)

        return endpoint

    async def home(req: Request):
        return RedirectResponse("/dups" if rv.groups() else "/rejects", 303)

    async def thumb(req: Request):
        sha = req.path_params["sha"]
        rec = rv.by_sha().get(sha)
        if rec is None or not rec.paths:
            return PlainTextResponse("no such image", 404)
        out = thumbs / f"{sha[:24]}.jpg"
        if not write_thumbnail(rv.root, rec.paths[0], out, THUMB):
            return PlainTextResponse("cannot decode", 404)
        return FileResponse(out, headers={"Cache-Control": "private, max-age=86400"})

    def api(fn):
        async def endpoint(req: Request):
            try:
                body: dict[str, Any] = await req.json()
            except ValueError:
                body = {}
            try:
                res = fn(body)
            except CurateError as exc:
                return JSONResponse({"ok": False, "error": exc.message}, 400)
            except (KeyError, TypeError, ValueError) as exc:
                return JSONResponse({"ok": False, "error": f"bad request: {exc}"}, 400)
            return JSONResponse({"ok": True, **(res if isinstance(res, dict) else {"message": res})})

        return Route(f"/api/{fn.__name__.replace('_', '-')}", endpoint, methods=["POST"])

    def keeper(b):
        return rv.set_keeper(b["sha"])

    def split(b):
        return rv.split_group(list(b["shas"]))

    def merge(b):
        a, c = (int(x) for x in b["groups"])
        return rv.merge_groups(a, c)

    def decide(b):
        return rv.decide(b["paths"], b.get("decision"))

    def reject_sha(b):
        rec = rv.record(b["sha"])
        return rv.decide(list(rec.paths), "reject")

    def filter_preview(b):
        return rv.filter_preview(b.get("thresholds") or {})

    def filter_apply(b):
        return rv.filter_apply(b.get("thresholds") or {})

    def caption(b):
        if "parts" in b:
            return rv.edit_caption(b["path"], parts=b["parts"])
        return rv.edit_caption(b["path"], text=b["text"])

    def bulk(b):
        return rv.bulk(b["op"], b.get("tag", ""), b.get("new", ""), b.get("paths") or None)

    def move(b):
        return rv.move(b["sha"], b["side"])

    def undo(b):
        return rv.undo()

    routes = [
        Route("/", home),
        Route("/dups", page(view_dups)),
        Route("/rejects", page(view_rejects)),
        Route("/captions", page(view_captions)),
        Route("/split", page(view_split)),
        Route("/buckets", page(view_buckets)),
        Route("/thumb/{sha}", thumb),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        *(api(f) for f in (keeper, split, merge, decide, reject_sha, filter_preview, filter_apply, caption,
                           bulk, move, undo)),
    ]  # fmt: skip
    app = Starlette(routes=routes)
    return TokenGate(app, token, port)  # type: ignore[return-value]


def url(port: int, token: str, view: str = "") -> str:
    return f"http://127.0.0.1:{port}/{view}?token={quote(token)}"
