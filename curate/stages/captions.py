"""Caption building and writing, from stored tag scores and BLIP captions (no model runs here).

Order of a caption: trigger word(s), character tags, the BLIP sentence (if used), general tags by
confidence. Tags present in more than ``drop_common`` of the images are dropped (the trigger should absorb
what every image shows); blacklist and replace maps apply to the readable form ("long hair").

Caption files are never silently lost: a file curate did not write, or one whose content changed since
curate wrote it (hash stored in ``caption_files``), is kept unless ``overwrite``; an overwritten file is
first copied to ``.curate/caption_backups/<time>/``. Each write is journaled (``caption_pending`` before,
``caption_files`` right after), so a killed run still knows every file it wrote as curate's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from ..errors import CurateError
from ..io import STATE_DIR, atomic_write_text
from ..manifest import ImageRecord, Manifest

TABLES = """
CREATE TABLE IF NOT EXISTS caption_files (
    target  TEXT PRIMARY KEY,       -- caption file path, or metadata.jsonl::<image path>
    sha256  TEXT,
    digest  TEXT NOT NULL,          -- hash of the text curate wrote there
    at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS caption_pending (
    target  TEXT PRIMARY KEY,       -- a caption file curate is about to write (committed before the write)
    sha256  TEXT,
    digest  TEXT NOT NULL,
    at      REAL NOT NULL
);
"""

FORMATS = {"txt": ".txt", "caption": ".caption", "jsonl": "metadata.jsonl"}
SOURCES = ("tags", "caption", "both")
SETTINGS_KEY = "caption.settings"  # remembered CLI choices (JSON), layered over curate.toml

# Tags whose underscores are part of the face (kept as is), as the reference taggers do.
KAOMOJI = frozenset(
    "0_0 (o)_(o) +_+ +_- ._. <o>_<o> <|>_<|> =_= >_< 3_3 6_9 >_o @_@ ^_^ o_o u_u x_x |_| ||_||".split()
)


@dataclass(frozen=True)
class CaptionConfig:
    """``[caption]`` in curate.toml: how stored scores become caption text."""

    tagger: str = ""  # which stored tag scores to use ("": the last model tagged)
    general: float = 0.35  # threshold for general tags
    character: float = 0.85  # threshold for character tags
    mcut: bool = False  # adaptive MCut threshold instead (character: max(0.15, MCut))
    rating: bool = False  # add the most likely rating tag (general, sensitive, ...)
    trigger: tuple[str, ...] = ()  # first in every caption; keep_tokens = len(trigger)
    drop_common: float = 0.0  # drop tags present in more than this fraction of images (0: off)
    blacklist: tuple[str, ...] = ()
    replace: tuple[str, ...] = ()  # "old=new" pairs; new may be empty (same as blacklisting)
    underscores: bool = True  # long_hair -> long hair (kaomoji such as ^_^ kept)
    escape: bool = True  # ( ) -> \( \) so prompt weighting syntax does not eat them
    implied: bool = True  # drop "hair" when "long hair" is present
    max_tags: int = 0  # cap on general tags (0: no cap)
    source: str = "tags"  # tags | caption (BLIP) | both
    format: str = "txt"  # txt | caption | jsonl (metadata.jsonl)
    separator: str = ", "

    def __post_init__(self) -> None:
        for name in ("general", "character", "drop_common"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise CurateError(f"caption option {name} must be between 0 and 1, got {v}")
        if self.format not in FORMATS:
            raise CurateError(f"caption format {self.format!r} unknown; choose txt, caption or jsonl")
        if self.source not in SOURCES:
            raise CurateError(f"caption source {self.source!r} unknown; choose tags, caption or both")
        for pair in self.replace:
            if "=" not in pair:
                raise CurateError(f"replace entry {pair!r} needs the form old=new")

    @property
    def keep_tokens(self) -> int:
        return len(self.trigger)


CAPTION_KEYS = frozenset(f.name for f in dataclasses.fields(CaptionConfig)) - {"tagger"}


def _as_tuple(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return tuple(s.strip() for s in v.split(",") if s.strip())
    if isinstance(v, dict):
        return tuple(f"{k}={val}" for k, val in v.items())
    return tuple(str(s) for s in v)


def make_config(*layers: dict[str, Any]) -> CaptionConfig:
    """Merge option dicts (later wins; None values skipped) into a validated CaptionConfig."""
    names = {f.name for f in dataclasses.fields(CaptionConfig)}
    merged: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            if v is None:
                continue
            if k not in names:
                raise CurateError(f"unknown caption option {k!r}; valid: {', '.join(sorted(names))}")
            merged[k] = _as_tuple(v) if k in ("trigger", "blacklist", "replace") else v
    return CaptionConfig(**merged)


def remembered(manifest: Manifest) -> dict[str, Any]:
    raw = manifest.get_meta(SETTINGS_KEY)
    return json.loads(raw) if raw else {}


def remember(manifest: Manifest, changes: dict[str, Any]) -> None:
    current = remembered(manifest)
    for k, v in changes.items():
        if v is not None:
            current[k] = list(v) if isinstance(v, tuple) else v
    manifest.set_meta(SETTINGS_KEY, json.dumps(current))


# -- text forms ------------------------------------------------------------------------------------
def readable(tag: str, underscores: bool = True) -> str:
    """long_hair -> long hair; short kaomoji-like tags keep their underscores."""
    if not underscores or tag in KAOMOJI or len(tag) <= 3:
        return tag
    return tag.replace("_", " ")


def escape(tag: str) -> str:
    return tag.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _key(tag: str) -> str:
    """Matching form for blacklist/replace/common: readable, lower case."""
    return readable(tag.strip()).lower()


def implied_by(tag: str, others: list[str]) -> bool:
    """True when a more specific tag ends with this one as whole words ("hair" in "long hair")."""
    return any(o != tag and o.endswith(" " + tag) for o in others)


@dataclass
class Built:
    sha256: str
    paths: list[str]
    tags: list[str]  # final tag tokens in order (trigger, characters, general), escaped
    text: str
    dropped_common: list[str] = field(default_factory=list)


def select_tags(
    scores: dict[str, float], categories: dict[str, int], cfg: CaptionConfig
) -> tuple[list[tuple[str, float]], list[tuple[str, float]], str | None]:
    """(character tags, general tags, rating) above the thresholds, each list by confidence."""
    from ..models.wd14 import mcut_threshold

    gen = {t: s for t, s in scores.items() if categories.get(t, 0) == 0}
    chars = {t: s for t, s in scores.items() if categories.get(t) == 4}
    ratings = {t: s for t, s in scores.items() if categories.get(t) == 9}
    g_thr, c_thr = cfg.general, cfg.character
    if cfg.mcut:
        import numpy as np

        g_thr = mcut_threshold(np.array(list(gen.values()))) if gen else 1.0
        c_thr = max(0.15, mcut_threshold(np.array(list(chars.values())))) if chars else 1.0
    by_conf = lambda d, thr: sorted(((t, s) for t, s in d.items() if s >= thr), key=lambda x: (-x[1], x[0]))  # noqa: E731
    rating = max(ratings, key=ratings.get) if (cfg.rating and ratings) else None  # type: ignore[arg-type]
    return by_conf(chars, c_thr), by_conf(gen, g_thr), rating


def _edit_rules(cfg: CaptionConfig) -> tuple[dict[str, str], set[str], list[str], set[str]]:
    """(replace map, blacklist, trigger words, trigger keys) of ``cfg``, in the matching form of ``_key``."""
    replace = {}
    for pair in cfg.replace:
        old, new = pair.split("=", 1)
        replace[_key(old)] = new.strip()
    triggers = [t.strip() for t in cfg.trigger if t.strip()]
    return replace, {_key(t) for t in cfg.blacklist}, triggers, {_key(t) for t in triggers}


def build_captions(
    records: list[ImageRecord],
    scores: dict[str, dict[str, float]],
    categories: dict[str, int],
    cfg: CaptionConfig,
    nl: dict[str, str] | None = None,
) -> list[Built]:
    """Caption text for every record from its stored scores / BLIP caption, under ``cfg``."""
    nl = nl or {}
    replace, black, triggers, trig_keys = _edit_rules(cfg)

    def transform(tags: list[tuple[str, float]]) -> list[str]:
        out = []
        for t, _ in tags:
            k = _key(t)
            if k in black or k in trig_keys:
                continue
            if k in replace:
                new = replace[k]
                if not new:
                    continue
                out.append(new)
            else:
                out.append(readable(t, cfg.underscores))
        return list(dict.fromkeys(out))  # replacements may collide

    per_image = []
    for rec in records:
        sc = scores.get(rec.sha256)
        if sc is None:
            per_image.append((rec, [], [], None))
            continue
        chars, gen, rating = select_tags(sc, categories, cfg)
        per_image.append((rec, transform(chars), transform(gen), rating))

    # Common tags: in more than drop_common of the tagged images.
    common: set[str] = set()
    tagged = [p for p in per_image if p[0].sha256 in scores]
    if cfg.drop_common > 0 and tagged:
        freq = Counter(t for _, c, g, _ in tagged for t in set(c + g))
        common = {t for t, n in freq.items() if n / len(tagged) > cfg.drop_common}

    out = []
    for rec, chars, gen, rating in per_image:
        sentence = nl.get(rec.sha256, "").strip()
        if rec.sha256 not in scores and not sentence:
            continue  # nothing known about this image
        dropped = sorted(t for t in set(chars + gen) if t in common)
        chars = [t for t in chars if t not in common]
        gen = [t for t in gen if t not in common]
        if cfg.implied:
            allg = chars + gen
            gen = [t for t in gen if not implied_by(t, allg)]
        if cfg.max_tags > 0:
            gen = gen[: cfg.max_tags]
        if rating:
            gen.append(readable(rating, cfg.underscores))
        fix = escape if cfg.escape else (lambda s: s)
        tags = triggers + [fix(t) for t in chars] + [fix(t) for t in gen]
        parts = list(triggers)
        if cfg.source == "caption" and sentence:
            parts.append(sentence)  # sentence only: "trigger, a photo of ..."
        else:  # tags, both, or caption without a sentence for this image (fall back to tags)
            parts += [fix(t) for t in chars]
            if cfg.source == "both" and sentence:
                parts.append(sentence)
            parts += [fix(t) for t in gen]
        out.append(Built(rec.sha256, rec.paths, tags, cfg.separator.join(parts), dropped))
    return out


# -- writing ---------------------------------------------------------------------------------------
def jsonl_name(value: Any) -> str:
    """A metadata.jsonl ``file_name`` as a path relative to the file's folder: ``./a.png`` and ``sub//a.png``
    are ``a.png`` and ``sub/a.png`` (HF imagefolder joins it to the folder, so it finds them)."""
    name = str(value).replace("\\", "/")
    return posixpath.normpath(name) if name else name


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def sidecar(path: str, fmt: str) -> str:
    """Caption file next to an image: ``a/b.png`` -> ``a/b.txt`` (kohya / most trainers)."""
    return str(PurePosixPath(path).with_suffix(FORMATS[fmt]))


@dataclass
class WriteResult:
    written: list[str] = field(default_factory=list)
    unchanged: int = 0
    kept_user: list[str] = field(default_factory=list)  # existing captions curate did not write
    kept_edited: list[str] = field(default_factory=list)  # files edited by hand since curate wrote them
    backed_up: list[str] = field(default_factory=list)
    backup_dir: str | None = None
    collisions: list[str] = field(default_factory=list)  # images sharing a caption file name (a.png, a.jpg)
    # a person's captions that an edit would change, left as they are (applied with --overwrite)
    not_applied: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _current_text(manifest: Manifest, target: str) -> str | None:
    """What is at a caption target now: a file's text, or a metadata.jsonl entry's text."""
    root = manifest.root
    if "::" in target:
        meta_rel, image = target.split("::", 1)
        meta = root / meta_rel
        if not meta.exists():
            return None
        prefix = str(PurePosixPath(meta_rel).parent)
        name = image if prefix == "." else image[len(prefix) + 1 :]
        for line in meta.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and jsonl_name(obj.get("file_name")) == name:
                return obj.get("text")
        return None
    f = root / target
    try:
        data = f.read_bytes()
    except OSError:
        return None
    return data.decode("utf-8", "replace")


def reconcile_pending(manifest: Manifest) -> int:
    """Settle writes a killed run journaled: written ones become curate's, the others are forgotten."""
    manifest.ensure_table(TABLES)
    pending = manifest.conn.execute("SELECT target, sha256, digest, at FROM caption_pending").fetchall()
    if not pending:
        return 0
    with manifest.transaction():
        for target, sha, dig, at in pending:
            cur = _current_text(manifest, target)
            if cur is not None and digest(cur) == dig:
                manifest.conn.execute(
                    "INSERT OR REPLACE INTO caption_files(target, sha256, digest, at) VALUES (?,?,?,?)",
                    (target, sha, dig, at),
                )
            manifest.conn.execute("DELETE FROM caption_pending WHERE target=?", (target,))
    return len(pending)


class _Writer:
    def __init__(self, manifest: Manifest, overwrite: bool) -> None:
        manifest.ensure_table(TABLES)
        reconcile_pending(manifest)
        self.m = manifest
        self.overwrite = overwrite
        self.res = WriteResult()
        self.ours = dict(manifest.conn.execute("SELECT target, digest FROM caption_files").fetchall())
        self.stamp = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]  # unique per run

    def backup(self, rel: str, text: str) -> None:
        bdir = self.m.root / STATE_DIR / "caption_backups" / self.stamp
        self.res.backup_dir = str(bdir)
        atomic_write_text(bdir / rel, text)
        self.res.backed_up.append(rel)

    def decide(self, target: str, current: str | None, text: str) -> tuple[bool, str]:
        """(write?, effective text) for a caption whose present content is ``current``."""
        if current is None:
            return True, text
        mine = self.ours.get(target)
        if mine is not None and digest(current) == mine:
            if current == text:
                self.res.unchanged += 1
                return False, current
            return True, text
        if not self.overwrite:
            (self.res.kept_user if mine is None else self.res.kept_edited).append(target)
            return False, current
        return True, text

    def begin(self, entries: list[tuple[str, str, str]]) -> list[tuple[str, str, str, float]]:
        """Journal (target, sha, text) writes about to happen; committed before the files change."""
        rows = [(t, sha, digest(text), time.time()) for t, sha, text in entries]
        with self.m.transaction():
            self.m.conn.executemany(
                "INSERT OR REPLACE INTO caption_pending(target, sha256, digest, at) VALUES (?,?,?,?)", rows
            )
        return rows

    def done(self, rows: list[tuple[str, str, str, float]]) -> None:
        """The journaled writes happened: record them as curate's (right after the write)."""
        with self.m.transaction():
            self.m.conn.executemany(
                "INSERT OR REPLACE INTO caption_files(target, sha256, digest, at) VALUES (?,?,?,?)", rows
            )
            self.m.conn.executemany("DELETE FROM caption_pending WHERE target=?", [(r[0],) for r in rows])


def write_captions(
    manifest: Manifest, built: list[Built], fmt: str = "txt", *, overwrite: bool = False
) -> tuple[WriteResult, dict[str, str]]:
    """Write captions next to the images (or metadata.jsonl); returns the result and sha -> effective text."""
    if fmt not in FORMATS:
        raise CurateError(f"caption format {fmt!r} unknown; choose txt, caption or jsonl")
    w = _Writer(manifest, overwrite)
    effective: dict[str, str] = {}
    root = manifest.root
    if fmt == "jsonl":
        meta = root / "metadata.jsonl"
        entries: dict[str, dict[str, Any]] = {}
        original = meta.read_text(encoding="utf-8") if meta.exists() else ""
        for line in original.splitlines():
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise CurateError(f"{meta} has a line that is not JSON; fix or move it away") from None
                entries[jsonl_name(obj.get("file_name"))] = obj
        changed, overwrote_user = False, False
        todo: list[tuple[str, str, str]] = []
        for b in built:
            for p in b.paths:
                target = f"metadata.jsonl::{p}"
                cur = entries.get(p, {}).get("text")
                do, text = w.decide(target, cur, b.text)
                effective.setdefault(b.sha256, text)
                if do:
                    overwrote_user |= cur is not None and w.ours.get(target) != digest(cur)
                    entries[p] = {**entries.get(p, {}), "file_name": p, "text": b.text}
                    todo.append((target, b.sha256, b.text))
                    w.res.written.append(target)
                    changed = True
        if changed:
            if overwrote_user and original:
                w.backup("metadata.jsonl", original)
            body = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries.values())
            rows = w.begin(todo)
            atomic_write_text(meta, body)
            w.done(rows)
    else:
        owner: dict[str, str] = {}
        for b in built:
            for p in b.paths:
                rel = sidecar(p, fmt)
                if owner.setdefault(rel, b.sha256) != b.sha256:
                    w.res.collisions.append(p)  # a.png and a.jpg would share a.txt: first one wins
                    continue
                f = root / rel
                try:
                    cur = f.read_text(encoding="utf-8") if f.exists() else None
                except UnicodeDecodeError:
                    cur = f.read_bytes().decode("utf-8", "replace")
                do, text = w.decide(rel, cur, b.text)
                effective.setdefault(b.sha256, text.lstrip("\ufeff").strip())  # a BOM is no part of the text
                if do:
                    if cur is not None and w.ours.get(rel) != digest(cur):
                        w.backup(rel, cur)
                    rows = w.begin([(rel, b.sha256, b.text)])
                    atomic_write_text(f, b.text)
                    w.done(rows)
                    w.res.written.append(rel)
    manifest.update_images(
        (b.sha256, {"tags": b.tags, "caption": effective.get(b.sha256, b.text)}) for b in built
    )
    return w.res, effective


# -- the whole step --------------------------------------------------------------------------------
@dataclass
class CaptionResult:
    images: int
    keep_tokens: int
    trigger: list[str]
    write: WriteResult
    dropped_common: list[str]
    over_limit: list[tuple[str, int]]  # (path, tokens) over 75 CLIP tokens
    settings: dict[str, Any]
    # images whose caption (kept as a person wrote it) does not start with the trigger: the export pins none
    lack_trigger: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["write"] = self.write.as_dict()
        return d


def resolve_tagger(manifest: Manifest, cfg: CaptionConfig) -> str | None:
    from .tag import model_key, stored_models

    models = stored_models(manifest)
    if cfg.tagger:
        key = model_key(cfg.tagger)
        if key not in models:
            raise CurateError(
                f"no stored scores for tagger {cfg.tagger}; run `curate tag <dataset> --model {cfg.tagger}`"
            )
        return key
    last = manifest.get_meta("tag.model")
    return last if last in models else (models[-1] if models else None)


def edit_text(text: str, cfg: CaptionConfig) -> str:
    """A person's caption with an edit applied: blacklist / replace on its comma-separated parts, the
    trigger words first. Returns ``text`` itself when nothing changes."""
    replace, black, triggers, trig_keys = _edit_rules(cfg)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    out: list[str] = []
    for part in parts:
        k = _key(part)
        if k in black or k in trig_keys:
            continue
        new = replace.get(k, part)
        if new:
            out.append(new)
    out = list(dict.fromkeys(out))
    words = {w for p in out for w in p.split()}
    had = {_key(p) for p in parts}
    # A trigger tag moves first; a sentence that already names the trigger keeps it where it is.
    head = [t for t in triggers if _key(t) in had or t not in words]
    result = [*head, *out]
    return text if result == parts else cfg.separator.join(result)


def _edit_user_captions(
    manifest: Manifest, records: list[ImageRecord], cfg: CaptionConfig, res: WriteResult, overwrite: bool
) -> dict[str, str]:
    """Apply an edit to the captions people wrote; rewritten (backup first) only with ``overwrite``."""
    from .user_captions import new_stamp, sources, write_user_text

    src = sources(manifest)
    effective: dict[str, str] = {}
    stamp = PurePosixPath(res.backup_dir).name if res.backup_dir else new_stamp()
    for rec in records:
        hit = next((src[p] for p in rec.paths if p in src), None)
        if hit is None:
            continue
        target, text, _origin = hit
        new = edit_text(text, cfg)
        if new == text:
            res.unchanged += 1
            effective[rec.sha256] = text
            continue
        if not overwrite:
            res.not_applied.append(target)
            effective[rec.sha256] = text
            continue
        bdir = write_user_text(manifest, target, new, stamp=stamp, update=False)
        if bdir:
            res.backup_dir = bdir
            name = target.split("::", 1)[0]
            if name not in res.backed_up:
                res.backed_up.append(name)
        res.written.append(target)
        effective[rec.sha256] = new
    return effective


def rebuild(
    manifest: Manifest, cfg: CaptionConfig, *, overwrite: bool = False, edit_user: bool = False
) -> CaptionResult:
    """Rebuild and write every kept image's caption from stored scores and BLIP captions (seconds).

    With ``edit_user`` (``curate edit``) the captions people wrote are edited as text instead (blacklist,
    replace, trigger), and only rewritten with ``overwrite``; otherwise they are kept unless ``overwrite``.
    """
    from ..models.clip_tokenizer import MAX_TOKENS, count_tokens
    from .caption import load_nl_captions
    from .tag import load_categories, load_scores
    from .user_captions import refresh

    refresh(manifest)
    records = manifest.kept_images()
    model = resolve_tagger(manifest, cfg) if cfg.source != "caption" or cfg.tagger else None
    scores = load_scores(manifest, model) if model else {}
    categories = load_categories(manifest, model) if model else {}
    nl = load_nl_captions(manifest)
    users = [r for r in records if r.user_caption is not None] if edit_user else []
    if not scores and not nl and not users:
        raise CurateError(
            "no tags or captions stored yet; run `curate tag` or `curate caption` first "
            "(or put .txt captions beside the images and run `curate scan`)"
        )
    user_shas = {r.sha256 for r in users}
    built = build_captions([r for r in records if r.sha256 not in user_shas], scores, categories, cfg, nl)
    res, effective = write_captions(manifest, built, cfg.format, overwrite=overwrite)
    if users:
        edited = _edit_user_captions(manifest, users, cfg, res, overwrite)
        built += [Built(r.sha256, r.paths, [], edited[r.sha256]) for r in users if r.sha256 in edited]
        effective.update(edited)
    refresh(manifest)  # what curate just wrote is known as curate's, so a later edit shows as a change
    manifest.set_meta("caption.keep_tokens", str(cfg.keep_tokens))
    manifest.set_meta("caption.format", cfg.format)
    manifest.set_meta("caption.trigger", json.dumps(list(cfg.trigger)))
    texts = [effective.get(b.sha256, b.text) for b in built]
    over = [
        (b.paths[0], n)
        for b, n in zip(built, count_tokens(texts) if built else [], strict=True)
        if n is not None and n > MAX_TOKENS
    ]
    dropped = sorted({t for b in built for t in b.dropped_common})
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    from ..export.kohya import zero_repeat_folder  # a 0_name folder is not exported: it pins nothing

    n = len(cfg.trigger)  # compared as the export compares them (export/kohya.py's _stored_trigger_tokens)
    lack = [b.paths[0] for b, t in zip(built, texts, strict=True)
            if n and [p.strip() for p in t.split(",")][:n] != list(cfg.trigger)
            and not all(zero_repeat_folder(p) for p in b.paths)]  # fmt: skip
    return CaptionResult(len(built), cfg.keep_tokens, list(cfg.trigger), res, dropped, over, settings, lack)


# -- statistics and checks -------------------------------------------------------------------------
@dataclass
class TagStats:
    images: int
    tagged: int
    frequency: list[tuple[str, int, float]]  # (tag, images, fraction), most common first
    always: list[str]  # tags in every captioned image
    tokens: list[tuple[str, int | None]]  # (path, CLIP tokens of its caption)
    over_limit: int
    user_captions: int = 0  # images whose caption a person wrote (their comma-separated parts count as tags)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def tag_stats(manifest: Manifest) -> TagStats:
    """Tag frequencies, always-present tags and per-image CLIP token counts, from the manifest."""
    from ..models.clip_tokenizer import MAX_TOKENS, count_tokens
    from .user_captions import refresh

    refresh(manifest)
    recs = manifest.kept_images()
    tag_lists = {r.sha256: tags_of(r) for r in recs}
    tagged = [r for r in recs if tag_lists[r.sha256]]
    freq = Counter(t for r in tagged for t in set(tag_lists[r.sha256]))
    n = len(tagged)
    frequency = [(t, c, round(c / n, 4)) for t, c in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))]
    always = [t for t, c, _ in frequency if c == n] if n else []
    captioned = [r for r in recs if r.user_caption or r.caption]
    counts = count_tokens([r.user_caption or r.caption or "" for r in captioned])
    tokens = [(r.path, c) for r, c in zip(captioned, counts, strict=True)]
    over = sum(1 for _, c in tokens if c is not None and c > MAX_TOKENS)
    users = sum(1 for r in recs if r.user_caption)
    return TagStats(len(recs), n, frequency, always, tokens, over, users)


def tags_of(rec: ImageRecord) -> list[str]:
    """The tags an image's caption carries: a person's caption split on commas, else curate's tags."""
    if rec.user_caption:
        return list(dict.fromkeys(p.strip() for p in rec.user_caption.split(",") if p.strip()))
    return list(rec.tags or [])


def check_captions(manifest: Manifest, config: Any) -> list:
    """Rule "captions": only active once captions exist or a trigger is configured."""
    from ..models.clip_tokenizer import MAX_TOKENS, count_tokens
    from .check import Violation
    from .user_captions import _jsonl_entries, refresh

    manifest.ensure_table(TABLES)
    refresh(manifest)
    wrote = manifest.conn.execute("SELECT count(*) FROM caption_files").fetchone()[0]
    section = {**config.section("tag"), **config.section("caption")} if config is not None else {}
    trig = _as_tuple(section.get("trigger")) or tuple(
        json.loads(manifest.get_meta("caption.trigger") or "[]")
    )
    fmt = section.get("format") or manifest.get_meta("caption.format") or "txt"
    if fmt not in FORMATS:
        fmt = "txt"
    recs = manifest.kept_images()
    texts: dict[str, str | None] = {}
    if fmt == "jsonl":
        meta = manifest.root / "metadata.jsonl"  # lines that are not objects skipped, any encoding read
        entries = _jsonl_entries(meta) if meta.exists() else {}
        for r in recs:
            texts[r.path] = entries.get(r.path)
    else:
        for r in recs:
            f = manifest.root / sidecar(r.path, fmt)
            texts[r.path] = f.read_text(encoding="utf-8", errors="replace").strip() if f.exists() else None
    for r in recs:  # a caption a person wrote counts wherever it is (.txt, .caption, metadata.jsonl)
        if r.user_caption:
            texts[r.path] = r.user_caption
    if not wrote and not trig and not any(t is not None for t in texts.values()):
        return []  # a fresh dataset: no caption rules yet
    out = []
    present = [(p, t) for p, t in texts.items() if t]
    counts = count_tokens([t for _, t in present]) if present else []
    where = "metadata.jsonl" if fmt == "jsonl" else f"a {FORMATS[fmt]} file"
    for p, t in texts.items():
        if not t:  # missing or empty (kohya refuses an empty caption file)
            out.append(
                Violation(p, "no-caption", f"no caption in {where}; run `curate tag` or `curate caption`")
            )
    for (p, t), n in zip(present, counts, strict=True):
        if n is not None and n > MAX_TOKENS:
            out.append(
                Violation(p, "caption-too-long", f"{n} CLIP tokens > {MAX_TOKENS}; lower --max-tags or edit")
            )
        if trig:
            first = [s.strip() for s in t.split(",")]
            missing = [x for x in trig if x not in first]
            if missing:
                out.append(
                    Violation(
                        p,
                        "no-trigger",
                        f"caption lacks trigger {', '.join(missing)}; run `curate edit --trigger`",
                    )
                )
    return out


# -- the three entry points (Dataset.tag / caption / edit) -------------------------------------------
@dataclass
class Outcome:
    """What a tag / caption / edit call did: the model run (if any) and the captions written."""

    run: Any
    captions: CaptionResult

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run.as_dict() if self.run is not None else None,
            "captions": self.captions.as_dict(),
        }


def current_config(manifest: Manifest, config: Any, changes: dict[str, Any] | None = None) -> CaptionConfig:
    """Defaults < curate.toml [caption] < choices remembered from earlier commands < ``changes``."""
    section = config.section("caption") if config is not None else {}
    in_tag = (
        {k: v for k, v in config.section("tag").items() if k in CAPTION_KEYS} if config is not None else {}
    )
    return make_config(in_tag, section, remembered(manifest), changes or {})


def apply_changes(
    manifest: Manifest, config: Any, changes: dict[str, Any], *, overwrite: bool, edit_user: bool = False
) -> CaptionResult:
    """Validate, remember and apply caption option changes, then rewrite every caption."""
    cfg = current_config(manifest, config, changes)
    remember(manifest, changes)
    return rebuild(manifest, cfg, overwrite=overwrite, edit_user=edit_user)
