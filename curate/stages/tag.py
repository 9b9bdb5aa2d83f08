"""WD14 tagging: run the tagger once per image and model, cache every score above a low floor.

Scores live in the ``tag_scores`` table (one JSON object per image and model), tag categories in
``tag_labels``; captions are built from these later (``stages/captions.py``), so a new threshold,
blacklist or trigger word never runs the model again.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CurateError
from ..io import DecodeError, open_rgb
from ..manifest import ImageRecord, Manifest

DEFAULT_TAGGER = "SmilingWolf/wd-swinv2-tagger-v3"

TABLES = """
CREATE TABLE IF NOT EXISTS tag_scores (
    sha256  TEXT NOT NULL,
    model   TEXT NOT NULL,
    scores  TEXT NOT NULL,          -- JSON {tag name: probability} for every tag >= floor
    at      REAL NOT NULL,
    PRIMARY KEY (sha256, model)
);
CREATE TABLE IF NOT EXISTS tag_labels (
    model    TEXT NOT NULL,
    name     TEXT NOT NULL,
    category INTEGER NOT NULL,      -- 0 general, 4 character, 9 rating (selected_tags.csv)
    PRIMARY KEY (model, name)
);
"""


@dataclass(frozen=True)
class TagConfig:
    """``[tag]`` in curate.toml: which tagger runs and how."""

    model: str = DEFAULT_TAGGER
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 32
    floor: float = 0.05  # scores below this are not stored
    workers: int = 0  # decode threads (0: cores, at most 8)
    force: bool = False  # re-run images that already have scores for this model


@dataclass
class TagRun:
    model: str
    inferred: int
    cached: int
    failed: list[tuple[str, str]]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def model_key(model: str) -> str:
    """How scores are keyed: the repo id, or the absolute path of a local model."""
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


def stored_models(manifest: Manifest) -> list[str]:
    manifest.ensure_table(TABLES)
    return [r[0] for r in manifest.conn.execute("SELECT DISTINCT model FROM tag_labels ORDER BY model")]


def load_scores(manifest: Manifest, model: str) -> dict[str, dict[str, float]]:
    manifest.ensure_table(TABLES)
    rows = manifest.conn.execute("SELECT sha256, scores FROM tag_scores WHERE model=?", (model,))
    return {sha: json.loads(s) for sha, s in rows}


def load_categories(manifest: Manifest, model: str) -> dict[str, int]:
    manifest.ensure_table(TABLES)
    rows = manifest.conn.execute("SELECT name, category FROM tag_labels WHERE model=?", (model,))
    return dict(rows.fetchall())


def _read(root: Path, rec: ImageRecord, size: int):
    from ..models.wd14 import preprocess

    try:
        return preprocess(open_rgb(root / rec.path), size), None
    except DecodeError as exc:
        return None, f"{exc.reason}: {exc.detail}"
    except OSError as exc:
        return None, str(exc)


def tag_images(
    manifest: Manifest,
    cfg: TagConfig = TagConfig(),
    *,
    records: list[ImageRecord] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TagRun:
    """Score every kept image that has no scores for ``cfg.model`` yet (all of them with ``force``)."""
    if not 0.0 <= cfg.floor < 1.0:
        raise CurateError(f"tag floor must be in [0, 1), got {cfg.floor}")
    if cfg.batch_size < 1:
        raise CurateError(f"batch size must be at least 1, got {cfg.batch_size}")
    manifest.ensure_table(TABLES)
    key = model_key(cfg.model)
    records = manifest.kept_images() if records is None else records
    done = set() if cfg.force else set(load_scores(manifest, key))
    todo = [r for r in records if r.sha256 not in done]
    t0 = time.perf_counter()
    failed: list[tuple[str, str]] = []
    if todo:
        from ..models.wd14 import load_tagger

        tagger = load_tagger(cfg.model, cfg.device)
        labels = tagger.labels
        with manifest.transaction():
            manifest.conn.execute("DELETE FROM tag_labels WHERE model=?", (key,))
            manifest.conn.executemany(
                "INSERT INTO tag_labels(model, name, category) VALUES (?,?,?)",
                [(key, n, int(c)) for n, c in zip(labels.names, labels.categories, strict=True)],
            )
        rating = labels.categories == 9
        names = np.array(labels.names, dtype=object)
        workers = cfg.workers or min(8, os.cpu_count() or 1)
        n_done = 0
        # Decoding + preprocessing runs ahead in threads (PIL releases the GIL) while the model runs.
        with ThreadPoolExecutor(workers) as pool:
            pending: deque = deque()
            it = iter(todo)
            ahead = cfg.batch_size * 2

            def fill() -> None:
                while len(pending) < ahead:
                    rec = next(it, None)
                    if rec is None:
                        return
                    pending.append((rec, pool.submit(_read, manifest.root, rec, tagger.size)))

            fill()
            while pending:
                batch, arrays = [], []
                while pending and len(batch) < cfg.batch_size:
                    rec, fut = pending.popleft()
                    arr, err = fut.result()
                    if arr is None:
                        failed.append((rec.path, err or "unreadable"))
                        continue
                    batch.append(rec)
                    arrays.append(arr)
                fill()
                if not batch:
                    continue
                probs = tagger.predict(np.stack(arrays))
                rows = []
                for rec, p in zip(batch, probs, strict=True):
                    keep = (p >= cfg.floor) | rating
                    scores = {str(n): round(float(s), 4) for n, s in zip(names[keep], p[keep], strict=True)}
                    rows.append((rec.sha256, key, json.dumps(scores), time.time()))
                with manifest.transaction():
                    manifest.conn.executemany(
                        "INSERT OR REPLACE INTO tag_scores(sha256, model, scores, at) VALUES (?,?,?,?)", rows
                    )
                n_done += len(batch)
                if progress:
                    progress(n_done + len(failed), len(todo))
    manifest.set_meta("tag.model", key)
    return TagRun(key, len(todo) - len(failed), len(records) - len(todo), failed, time.perf_counter() - t0)
