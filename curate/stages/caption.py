"""Natural-language captions with BLIP, batched; one stored caption per image, model and options."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import CurateError
from ..io import DecodeError, open_rgb
from ..manifest import ImageRecord, Manifest

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"

TABLES = """
CREATE TABLE IF NOT EXISTS nl_captions (
    sha256  TEXT NOT NULL,
    model   TEXT NOT NULL,
    opts    TEXT NOT NULL,          -- digest of the generation options that produced it
    text    TEXT NOT NULL,
    at      REAL NOT NULL,
    PRIMARY KEY (sha256, model)
);
"""


@dataclass(frozen=True)
class BlipConfig:
    """``[blip]`` in curate.toml."""

    model: str = DEFAULT_CAPTIONER
    device: str = "auto"
    dtype: str = "auto"  # auto (bf16/fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16
    batch_size: int = 16
    num_beams: int = 3
    min_length: int = 5
    max_length: int = 40
    repetition_penalty: float = 1.0
    prompt: str = ""  # conditional prefix, e.g. "a photograph of"
    max_side: int = 768  # images are decoded at most this large (BLIP resizes to 384 anyway)
    force: bool = False

    def digest(self) -> str:
        keys = ("num_beams", "min_length", "max_length", "repetition_penalty", "prompt")
        d = {k: getattr(self, k) for k in keys}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class CaptionRun:
    model: str
    generated: int
    cached: int
    failed: list[tuple[str, str]]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_nl_captions(manifest: Manifest, model: str | None = None) -> dict[str, str]:
    """sha256 -> caption for ``model`` (default: the last model used)."""
    manifest.ensure_table(TABLES)
    model = model or manifest.get_meta("caption.model")
    if not model:
        return {}
    rows = manifest.conn.execute("SELECT sha256, text FROM nl_captions WHERE model=?", (model,))
    return dict(rows.fetchall())


def caption_images(
    manifest: Manifest,
    cfg: BlipConfig = BlipConfig(),
    *,
    records: list[ImageRecord] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CaptionRun:
    """Caption every kept image lacking a caption from ``cfg.model`` with the same options."""
    if cfg.batch_size < 1:
        raise CurateError(f"batch size must be at least 1, got {cfg.batch_size}")
    if cfg.min_length > cfg.max_length:
        raise CurateError(f"--min-length {cfg.min_length} exceeds --max-length {cfg.max_length}")
    manifest.ensure_table(TABLES)
    from .tag import model_key

    key = model_key(cfg.model)
    digest = cfg.digest()
    records = manifest.kept_images() if records is None else records
    have = {
        sha
        for sha, opts in manifest.conn.execute("SELECT sha256, opts FROM nl_captions WHERE model=?", (key,))
        if opts == digest
    }
    todo = [r for r in records if cfg.force or r.sha256 not in have]
    failed: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    if todo:
        from ..models.blip import generate_captions, load_blip

        processor, net, dtype = load_blip(cfg.model, cfg.device, cfg.dtype)

        def read(rec: ImageRecord):
            try:
                return open_rgb(manifest.root / rec.path, max_side=cfg.max_side), None
            except (DecodeError, OSError) as exc:
                return None, str(exc)

        done = 0
        with ThreadPoolExecutor(4) as pool:
            chunks = [todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
            futures = [pool.map(read, chunks[0])] if chunks else []
            for k, chunk in enumerate(chunks):
                if k + 1 < len(chunks):  # decode the next batch while this one generates
                    futures.append(pool.map(read, chunks[k + 1]))
                loaded = list(futures[k])
                good = [(r, img) for r, (img, _) in zip(chunk, loaded, strict=True) if img is not None]
                failed += [
                    (r.path, e or "unreadable")
                    for r, (img, e) in zip(chunk, loaded, strict=True)
                    if img is None
                ]
                if good:
                    texts = generate_captions(
                        processor,
                        net,
                        [img for _, img in good],
                        dtype=dtype,
                        prompt=cfg.prompt,
                        num_beams=cfg.num_beams,
                        min_length=cfg.min_length,
                        max_length=cfg.max_length,
                        repetition_penalty=cfg.repetition_penalty,
                    )
                    with manifest.transaction():
                        manifest.conn.executemany(
                            "INSERT OR REPLACE INTO nl_captions(sha256, model, opts, text, at) VALUES (?,?,?,?,?)",
                            [
                                (r.sha256, key, digest, t, time.time())
                                for (r, _), t in zip(good, texts, strict=True)
                            ],
                        )
                done += len(chunk)
                if progress:
                    progress(done, len(todo))
    manifest.set_meta("caption.model", key)
    manifest.set_meta("caption.options", json.dumps(asdict(cfg)))
    return CaptionRun(
        key, len(todo) - len(failed), len(records) - len(todo), failed, time.perf_counter() - t0
    )
