"""Image embeddings with a cache in the manifest, and the input pipeline that keeps the GPU busy.

Cache: table ``clip_embeddings`` keyed by (image SHA-256, model id, pretrained tag), L2-normalised
float16 blobs. An unchanged image is never encoded twice for the same model.

Pipeline: a torch DataLoader with parallel workers reads each file once, decodes it (JPEG at a reduced
DCT scale that is still at least the model's input size), applies the model's own resize + centre crop
and returns uint8 crops, one per distinct preprocessing spec, so several models share a single decode.
Batches travel in pinned memory; normalisation happens on the device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..manifest import ImageRecord, Manifest

EMB_TABLE = """
CREATE TABLE IF NOT EXISTS clip_embeddings (
    sha256     TEXT NOT NULL,
    model      TEXT NOT NULL,
    pretrained TEXT NOT NULL,
    dim        INTEGER NOT NULL,
    vec        BLOB NOT NULL,     -- float16, L2-normalised
    PRIMARY KEY (sha256, model, pretrained)
);
"""

_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}  # PIL codes

Spec = tuple[int, str, str]  # (size, interpolation, resize_mode)


def crop_for(img, spec: Spec) -> np.ndarray:
    """open_clip's eval transform up to ToTensor, on a PIL RGB image -> uint8 array [3, S, S]."""
    size, interp, mode = spec
    resample = _RESAMPLE.get(interp, 3)
    w, h = img.size
    if mode == "squash":
        img = img.resize((size, size), resample)
    else:
        # "shortest": short side -> size, then centre crop (open_clip's Resize + CenterCrop).
        # "longest" (resize + pad) is used by no built-in config; it is treated as "shortest".
        # Resize only the source box that survives the crop: one resampling pass over fewer pixels.
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        if (nw, nh) == (w, h):
            img = img.crop((left, top, left + size, top + size))
        else:
            img = img.resize((size, size), resample, box=box)
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class _Images:
    """Map-style dataset: index -> (index, ok, crops per spec)."""

    def __init__(self, paths: Sequence[str], specs: Sequence[Spec]):
        self.paths = list(paths)
        self.specs = list(specs)
        self.draft = max(s[0] for s in specs)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int):
        from ..io import DecodeError, decode_image

        try:
            data = Path(self.paths[k]).read_bytes()
            img = decode_image(data, draft_size=self.draft).image
            crops = [crop_for(img, s) for s in self.specs]
            return k, True, crops
        except (OSError, DecodeError):
            return k, False, [np.zeros((3, s[0], s[0]), np.uint8) for s in self.specs]


def _collate(items):
    import torch

    idx = torch.tensor([it[0] for it in items], dtype=torch.long)
    ok = torch.tensor([it[1] for it in items], dtype=torch.bool)
    n_specs = len(items[0][2])
    crops = [torch.from_numpy(np.stack([it[2][s] for it in items])) for s in range(n_specs)]
    return idx, ok, crops


def _rebatch(loader, batch_size: int):
    """Concatenate loader chunks into batches of ``batch_size`` (the last may be smaller)."""

    buf: list = []
    count = 0
    for item in loader:
        buf.append(item)
        count += len(item[0])
        if count >= batch_size:
            yield _cat(buf)
            buf, count = [], 0
    if buf:
        yield _cat(buf)


def _cat(items):
    import torch

    if len(items) == 1:
        return items[0]
    idx = torch.cat([it[0] for it in items])
    ok = torch.cat([it[1] for it in items])
    crops = [torch.cat([it[2][s] for it in items]) for s in range(len(items[0][2]))]
    return idx, ok, crops


def encode_paths(
    paths: Sequence[str],
    models: Sequence,
    *,
    batch_size: int = 256,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_batch: Callable[[np.ndarray, list[np.ndarray]], None] | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Encode image files with every model in ``models`` from one decode per file.

    Returns (ok mask [N], [embeddings float32 [N, D_m] per model]); rows of undecodable files are zero.
    ``on_batch(indices, [emb per model])`` is called after each batch (used to commit to the cache).
    """
    from torch.utils.data import DataLoader

    n = len(paths)
    specs: list[Spec] = []
    for m in models:
        if m.preprocess_spec not in specs:
            specs.append(m.preprocess_spec)
    spec_of = [specs.index(m.preprocess_spec) for m in models]
    if workers is None:
        workers = min(os.cpu_count() or 1, 32) if n >= 4 * batch_size or n >= 512 else 0
    cuda = any(str(m.device).startswith("cuda") for m in models)
    # Workers decode small chunks (even load across workers, early first batch); the model sees
    # ``batch_size`` images at a time, assembled from chunks in the main process.
    chunk = min(batch_size, 32) if workers else batch_size
    loader = DataLoader(
        _Images(paths, specs),
        batch_size=chunk,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=cuda,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    ok_all = np.zeros(n, bool)
    outs = [np.zeros((n, 0), np.float32) for _ in models]
    done = 0
    for idx, ok, crops in _rebatch(loader, batch_size):
        ii = idx.numpy()
        embs = []
        for mi, m in enumerate(models):
            e = m.encode(crops[spec_of[mi]]).numpy()
            if outs[mi].shape[1] == 0:
                outs[mi] = np.zeros((n, e.shape[1]), np.float32)
            e[~ok.numpy()] = 0.0
            outs[mi][ii] = e
            embs.append(e)
        ok_all[ii] = ok.numpy()
        if on_batch is not None:
            on_batch(ii, embs)
        done += len(ii)
        if progress:
            progress(done, n)
    return ok_all, outs


def cached_embeddings(manifest: Manifest, model, shas: Sequence[str]) -> dict[str, np.ndarray]:
    """sha -> float16 vector for the images of ``shas`` already encoded by ``model``."""
    manifest.ensure_table(EMB_TABLE)
    out: dict[str, np.ndarray] = {}
    want = set(shas)
    rows = manifest.conn.execute(
        "SELECT sha256, vec FROM clip_embeddings WHERE model=? AND pretrained=?", model.key
    )
    for sha, blob in rows:
        if sha in want:
            out[sha] = np.frombuffer(blob, dtype=np.float16)
    return out


def embed_records(
    manifest: Manifest,
    records: Sequence[ImageRecord],
    models: Sequence,
    *,
    batch_size: int = 256,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Embeddings of ``records`` for each model: cached rows are read, the rest encoded once and stored.

    Returns (ok mask [N], [float32 L2-normalised [N, D] per model]).
    """
    manifest.ensure_table(EMB_TABLE)
    n = len(records)
    shas = [r.sha256 for r in records]
    have = [cached_embeddings(manifest, m, shas) for m in models]
    todo = [k for k, s in enumerate(shas) if any(s not in h for h in have)]
    ok = np.array([all(s in h for h in have) for s in shas], bool)
    if todo:
        paths = [str(manifest.root / records[k].path) for k in todo]

        def commit(ii: np.ndarray, embs: list[np.ndarray]) -> None:
            rows = []
            for mi, m in enumerate(models):
                for k, e in zip(ii, embs[mi], strict=True):
                    if np.any(e):
                        vec = e.astype(np.float16)
                        rows.append((shas[todo[k]], m.model_id, m.pretrained, len(vec), vec.tobytes()))
                        have[mi][shas[todo[k]]] = vec
            with manifest.transaction() as conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO clip_embeddings(sha256, model, pretrained, dim, vec)"
                    " VALUES (?,?,?,?,?)",
                    rows,
                )

        ok_new, _ = encode_paths(
            paths, models, batch_size=batch_size, workers=workers, progress=progress, on_batch=commit
        )
        ok[np.array(todo)] = ok_new
    outs = []
    for h in have:
        dim = next((len(v) for v in h.values()), 0)
        arr = np.zeros((n, dim), np.float32)
        for k, s in enumerate(shas):
            if s in h:
                arr[k] = h[s]
        norm = np.linalg.norm(arr, axis=1, keepdims=True)
        outs.append(np.divide(arr, norm, out=arr, where=norm > 0))  # undo float16 rounding of the norm
    return ok, outs
