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
