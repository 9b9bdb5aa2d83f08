"""Image embeddings with a cache in the manifest, and the input pipeline that keeps the GPU busy.

Cache: table ``clip_embeddings`` keyed by (image SHA-256, model id, pretrained tag), L2-normalised
float16 blobs. An unchanged image is never encoded twice for the same model.

Pipeline: a torch DataLoader with parallel workers reads each file once, decodes it (JPEG at a reduced
DCT scale that is still at least the model's input size), applies the model's own resize + centre crop
and returns uint8 crops, one per distinct preprocessing spec, so several models share a single decode.
Batches travel in pinned memory; normalisation happens on the device.

GPU decode (default when a model is on CUDA; ``gpu_decode`` / ``[clip] gpu_decode`` forces it on or off):
workers only read the bytes and parse headers; plain JPEGs are batch-decoded by nvJPEG (the hardware
decoder on A100/H100) and resized + centre-cropped on the GPU in a background thread that overlaps the
model. Other files (PNG, WebP, CMYK, progressive, EXIF-rotated, truncated) still take the CPU path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

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


# GPU decode: JPEGs larger than this go to the CPU path (reduced-scale DCT decode), sparing GPU memory.
GPU_MAX_PIXELS = 50_000_000
# Decoded pixels held on the GPU at once (one nvJPEG call); a batch is split into calls under this budget.
GPU_BATCH_PIXELS = 400_000_000  # 1.2 GB of RGB
# Share of GPU-decodable JPEGs still decoded by the CPU workers (which otherwise only read bytes).
CPU_SHARE = 0.0
_TORCH_INTERP = {"bicubic": ("bicubic", True), "bilinear": ("bilinear", True), "nearest": ("nearest", False),
                 "lanczos": ("bicubic", True)}  # fmt: skip


def jpeg_gpu_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) when nvJPEG can decode ``data`` as is, else None (the CPU path handles it).

    Header parse only, no decode: a baseline JPEG in YCbCr or grey, no EXIF rotation, a sane size, and an
    end-of-image marker (truncated downloads go to the CPU decoder, which rejects them). Progressive JPEGs
    go to the CPU too: nvJPEG decodes them one at a time with host-side Huffman, slower than 16 workers.
    """
    import io

    from PIL import Image

    if len(data) < 128 or data[:3] != b"\xff\xd8\xff" or b"\xff\xd9" not in data[-64:]:
        return None
    try:
        img = Image.open(io.BytesIO(data))
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return None
        info = img.info
        if "progressive" in info or "progression" in info:
            return None
        if img.mode == "RGB" and "adobe" in info and info.get("adobe_transform") == 0:
            return None  # stored as RGB, not YCbCr
        w, h = img.size
        if min(w, h) < 16 or w * h > GPU_MAX_PIXELS:
            return None
        if img.getexif().get(0x0112, 1) != 1:
            return None
    except Exception:  # anything odd: let the CPU decoder judge the file
        return None
    return w, h


class _Images:
    """Map-style dataset: index -> (index, ok, crops per spec or None, JPEG bytes or None).

    With ``raw`` set, JPEGs that :func:`jpeg_gpu_size` accepts come back as bytes for the GPU decoder;
    every other file is decoded and cropped here, as without it. ``cpu_share`` (0..1) of those JPEGs are
    still decoded here, so otherwise idle workers add their throughput to the GPU decoder's.
    """

    def __init__(
        self, paths: Sequence[str], specs: Sequence[Spec], raw: bool = False, cpu_share: float = 0.0
    ):
        self.paths = list(paths)
        self.specs = list(specs)
        self.draft = max(s[0] for s in specs)
        self.raw = raw
        self.cpu_per_100 = round(100 * cpu_share)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int):
        from ..io import DecodeError, decode_image

        try:
            data = Path(self.paths[k]).read_bytes()
            size = jpeg_gpu_size(data) if self.raw and (k * 37) % 100 >= self.cpu_per_100 else None
            if size is not None:
                return k, True, None, (np.frombuffer(data, np.uint8), size[0] * size[1])
            img = decode_image(data, draft_size=self.draft).image
            crops = [crop_for(img, s) for s in self.specs]
            return k, True, crops, None
        except (OSError, DecodeError):
            return k, False, [np.zeros((3, s[0], s[0]), np.uint8) for s in self.specs], None


class _Chunk(NamedTuple):
    """A batch in transit: rows decoded on the CPU (``crops`` at ``cpu_pos``) and JPEG bytes (at ``raw_pos``)."""

    idx: Any  # int64 [B] dataset indices
    ok: Any  # bool [B]
    crops: list  # per spec: uint8 [n_cpu, 3, S, S]
    cpu_pos: Any  # int64 [n_cpu] rows of the batch
    raw: list  # uint8 tensors, each holding the JPEG files of one worker chunk back to back
    raw_len: list  # int64 [files in that tensor] per tensor of ``raw``
    raw_pos: Any  # int64 [n_raw]
    raw_px: Any  # int64 [n_raw] pixels of each JPEG (from its header)


def _collate(items, sizes: Sequence[int]) -> _Chunk:
    import torch

    cpu = [j for j, it in enumerate(items) if it[3] is None]
    raw = [j for j, it in enumerate(items) if it[3] is not None]
    crops = [
        torch.from_numpy(np.stack([items[j][2][s] for j in cpu]))
        if cpu
        else torch.empty((0, 3, size, size), dtype=torch.uint8)
        for s, size in enumerate(sizes)
    ]
    blobs = [items[j][3][0] for j in raw]
    return _Chunk(
        torch.tensor([it[0] for it in items], dtype=torch.long),
        torch.tensor([it[1] for it in items], dtype=torch.bool),
        crops,
        torch.tensor(cpu, dtype=torch.long),
        [torch.from_numpy(np.concatenate(blobs))] if blobs else [],
        [torch.tensor([len(b) for b in blobs], dtype=torch.long)] if blobs else [],
        torch.tensor(raw, dtype=torch.long),
        torch.tensor([items[j][3][1] for j in raw], dtype=torch.long),
    )


def _rebatch(loader, batch_size: int):
    """Concatenate loader chunks into batches of ``batch_size`` (the last may be smaller)."""

    buf: list = []
    count = 0
    for item in loader:
        buf.append(item)
        count += len(item.idx)
        if count >= batch_size:
            yield _cat(buf)
            buf, count = [], 0
    if buf:
        yield _cat(buf)


def _cat(items: list[_Chunk]) -> _Chunk:
    import torch

    if len(items) == 1:
        return items[0]
    base = np.cumsum([0] + [len(it.idx) for it in items[:-1]])
    return _Chunk(
        torch.cat([it.idx for it in items]),
        torch.cat([it.ok for it in items]),
        [torch.cat([it.crops[s] for it in items]) for s in range(len(items[0].crops))],
        torch.cat([it.cpu_pos + int(b) for it, b in zip(items, base, strict=True)]),
        [r for it in items for r in it.raw],  # no copy: views into each chunk's buffer are decoded
        [r for it in items for r in it.raw_len],
        torch.cat([it.raw_pos + int(b) for it, b in zip(items, base, strict=True)]),
        torch.cat([it.raw_px for it in items]),
    )


def resize_crop(img, spec: Spec):
    """GPU twin of :func:`crop_for`: uint8 [C, H, W] (C = 1 or 3, any device) -> float [3, S, S], unrounded.

    Same geometry as ``crop_for`` (short side -> S, centre crop; or squash), resampled by torch with
    antialiasing, whose bicubic kernel is PIL's (a = -0.5).
    """
    import torch.nn.functional as F

    size, interp, mode = spec
    tmode, aa = _TORCH_INTERP.get(interp, ("bicubic", True))
    x = img[None].float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    if mode == "squash":
        nw = nh = size
        left = top = 0
    else:  # "shortest" (and "longest", as in crop_for)
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    if (nw, nh) != (w, h):
        kw = {"antialias": aa, "align_corners": False} if tmode != "nearest" else {}
        x = F.interpolate(x, size=(nh, nw), mode=tmode, **kw)
    return x[0, :, top : top + size, left : left + size]


def _to_uint8(x):
    import torch

    return x.round_().clamp_(0, 255).to(torch.uint8)


def _decode_jpegs(datas: list, device) -> list:
    """Decode JPEG byte tensors on ``device`` in one nvJPEG call; a failure is isolated to its image (None)."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision >= 0.29 marks its decoders deprecated (in favour of torchcodec); an identical filter
    # is replaced, not stacked, so adding it on every call is cheap.
    warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        if len(datas) == 1:
            return [None]
    return [_decode_jpegs([d], device)[0] for d in datas]


_PROBED: dict[str, bool] = {}


def gpu_decode_available(device: str) -> bool:
    """Whether torchvision can decode JPEGs on ``device`` here (nvJPEG build, working driver)."""
    if device not in _PROBED:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (32, 24), (200, 30, 90)).save(buf, "JPEG")
        try:
            import torch

            img = _decode_jpegs([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device)[0]
            _PROBED[device] = img is not None and tuple(img.shape) == (3, 24, 32)
        except (ImportError, RuntimeError, OSError):
            _PROBED[device] = False
    return _PROBED[device]


def _decode_crop(chunk: _Chunk, specs: Sequence[Spec], device, draft: int) -> tuple:
    """A chunk -> (idx, ok, [uint8 [B, 3, S, S] on ``device`` per spec]) in the original row order.

    JPEG bytes are decoded on ``device`` in calls of at most GPU_BATCH_PIXELS; an image nvJPEG rejects is
    retried with the CPU decoder and, if that fails too, is marked not ok (zeros).
    """
    import torch

    from ..io import DecodeError, decode_image

    n = len(chunk.idx)
    ok = chunk.ok.clone()
    outs = [torch.zeros((n, 3, s[0], s[0]), dtype=torch.uint8, device=device) for s in specs]
    if len(chunk.cpu_pos):
        pos = chunk.cpu_pos.to(device)
        for o, c in zip(outs, chunk.crops, strict=True):
            o[pos] = c.to(device, non_blocking=True)
    if not len(chunk.raw_pos):
        return chunk.idx, ok, outs
    datas = []
    for buf, lens in zip(chunk.raw, chunk.raw_len, strict=True):
        ends = np.cumsum(lens.numpy()).tolist()
        datas += [buf[e - ln : e] for e, ln in zip(ends, lens.tolist(), strict=True)]
    rows = chunk.raw_pos.tolist()
    pixels = chunk.raw_px.tolist()
    start = 0
    while start < len(datas):
        stop, budget = start, 0
        while stop < len(datas) and (stop == start or budget + pixels[stop] <= GPU_BATCH_PIXELS):
            budget += pixels[stop]
            stop += 1
        imgs = _decode_jpegs(datas[start:stop], device)
        per_spec: list[list] = [[] for _ in specs]
        for j, img in zip(range(start, stop), imgs, strict=True):
            if img is None:
                try:
                    pil = decode_image(datas[j].numpy().tobytes(), draft_size=draft).image
                    for si, s in enumerate(specs):
                        per_spec[si].append(torch.from_numpy(crop_for(pil, s)).to(device).float())
                except (OSError, DecodeError):
                    ok[rows[j]] = False
                    for si, s in enumerate(specs):
                        per_spec[si].append(torch.zeros((3, s[0], s[0]), device=device))
                continue
            for si, s in enumerate(specs):
                per_spec[si].append(resize_crop(img, s))
        del imgs
        pos = torch.tensor(rows[start:stop], dtype=torch.long, device=device)
        for o, crops in zip(outs, per_spec, strict=True):
            o[pos] = _to_uint8(torch.stack(crops))
        start = stop
    return chunk.idx, ok, outs


DECODE_THREADS = 2  # while one thread launches resize kernels, the other keeps the JPEG decoder busy


def _threaded(batches, specs: Sequence[Spec], device: str, draft: int, threads: int | None = None):
    """Decode + crop in background threads (each with its own CUDA stream), overlapping the model.

    nvJPEG calls block their thread but release the GIL, so the next batches decode while this one
    encodes. Batches may come out of order; each carries its dataset indices.
    """
    import contextlib
    import queue
    import threading

    import torch

    threads = threads or DECODE_THREADS
    cuda = str(device).startswith("cuda")
    q: queue.Queue = queue.Queue(maxsize=2 * threads)
    stop = threading.Event()
    done = object()
    source = iter(batches)
    source_lock = threading.Lock()  # a generator is not thread-safe

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            stream = torch.cuda.Stream(device) if cuda else None
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                while not stop.is_set():
                    with source_lock:
                        chunk = next(source, None)
                    if chunk is None:
                        break
                    out = _decode_crop(chunk, specs, device, draft)
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not put((out, event)):
                        return
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)
        put(done)

    pool = [
        threading.Thread(target=work, name=f"curate-jpeg-decode-{t}", daemon=True) for t in range(threads)
    ]
    for t in pool:
        t.start()
    running = len(pool)
    try:
        while running:
            item = q.get()
            if item is done:
                running -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            (idx, ok, crops), event = item
            if event is not None:
                current = torch.cuda.current_stream(torch.device(device))
                current.wait_event(event)
                for c in crops:
                    c.record_stream(current)  # allocated on a decode stream, used on this one
            yield idx, ok, crops
    finally:
        stop.set()
        for t in pool:
            t.join(timeout=10)


def _resolve_gpu_decode(gpu_decode: bool | None, models: Sequence) -> str | None:
    """Device to decode JPEGs on, or None for the CPU path. Auto: the first CUDA model's device."""
    from ..errors import CurateError

    if gpu_decode is False:
        return None
    dev = next((str(m.device) for m in models if str(m.device).startswith("cuda")), None)
    if gpu_decode is None:
        return dev if dev and gpu_decode_available(dev) else None
    dev = dev or str(models[0].device)  # forced on a CPU model: torchvision's CPU decoder, same code path
    if not gpu_decode_available(dev):
        raise CurateError(
            f"gpu_decode is on but torchvision cannot decode JPEGs on {dev} (no nvJPEG build?); "
            "set gpu_decode = false in [clip]"
        )
    return dev


def crop_batches(
    paths: Sequence[str],
    specs: Sequence[Spec],
    *,
    batch_size: int = 256,
    workers: int = 0,
    decode_device: str | None = None,
    pin: bool = False,
    cpu_share: float | None = None,
):
    """Yield (indices, ok, [uint8 crops [B, 3, S, S] per spec]) for ``paths``, every file read once.

    ``decode_device`` None: workers decode and crop on the CPU. Otherwise workers only read bytes (and
    decode what nvJPEG cannot take); JPEGs are decoded and cropped on that device in a background thread,
    but for ``cpu_share`` of them (default CPU_SHARE), which the workers decode too.
    """
    from functools import partial

    from torch.utils.data import DataLoader

    raw = decode_device is not None
    # Workers hand over small chunks (even load, early first batch); batches are assembled here. Reading
    # bytes is cheap, so raw chunks are larger (fewer hand-overs).
    chunk = (64 if raw else 32) if workers else batch_size
    loader = DataLoader(
        _Images(paths, specs, raw=raw, cpu_share=CPU_SHARE if cpu_share is None else cpu_share),
        batch_size=min(chunk, batch_size),
        num_workers=workers,
        collate_fn=partial(_collate, sizes=[s[0] for s in specs]),
        pin_memory=pin and not raw,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    batches = _rebatch(loader, batch_size)
    if raw:
        yield from _threaded(batches, specs, decode_device, max(s[0] for s in specs))
    else:
        for ch in batches:
            yield ch.idx, ch.ok, ch.crops  # all rows decoded on the CPU, in order


def encode_paths(
    paths: Sequence[str],
    models: Sequence,
    *,
    batch_size: int = 256,
    workers: int | None = None,
    gpu_decode: bool | None = None,
    cpu_share: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_batch: Callable[[np.ndarray, list[np.ndarray]], None] | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Encode image files with every model in ``models`` from one decode per file.

    Returns (ok mask [N], [embeddings float32 [N, D_m] per model]); rows of undecodable files are zero.
    ``gpu_decode``: decode JPEGs with nvJPEG on the model's GPU (None = when a model is on CUDA).
    ``on_batch(indices, [emb per model])`` is called after each batch (used to commit to the cache).
    """
    n = len(paths)
    specs: list[Spec] = []
    for m in models:
        if m.preprocess_spec not in specs:
            specs.append(m.preprocess_spec)
    spec_of = [specs.index(m.preprocess_spec) for m in models]
    if workers is None:
        workers = min(os.cpu_count() or 1, 32) if n >= 4 * batch_size or n >= 512 else 0
    cuda = any(str(m.device).startswith("cuda") for m in models)
    decode_device = _resolve_gpu_decode(gpu_decode, models) if n else None
    batches = crop_batches(
        paths,
        specs,
        batch_size=batch_size,
        workers=workers,
        decode_device=decode_device,
        pin=cuda,
        cpu_share=cpu_share,
    )
    ok_all = np.zeros(n, bool)
    outs = [np.zeros((n, 0), np.float32) for _ in models]
    done = 0
    for idx, ok, crops in batches:
        ii = idx.numpy()
        okn = ok.numpy()
        embs = []
        for mi, m in enumerate(models):
            e = m.encode(crops[spec_of[mi]]).numpy()
            if outs[mi].shape[1] == 0:
                outs[mi] = np.zeros((n, e.shape[1]), np.float32)
            e[~okn] = 0.0
            outs[mi][ii] = e
            embs.append(e)
        ok_all[ii] = okn
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
    gpu_decode: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
    encoder: Callable[..., tuple[np.ndarray, list[np.ndarray]]] | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Embeddings of ``records`` for each model: cached rows are read, the rest encoded once and stored.

    Returns (ok mask [N], [float32 L2-normalised [N, D] per model]). ``encoder`` replaces
    :func:`encode_paths` (curate.engine.ray_engine.clip_encoder: Ray actors); each batch that comes back
    is committed to the cache here.
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

        ok_new, _ = (encoder or encode_paths)(
            paths,
            models,
            batch_size=batch_size,
            workers=workers,
            gpu_decode=gpu_decode,
            progress=progress,
            on_batch=commit,
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
