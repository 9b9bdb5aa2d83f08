"""WD14 tagging: run the tagger once per image and model, cache every score above a low floor.

Scores live in the ``tag_scores`` table (one JSON object per image and model), tag categories in
``tag_labels``; captions are built from these later (``stages/captions.py``), so a new threshold,
blacklist or trigger word never runs the model again.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CurateError
from ..io import DecodeError, open_rgb
from ..manifest import ImageRecord, Manifest

DEFAULT_TAGGER = "SmilingWolf/wd-swinv2-tagger-v3"
PROCESS_DECODE_MIN = (
    512  # images before ``decode = "auto"`` starts worker processes (they take ~1 s to start)
)

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
    backend: str = "auto"  # auto (torch when timm weights + CUDA, else onnx) | torch | onnx
    batch_size: int = 0  # 0: 32, or sized to free GPU memory on the torch backend
    floor: float = 0.05  # scores below this are not stored
    workers: int = 0  # decode threads or processes (0: cores, at most 16)
    # auto (nvJPEG when the torch backend runs on CUDA, else CPU) | gpu | cpu (threads, or processes for big
    # GPU jobs) | threads | processes
    decode: str = "auto"
    compile: bool = False  # torch backend: torch.compile the model (a one-off compile of tens of seconds)
    dtype: str = "auto"  # torch backend: auto (bf16/fp16 autocast on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    force: bool = False  # re-run images that already have scores for this model


@dataclass
class TagRun:
    model: str
    inferred: int
    cached: int
    failed: list[tuple[str, str]]
    seconds: float
    backend: str = ""  # "" when every image came from the score cache
    device: str = ""
    runtime: str = ""  # one line: backend, device, provider / precision
    why: str = ""  # how the backend was chosen
    batch_size: int = 0
    decode: str = ""  # "threads x 16" / "processes x 16" / "nvJPEG on cuda:0 (2000) + threads x 16 (3)"
    decode_why: str = ""  # how the decoder was chosen
    gpu_decoded: int = 0  # images decoded on the GPU (nvJPEG); the rest went through the CPU decoder
    load_seconds: float = 0.0  # loading the model (part of ``seconds``)
    # seconds the tagging loop spent waiting for decoded batches, for the model's scores, and storing them:
    # which side holds the other back
    waits: dict[str, float] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """Tagging speed, model loading left out."""
        busy = self.seconds - self.load_seconds
        return self.inferred / busy if busy > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "images_per_second": round(self.images_per_second, 2)}


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


def _read(path: Path, prepare: Callable[[Any], np.ndarray]):
    try:
        return prepare(open_rgb(path)), None
    except DecodeError as exc:
        return None, f"{exc.reason}: {exc.detail}"
    except OSError as exc:
        return None, str(exc)


class _ThreadDecoder:
    """Decode + preprocess on threads of this process (PIL releases the GIL for much, not all, of it)."""

    kind = "threads"

    def __init__(self, prepare: Callable[[Any], np.ndarray], workers: int) -> None:
        self.prepare = prepare
        self.pool = ThreadPoolExecutor(workers)

    def submit(self, path: Path) -> tuple[Any, Any]:
        return self.pool.submit(_read, path, self.prepare), None

    def array(self, value: Any, slot: Any) -> np.ndarray:
        return value

    def release(self, slots: list[Any]) -> None:
        pass

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


_WORKER: dict[str, Any] = {}


def _attach(name: str, shape: tuple[int, ...]) -> None:
    """Worker initializer: map the shared slot array (the parent owns and unlinks it)."""
    from multiprocessing import shared_memory

    try:
        shm = shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]  # Python >= 3.13
    except TypeError:  # spawned workers share the parent's resource tracker: registering again is a no-op
        shm = shared_memory.SharedMemory(name=name)
    _WORKER["shm"] = shm
    _WORKER["slots"] = np.ndarray(shape, np.uint8, buffer=shm.buf)


def _read_into(path: str, slot: int, spec: tuple) -> tuple[bool | None, str | None]:
    from ..models.wd_torch import prepare_u8

    arr, err = _read(Path(path), lambda img: prepare_u8(img, *spec))
    if arr is None:
        return None, err
    _WORKER["slots"][slot] = arr
    return True, None


class _ProcessDecoder:
    """Decode + preprocess in worker processes (no GIL) into slots of one shared uint8 array."""

    kind = "processes"

    def __init__(self, spec: tuple[int, int, int], workers: int, n_slots: int) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import shared_memory

        size = spec[0]
        shape = (n_slots, size, size, 3)
        self.spec = spec
        self.shm = shared_memory.SharedMemory(create=True, size=int(np.prod(shape)))
        self.slots = np.ndarray(shape, np.uint8, buffer=self.shm.buf)
        self.free = list(range(n_slots))
        self.pool = ProcessPoolExecutor(
            workers, mp_context=mp.get_context("spawn"), initializer=_attach, initargs=(self.shm.name, shape)
        )

    def submit(self, path: Path) -> tuple[Any, Any]:
        slot = self.free.pop()
        return self.pool.submit(_read_into, str(path), slot, self.spec), slot

    def array(self, value: Any, slot: Any) -> np.ndarray:
        return self.slots[slot]

    def release(self, slots: list[Any]) -> None:
        self.free.extend(slots)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        del self.slots
        self.shm.close()
        self.shm.unlink()


DECODE_MODES = ("auto", "gpu", "cpu", "threads", "processes")


def decode_choice(requested: str, backend: str, device: str, nvjpeg: Callable[[], bool]) -> tuple[str, str]:
    """``--decode`` -> ("gpu" | "cpu", why). ``nvjpeg`` probes torchvision's GPU decoder (called only if needed).

    nvJPEG feeds only the torch backend on a CUDA device (the batch stays on the GPU); ``gpu`` where that is
    not possible is a one-line error, ``auto`` falls back to the CPU decoder and says why.
    """
    if requested not in DECODE_MODES:
        raise CurateError(f"--decode {requested!r}: use auto, gpu or cpu (or threads / processes)")
    if requested in ("cpu", "threads", "processes"):
        return "cpu", f"--decode {requested}"
    if backend != "torch" or not device.startswith("cuda"):
        why = f"the {backend} backend on {device} takes host arrays"
        if requested == "gpu":
            raise CurateError(
                f"--decode gpu needs the torch backend on a CUDA device ({why}); pass --backend torch --device "
                "cuda, or --decode cpu"
            )
        return "cpu", why
    if not nvjpeg():
        why = f"torchvision cannot decode JPEGs on {device} here (no nvJPEG build)"
        if requested == "gpu":
            raise CurateError(
                f"--decode gpu: {why}; install a CUDA build of torchvision or pass --decode cpu"
            )
        return "cpu", why
    return (
        "gpu",
        f"{'--decode gpu' if requested == 'gpu' else 'torch backend on CUDA'}: nvJPEG for JPEG files",
    )


def _decoder(cfg: TagConfig, tagger: Any, n_images: int, workers: int, n_slots: int):
    """Processes for big GPU jobs (threads cannot decode fast enough to feed a GPU), else threads."""
    mode = "auto" if cfg.decode in ("auto", "gpu", "cpu") else cfg.decode
    spec = getattr(tagger, "decode_spec", None)
    if mode == "auto":
        gpu = getattr(tagger, "cuda", False)
        mode = "processes" if gpu and spec and n_images >= PROCESS_DECODE_MIN and workers >= 4 else "threads"
    if mode == "processes" and spec is not None:
        return _ProcessDecoder(spec, workers, n_slots)
    return _ThreadDecoder(tagger.preprocess_image, workers)


def _cpu_from_bytes(data: bytes, prepare: Callable[[Any], np.ndarray]) -> tuple[str, Any, int]:
    """The CPU path on bytes already read (``open_rgb`` is ``decode_image(..., draft_size=None)``)."""
    from ..io import decode_image

    try:
        return "cpu", prepare(decode_image(data, draft_size=None).image), 0
    except DecodeError as exc:
        return "fail", f"{exc.reason}: {exc.detail}", 0
    except OSError as exc:
        return "fail", str(exc), 0


def _load_for_gpu(path: Path, prepare: Callable[[Any], np.ndarray]) -> tuple[str, Any, int]:
    """Read one file: ("gpu", JPEG bytes tensor, pixels) when nvJPEG can take it as is, else the CPU decode."""
    import torch

    from .embed import jpeg_gpu_size

    try:
        data = path.read_bytes()
    except OSError as exc:
        return "fail", str(exc), 0
    size = jpeg_gpu_size(data)  # baseline YCbCr/grey JPEG, no EXIF rotation, complete, sane size
    if size is None:
        return _cpu_from_bytes(data, prepare)
    return "gpu", torch.frombuffer(bytearray(data), dtype=torch.uint8), size[0] * size[1]


class _GpuFeed:
    """Batches for the torch tagger decoded on its device: JPEGs through nvJPEG, everything else (PNG, WebP,
    progressive or EXIF-rotated JPEGs, files nvJPEG rejects) through the CPU decoder, file by file.

    ``THREADS`` threads, each on its own CUDA stream, read a batch's files on a thread pool, decode and
    place them, and queue the batch (at most ``AHEAD``) while the model runs the previous one on the default
    stream. Items: (records, uint8 [N, size, size, 3] on the device, failures, ready event or None).
    """

    kind = "nvJPEG"
    THREADS = 2
    AHEAD = 2

    def __init__(self, tagger: Any, records: list[ImageRecord], root: Path, batch_size: int, workers: int):
        import queue
        import threading

        self.tagger, self.root, self.workers = tagger, root, workers
        self.chunks = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
        self.next = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.q: queue.Queue = queue.Queue(maxsize=self.AHEAD)
        self.gpu = self.cpu = 0
        self.reader = ThreadPoolExecutor(workers)
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(self.THREADS)]
        for t in self.threads:
            t.start()

    def _put(self, item: Any) -> None:
        import queue

        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _work(self) -> None:
        import contextlib

        import torch

        dev = self.tagger.torch_device
        try:
            stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                while not self.stop.is_set():
                    with self.lock:
                        if self.next >= len(self.chunks):
                            break
                        chunk = self.chunks[self.next]
                        self.next += 1
                    prep = self.tagger.preprocess_image
                    futs = [self.reader.submit(_load_for_gpu, self.root / r.path, prep) for r in chunk]
                    item = self._assemble(chunk, [f.result() for f in futs])
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                        item = (*item[:3], event)
                    self._put(item)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(("error", exc, None, None))
        self._put(None)

    def _assemble(self, chunk: list[ImageRecord], loaded: list[tuple[str, Any, int]]) -> tuple:
        import torch

        from ..models.wd_torch import decode_jpegs, prepare_tensor
        from .embed import GPU_BATCH_PIXELS

        t = self.tagger
        dev, size = t.torch_device, t.size
        placed: list[Any] = [None] * len(chunk)  # device tensor [s, s, 3], host array, or None (failed)
        failures: list[tuple[str, str]] = []
        gpu_rows = [i for i, (kind, _, _) in enumerate(loaded) if kind == "gpu"]
        start, n_gpu = 0, 0
        while start < len(gpu_rows):  # nvJPEG calls under a decoded-pixel budget
            stop, budget = start, 0
            while stop < len(gpu_rows) and (
                stop == start or budget + loaded[gpu_rows[stop]][2] <= GPU_BATCH_PIXELS
            ):
                budget += loaded[gpu_rows[stop]][2]
                stop += 1
            rows = gpu_rows[start:stop]
            for i, img in zip(rows, decode_jpegs([loaded[i][1] for i in rows], dev), strict=True):
                if img is None:  # nvJPEG rejected it: the CPU decoder decides
                    loaded[i] = _cpu_from_bytes(loaded[i][1].numpy().tobytes(), t.preprocess_image)
                else:
                    placed[i] = prepare_tensor(img, size, t._scale, t.cfg.interpolation)
                    n_gpu += 1
            start = stop
        for i, (kind, value, _) in enumerate(loaded):
            if kind == "cpu":
                placed[i] = value
            elif kind == "fail":
                failures.append((chunk[i].path, value or "unreadable"))
        keep = [i for i, v in enumerate(placed) if v is not None]
        host = [j for j, i in enumerate(keep) if isinstance(placed[i], np.ndarray)]
        if keep and not host:  # all decoded on the device: one stack, not a copy per image
            out = torch.stack([placed[i] for i in keep])
        else:
            out = torch.empty((len(keep), size, size, 3), dtype=torch.uint8, device=dev)
        if host:
            arr = torch.from_numpy(np.stack([placed[keep[j]] for j in host]))
            arr = arr.pin_memory() if dev.type == "cuda" else arr
            out[torch.tensor(host, device=dev)] = arr.to(dev, non_blocking=True)
            for j, i in enumerate(keep):
                if not isinstance(placed[i], np.ndarray):
                    out[j] = placed[i]
        with self.lock:
            self.gpu += n_gpu
            self.cpu += len(host)
        return [chunk[i] for i in keep], out, failures, None

    def __iter__(self):
        done = 0
        while done < len(self.threads):
            item = self.q.get()
            if item is None:
                done += 1
            elif item[0] == "error":
                raise item[1]
            else:
                yield item

    def close(self) -> None:
        import queue

        self.stop.set()
        for t in self.threads:
            while t.is_alive():
                try:
                    self.q.get(timeout=0.05)
                except queue.Empty:
                    pass
            t.join()
        self.reader.shutdown(wait=True, cancel_futures=True)


def _nvjpeg(device: str) -> bool:
    from .embed import gpu_decode_available

    return gpu_decode_available(device)


def _finish_oldest(running: deque, store: Callable, waits: dict[str, float]) -> None:
    """Wait for the oldest batch in flight and store its scores; the wait goes to waits["model"], the storing to
    waits["store"]."""
    done_batch, handle = running.popleft()
    t0 = time.perf_counter()
    probs = handle.result()
    t1 = time.perf_counter()
    store(done_batch, probs)
    waits["model"] += t1 - t0
    waits["store"] += time.perf_counter() - t1


def _tag_on_gpu(
    tagger: Any,
    todo: list[ImageRecord],
    root: Path,
    batch_size: int,
    workers: int,
    store: Callable[[list[ImageRecord], np.ndarray], None],
    failed: list[tuple[str, str]],
) -> dict[str, Any]:
    """Run ``todo`` with nvJPEG batches from ``_GpuFeed``; one batch on the model while the next decodes."""
    import torch

    cuda = tagger.torch_device.type == "cuda"
    feed = _GpuFeed(tagger, todo, root, batch_size, workers)
    running: deque = deque()
    waits = {"decode": 0.0, "model": 0.0, "store": 0.0}

    try:
        items = iter(feed)
        while True:
            t0 = time.perf_counter()
            item = next(items, None)
            waits["decode"] += time.perf_counter() - t0
            if item is None:
                break
            recs, x, fails, event = item
            failed.extend(fails)
            if event is not None:  # decoded on the feed's stream: the model's stream waits for it
                stream = getattr(tagger, "stream", None) or torch.cuda.current_stream(tagger.torch_device)
                stream.wait_event(event)
                x.record_stream(stream)
            if recs:
                running.append((recs, tagger.submit(x)))
            while len(running) > 1:
                _finish_oldest(running, store, waits)
        while running:
            _finish_oldest(running, store, waits)
    finally:
        feed.close()
    where = f"nvJPEG on {tagger.device}" if cuda else f"torchvision on {tagger.device}"
    return {"decode": f"{where} ({feed.gpu}) + threads x {workers} ({feed.cpu})", "gpu_decoded": feed.gpu,
            "waits": {k: round(v, 3) for k, v in waits.items()}}  # fmt: skip


def tag_config(ds: Any, **flags: Any) -> TagConfig:
    """``[tag]`` of the dataset's curate.toml with ``flags`` over it; the model defaults to the last one used."""
    from ..config import _coerce, override
    from .captions import CAPTION_KEYS

    # [tag] may also hold caption options (general, character, trigger, ...); [caption] wins over them.
    section = {k: v for k, v in ds.config.section("tag").items() if k not in CAPTION_KEYS}
    cfg = _coerce(TagConfig, section, "tag")
    model = (
        flags.pop("model", None)
        or section.get("model")
        or ds.manifest.get_meta("tag.model")
        or DEFAULT_TAGGER
    )
    cfg = override(cfg, model=model, **flags)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise CurateError(f"--device {cfg.device!r} is not a device; use auto, cpu, cuda or cuda:N")
    return cfg


def tag_images(
    manifest: Manifest,
    cfg: TagConfig = TagConfig(),
    *,
    records: list[ImageRecord] | None = None,
    progress: Callable[[int, int], None] | None = None,
    runner: Callable[[TagConfig], Any] | None = None,
) -> TagRun:
    """Score every kept image that has no scores for ``cfg.model`` yet (all of them with ``force``).

    ``runner(cfg)`` starts the model elsewhere (curate.engine.ray_engine.tag_runner: Ray actors); scores
    come back per batch and are committed per batch, as locally.
    """
    if not 0.0 <= cfg.floor < 1.0:
        raise CurateError(f"tag floor must be in [0, 1), got {cfg.floor}")
    if cfg.batch_size < 0:
        raise CurateError(f"batch size must be at least 1 (0: automatic), got {cfg.batch_size}")
    if cfg.decode not in DECODE_MODES:
        raise CurateError(
            f"[tag] decode must be auto, gpu or cpu (or threads / processes), got {cfg.decode!r}"
        )
    manifest.ensure_table(TABLES)
    key = model_key(cfg.model)
    records = manifest.kept_images() if records is None else records
    done = set() if cfg.force else set(load_scores(manifest, key))
    todo = [r for r in records if r.sha256 not in done]
    t0 = time.perf_counter()
    failed: list[tuple[str, str]] = []
    info: dict[str, Any] = {}
    if todo and runner is not None:
        session = runner(cfg)
        info["load_seconds"] = time.perf_counter() - t0  # starting Ray and the actors, which load the model
        try:
            _tag_remote(manifest, cfg, key, todo, session, failed, info, progress)
        finally:
            session.close()
    elif todo:
        from ..models.wd14 import load_tagger

        tagger = load_tagger(cfg.model, cfg.device, cfg.backend, cfg.dtype, compile=cfg.compile)
        where, info["decode_why"] = decode_choice(
            cfg.decode, tagger.backend, tagger.device, lambda: _nvjpeg(tagger.device)
        )  # the nvJPEG probe also starts the decoder, so its set-up counts as loading
        batch_size = cfg.batch_size or tagger.default_batch
        if getattr(tagger, "compiled", False):
            tagger.warm(min(batch_size, len(todo)))  # compile now: loading pays for it, not the images
        info["load_seconds"] = time.perf_counter() - t0
        info |= {"backend": tagger.backend, "device": tagger.device, "runtime": tagger.describe(),
                "why": getattr(tagger, "why", ""), "batch_size": batch_size}  # fmt: skip
        labels = tagger.labels
        _store_labels(manifest, key, labels.names, labels.categories)
        rating = labels.categories == 9
        names = np.array(labels.names, dtype=object)
        workers = cfg.workers or min(16, os.cpu_count() or 1)
        n_done = 0

        def store(batch: list[ImageRecord], probs: np.ndarray) -> None:
            nonlocal n_done
            _store_scores(manifest, cfg, key, names, rating, batch, probs)
            n_done += len(batch)
            if progress:
                progress(n_done + len(failed), len(todo))

        if where == "gpu":
            info |= _tag_on_gpu(tagger, todo, manifest.root, batch_size, workers, store, failed)
        else:
            # Decoding + preprocessing runs ahead (threads, or processes for big GPU jobs) while the model runs; one
            # batch is on the model while the previous one's scores are written, so neither side waits for the other.
            ahead = batch_size * 2 + workers
            dec = _decoder(cfg, tagger, len(todo), workers, ahead + batch_size)
            info["decode"] = f"{dec.kind} x {workers}"
            try:
                pending: deque = deque()
                running: deque = deque()
                it = iter(todo)

                def fill() -> None:
                    while len(pending) < ahead:
                        rec = next(it, None)
                        if rec is None:
                            return
                        pending.append((rec, *dec.submit(manifest.root / rec.path)))

                waits = {"decode": 0.0, "model": 0.0, "store": 0.0}
                fill()
                while pending or running:
                    batch, arrays, slots = [], [], []
                    while pending and len(batch) < batch_size:
                        rec, fut, slot = pending.popleft()
                        tw = time.perf_counter()
                        value, err = fut.result()
                        waits["decode"] += time.perf_counter() - tw
                        if value is None:
                            failed.append((rec.path, err or "unreadable"))
                            dec.release([slot])
                            fill()
                            continue
                        batch.append(rec)
                        arrays.append(dec.array(value, slot))
                        slots.append(slot)
                        fill()
                    if batch:
                        x = tagger.collate(arrays)  # copies out of the slots, which are free again after this
                        dec.release(slots)
                        fill()
                        running.append((batch, tagger.submit(x)))
                    while running and (len(running) > 1 or not pending):
                        _finish_oldest(running, store, waits)
                info["waits"] = {k: round(v, 3) for k, v in waits.items()}
            finally:
                dec.close()
        if hasattr(tagger, "check_recompiles"):
            tagger.check_recompiles()
        info["notices"] = list(tagger.notices)
    manifest.set_meta("tag.model", key)
    run = TagRun(
        key, len(todo) - len(failed), len(records) - len(todo), failed, time.perf_counter() - t0, **info
    )
    return run


def _store_labels(manifest: Manifest, key: str, names, categories) -> None:
    with manifest.transaction():
        manifest.conn.execute("DELETE FROM tag_labels WHERE model=?", (key,))
        manifest.conn.executemany(
            "INSERT INTO tag_labels(model, name, category) VALUES (?,?,?)",
            [(key, n, int(c)) for n, c in zip(names, categories, strict=True)],
        )


def _store_scores(
    manifest: Manifest,
    cfg: TagConfig,
    key: str,
    names: np.ndarray,
    rating: np.ndarray,
    batch: list[ImageRecord],
    probs: np.ndarray,
) -> None:
    """Commit one batch's scores (every tag >= floor, and the ratings)."""
    rows = []
    for rec, p in zip(batch, probs, strict=True):
        keep = np.flatnonzero((p >= cfg.floor) | rating)
        scores = dict(
            zip(names[keep].tolist(), np.round(p[keep].astype(np.float64), 4).tolist(), strict=True)
        )
        rows.append((rec.sha256, key, json.dumps(scores), time.time()))
    with manifest.transaction():
        manifest.conn.executemany(
            "INSERT OR REPLACE INTO tag_scores(sha256, model, scores, at) VALUES (?,?,?,?)", rows
        )


# how the Ray engine decodes, whatever --decode auto / cpu / threads asked (gpu is refused before Ray starts)
RAY_DECODE_WHY = "--engine ray: the actors decode on their CPUs"


def _tag_remote(
    manifest: Manifest,
    cfg: TagConfig,
    key: str,
    todo: list[ImageRecord],
    session: Any,
    failed: list[tuple[str, str]],
    info: dict[str, Any],
    progress: Callable[[int, int], None] | None,
) -> None:
    """Score ``todo`` on a runner's session (Ray actors holding the model); each batch is committed on arrival,
    so a killed run loses at most the batches still out."""
    meta = session.info
    batch_size = cfg.batch_size or meta["default_batch"]
    info |= {"backend": meta["backend"], "device": meta["device"], "runtime": meta["runtime"],
             "why": meta["why"], "batch_size": batch_size, "notices": meta["notices"],
             "decode": f"ray actors x {len(session.actors)}", "decode_why": RAY_DECODE_WHY}  # fmt: skip
    _store_labels(manifest, key, meta["names"], meta["categories"])
    names = np.array(meta["names"], dtype=object)
    rating = np.array(meta["categories"]) == 9
    paths = [str(manifest.root / r.path) for r in todo]
    done = 0
    for ok, probs, errs in session.map(paths, batch_size):
        failed += [(todo[k].path, e) for k, e in errs]
        if ok:
            _store_scores(manifest, cfg, key, names, rating, [todo[k] for k in ok], probs)
        done += len(ok) + len(errs)
        if progress:
            progress(done, len(todo))
