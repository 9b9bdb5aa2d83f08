"""Ray Data engine: the scan's per-image function runs as map_batches on Ray CPU tasks.

The driver lists files and commits results to the manifest in batches, exactly as the local pool does,
so the manifest stays the single source of truth and an interrupted run resumes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..config import ScanConfig
from ..errors import CurateError


def require_ray():
    """Import ray, or fail with a one-line install hint."""
    try:
        import ray
    except ImportError:
        raise CurateError("--engine ray needs Ray: pip install 'curate[ray]'") from None
    return ray


def init(address: str | None = None) -> None:
    """Join a cluster (``address``) or start a local Ray; reuse one already started in this process."""
    ray = require_ray()
    if ray.is_initialized():
        return
    if address and address != "auto" and not address.startswith("ray://"):
        _reachable(address)  # ray.init retries an unreachable GCS for minutes
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "a local Ray"
        raise CurateError(f"cannot connect to Ray at {where}: {str(exc).splitlines()[0][:200]}") from None


def _reachable(address: str) -> None:
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise CurateError(
            f"cannot connect to Ray at {address}: {exc}; check --address (host:port or auto)"
        ) from None


class _Row:
    """Opaque holder: Ray Data keeps it as a Python object instead of converting nested lists to arrays."""

    __slots__ = ("row",)

    def __init__(self, row: dict[str, Any]) -> None:
        self.row = row


class _Analyse:
    """map_batches callable: the same per-file function the local pool runs (_read_one)."""

    def __init__(self, known: frozenset[str], cfg: ScanConfig) -> None:
        self.known, self.cfg = known, cfg

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from ..stages import scan as scan_stage

        scan_stage._init_worker(self.known, self.cfg)
        out = [scan_stage._read_one(str(p)) for p in batch["path"]]
        rows = np.empty(len(out), dtype=object)
        rows[:] = [_Row(r) for _, r in out]
        return {"path": np.array([p for p, _ in out], dtype=object), "row": rows}


def scan_mapper(address: str | None = None, block_size: int = 16):
    """A scan ``mapper``: (paths, known, cfg) -> iterator of (path, row) computed on Ray."""

    def mapper(paths: list[str], known: frozenset[str], cfg: ScanConfig) -> Iterator[tuple[str, dict]]:
        init(address)
        import ray

        if not paths:
            return iter(())
        ds = ray.data.from_items(
            [{"path": p} for p in paths], override_num_blocks=max(1, len(paths) // block_size)
        )
        fn = _Analyse(known, cfg)
        out = ds.map_batches(lambda b: fn(b), batch_size=block_size, batch_format="numpy")
        return (
            (str(p), r.row)
            for batch in out.iter_batches(batch_size=block_size, batch_format="numpy")
            for p, r in zip(batch["path"], batch["row"], strict=True)
        )

    return mapper


def task_mapper(address: str | None = None, inflight: int = 0, chunk: int = 64):
    """A ``mapper(fn, calls)``: ``fn(*args)`` for each args tuple as a Ray task (one CPU each), results
    yielded in call order as they come back. At most ``inflight`` tasks are queued at once (0: twice the
    cluster's CPUs), so a large run never ships all its inputs to the object store up front.
    ``chunk``: work items (candidate pairs) per task, read by the stage that builds the calls."""

    def mapper(fn, calls) -> Iterator[Any]:
        from collections import deque

        init(address)
        import ray

        remote = ray.remote(num_cpus=1, max_retries=2)(fn)
        width = inflight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        queue: deque = deque()
        it = iter(calls)
        try:
            for args in it:
                queue.append(remote.remote(*args))
                if len(queue) >= width:
                    yield ray.get(queue.popleft())
            while queue:
                yield ray.get(queue.popleft())
        finally:
            for ref in queue:  # stopped early (error, Ctrl-C): drop the queued work
                ray.cancel(ref)

    mapper.chunk = chunk  # type: ignore[attr-defined]
    return mapper


class _TaggerActor:
    """Ray actor: loads the WD14 tagger once, then decodes, preprocesses and scores batches of files."""

    def __init__(self, model: str, device: str, backend: str, dtype: str, threads: int) -> None:
        import time
        from concurrent.futures import ThreadPoolExecutor

        from ..models.wd14 import load_tagger

        t0 = time.perf_counter()
        self.error = ""
        try:
            self.tagger = load_tagger(model, device, backend, dtype)
        except CurateError as exc:  # reported by info() as the one-line message it is
            self.error = str(exc)
        self.load_seconds = time.perf_counter() - t0
        self.pool = ThreadPoolExecutor(max(1, threads))

    def info(self) -> dict[str, Any]:
        if self.error:
            return {"error": self.error}
        t, labels = self.tagger, self.tagger.labels
        return {
            "names": list(labels.names),
            "categories": [int(c) for c in labels.categories],
            "backend": t.backend,
            "device": t.device,
            "runtime": t.describe(),
            "why": getattr(t, "why", ""),
            "default_batch": t.default_batch,
            "notices": list(t.notices),
            "load_seconds": self.load_seconds,
        }

    def run(self, paths: list[str]):
        """(indices of the decoded files, their scores [n, tags] float32, [(index, error)] of the others)."""
        from pathlib import Path

        import numpy as np

        from ..stages.tag import _read

        read = list(self.pool.map(lambda p: _read(Path(p), self.tagger.preprocess_image), paths))
        ok = [k for k, (arr, _) in enumerate(read) if arr is not None]
        errs = [(k, err or "unreadable") for k, (arr, err) in enumerate(read) if arr is None]
        if not ok:
            return ok, np.zeros((0, len(self.tagger.labels)), np.float32), errs
        probs = self.tagger.predict(self.tagger.collate([read[k][0] for k in ok]))
        return ok, np.asarray(probs, np.float32), errs


class TagSession:
    """Tagger actors started for one ``tag_images`` run: ``info`` from the first, ``map`` spreads batches."""

    def __init__(self, actors: list[Any], inflight: int = 2) -> None:
        import ray

        self.actors, self.inflight = actors, inflight
        infos = ray.get([a.info.remote() for a in actors])
        self.info = infos[0]
        for i in infos:
            if "error" in i:
                self.close()
                raise CurateError(i["error"])

    def map(
        self, paths: list[str], batch_size: int
    ) -> Iterator[tuple[list[int], Any, list[tuple[int, str]]]]:
        """Per batch, in order: (indices into ``paths`` decoded, their scores, [(index, error)])."""
        from collections import deque

        import ray

        starts = range(0, len(paths), batch_size)
        queue: deque = deque()
        try:
            for n, s in enumerate(starts):
                actor = self.actors[n % len(self.actors)]
                queue.append((s, actor.run.remote(paths[s : s + batch_size])))
                if len(queue) >= self.inflight * len(self.actors):
                    yield _shift(*queue.popleft())
            while queue:
                yield _shift(*queue.popleft())
        finally:
            for _, ref in queue:
                ray.cancel(ref)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def _shift(start: int, ref: Any):
    import ray

    ok, probs, errs = ray.get(ref)
    return [start + k for k in ok], probs, [(start + k, e) for k, e in errs]


def tag_runner(address: str | None = None, num_gpus: float = 0, actors: int = 0):
    """A ``tag_images`` runner: ``runner(cfg) -> TagSession`` on Ray actors that each hold the model once.

    ``num_gpus`` >= 1 starts that many actors with one GPU each (a fraction: one actor with that share);
    0 runs on CPU actors (``actors`` of them, default 1), as in CI.
    """
    if num_gpus < 0:
        raise CurateError(f"--num-gpus must be 0 or more, got {num_gpus}")

    def runner(cfg) -> TagSession:
        init(address)
        import ray

        if num_gpus >= 1:
            n, per = int(num_gpus), 1.0
        else:
            n, per = actors or 1, float(num_gpus)
        have = ray.cluster_resources().get("GPU", 0)
        if per and have < per * n:
            raise CurateError(
                f"--num-gpus {num_gpus}: the Ray cluster has {have:g} GPU(s); lower --num-gpus (0 runs on CPUs)"
            )
        cls = ray.remote(num_cpus=1, num_gpus=per)(_TaggerActor)
        device = cfg.device if per else "cpu"
        from ..stages.tag import model_key

        model = model_key(cfg.model)  # a local folder as an absolute path: workers run in another directory
        handles = [cls.remote(model, device, cfg.backend, cfg.dtype, cfg.workers or 4) for _ in range(n)]
        try:
            return TagSession(handles)
        except ray.exceptions.RayActorError as exc:
            raise CurateError(f"the tagger did not start on Ray: {str(exc).splitlines()[0][:200]}") from None

    return runner


class _ClipActor:
    """Ray actor: loads a CLIP image tower once, then decodes, crops and encodes batches of files."""

    def __init__(self, model: str, pretrained: str | None, device: str) -> None:
        from ..models.clip import load_clip

        self.error = ""
        try:
            self.cm = load_clip(model, pretrained, device)
        except CurateError as exc:
            self.error = str(exc)

    def key(self) -> dict[str, Any]:
        return {"error": self.error} if self.error else {"key": list(self.cm.key)}

    def run(self, paths: list[str], batch_size: int):
        from ..stages.embed import encode_paths

        ok, (emb,) = encode_paths(paths, [self.cm], batch_size=batch_size, workers=0)
        return ok, emb


def clip_encoder(
    model: str, pretrained: str | None, address: str | None = None, num_gpus: float = 0, inflight: int = 2
):
    """An ``encode_paths`` replacement for one CLIP model: batches encoded on Ray actors that each load
    the model once (``num_gpus`` >= 1: one actor per GPU; 0: one CPU actor). ``on_batch`` runs here, so
    the driver commits each batch to the manifest as it comes back."""
    from pathlib import Path

    if num_gpus < 0:
        raise CurateError(f"--num-gpus must be 0 or more, got {num_gpus}")
    if Path(model).expanduser().is_dir():  # workers run in another directory
        model = str(Path(model).expanduser().resolve())

    def encode(paths, models, *, batch_size=256, progress=None, on_batch=None, **_local_only):
        from collections import deque

        import numpy as np

        (driver_model,) = models
        init(address)
        import ray

        n, per = (int(num_gpus), 1.0) if num_gpus >= 1 else (1, float(num_gpus))
        have = ray.cluster_resources().get("GPU", 0)
        if per and have < per * n:
            raise CurateError(
                f"--num-gpus {num_gpus}: the Ray cluster has {have:g} GPU(s); lower --num-gpus (0 runs on CPUs)"
            )
        cls = ray.remote(num_cpus=1, num_gpus=per)(_ClipActor)
        actors = [cls.remote(model, pretrained, "cuda" if per else "cpu") for _ in range(n)]
        try:
            for k in ray.get([a.key.remote() for a in actors]):
                if "error" in k:
                    raise CurateError(k["error"])
                if tuple(k["key"]) != tuple(driver_model.key):
                    raise CurateError(
                        f"the Ray workers load CLIP {k['key']}, this process {list(driver_model.key)}; "
                        "give --model as a path every node sees, or a hub id"
                    )
            total = len(paths)
            ok_all = np.zeros(total, bool)
            out = np.zeros((total, 0), np.float32)
            queue: deque = deque()
            done = 0

            def take(start: int, ref: Any) -> None:
                nonlocal out, done
                ok, emb = ray.get(ref)
                if out.shape[1] == 0:
                    out = np.zeros((total, emb.shape[1]), np.float32)
                ii = np.arange(start, start + len(ok))
                ok_all[ii], out[ii] = ok, emb
                if on_batch is not None:
                    on_batch(ii, [emb])
                done += len(ii)
                if progress:
                    progress(done, total)

            try:
                for b, s in enumerate(range(0, total, batch_size)):
                    queue.append((s, actors[b % n].run.remote(paths[s : s + batch_size], batch_size)))
                    if len(queue) >= inflight * n:
                        take(*queue.popleft())
                while queue:
                    take(*queue.popleft())
            finally:
                for _, ref in queue:
                    ray.cancel(ref)
            return ok_all, [out]
        finally:
            for a in actors:
                ray.kill(a)

    return encode
