"""Data-parallel plumbing for train(): join or spawn a torch.distributed group, shard batches, tiny helpers.

Two ways in:
  * `train(cfg)` with `cfg.gpus > 1` spawns that many processes (torch.multiprocessing) on this host;
  * `torchrun` / `accelerate launch` set WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR: train() joins that group.
Backend: nccl on CUDA, gloo on CPU (how the tests run 2 ranks without a GPU); `cfg.ddp_backend` overrides.
The gradients are all-reduced by torch DDP; this module only adds barriers and a few scalar all-reduces.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
import socket
from typing import Any

from trainer_bridge.config import TrainConfig, TrainError


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def env_world() -> int:
    """WORLD_SIZE set by torchrun / accelerate launch (1 when not launched that way)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend(cfg: TrainConfig) -> str:
    import torch

    return cfg.ddp_backend or ("nccl" if torch.cuda.is_available() else "gloo")


def init(cfg: TrainConfig) -> bool:
    """Join the process group described by the environment, if there is one and it is not joined yet.

    Returns True when this call created the group (the caller then destroys it with `cleanup()`).
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized() or env_world() <= 1:
        return False
    be = backend(cfg)
    if be == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise TrainError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) visible"
            )
        torch.cuda.set_device(local)
    # rank 0 encodes the whole latent cache while the others wait at a barrier: allow that much longer than
    # the default 10 minutes
    dist.init_process_group(be, timeout=datetime.timedelta(hours=2))
    return True


def cleanup() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def device():
    """This rank's device: cuda:LOCAL_RANK under a group on CUDA, else cuda / cpu."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(
        "cuda", int(os.environ.get("LOCAL_RANK", "0")) if world() > 1 else torch.cuda.current_device()
    )


def barrier() -> None:
    import torch.distributed as dist

    if world() > 1:
        dist.barrier()


def all_reduce_sum(t):
    """Sum a small tensor across ranks in place (val-loss sums, train-loss sums, stop flags); identity on 1 rank."""
    import torch.distributed as dist

    if world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def seed_for(seed: int, j: int) -> int:
    """The seed of per-device batch j (counted across epochs): noise, flips and caption draws depend on (seed, j) only,
    so 1 process and W ranks draw the same numbers for the same batch, and resume at any batch is exact."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{j}".encode(), digest_size=8).digest(), "little") >> 1


def micro_batches(n: int, pos: int, per_step: int, world_size: int, rank_: int) -> list[int | None]:
    """Per-device batch indices this rank runs in the optimizer step that starts at position `pos` of an epoch of
    `n` batches, where a step consumes `per_step` (= grad_accum * world) batches: micro-step a takes batch
    pos + a * world + rank. None = no batch left for this rank in a micro-step the others still run (it runs a
    dummy batch with loss x 0, so the all-reduce matches). Micro-steps where every rank would be idle are dropped."""
    end = min(pos + per_step, n)
    out: list[int | None] = []
    for first in range(pos, end, world_size):
        j = first + rank_
        out.append(j if j < end else None)
    return out


# ---------------------------------------------------------------- spawning (curate train --gpus N)


def cpu_threads(world_size: int) -> int:
    """Intra-op threads per CPU rank: the cores split evenly."""
    return max(1, (os.cpu_count() or 1) // world_size)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank_: int, world_size: int, port: int, cfg: TrainConfig, queue: Any = None):
    """One spawned rank: set the torchrun-style environment, train, hand rank 0's result to the parent."""
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank_), LOCAL_RANK=str(rank_),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    import torch

    from trainer_bridge.train import train

    if (
        not torch.cuda.is_available()
    ):  # CPU ranks (gloo): share the cores; oversubscribed OpenMP threads crawl
        torch.set_num_threads(cpu_threads(world_size))
    try:
        result = train(cfg)
    except TrainError as e:
        if queue is not None and rank_ == 0:
            queue.put(("error", str(e)))
        raise
    if queue is not None and rank_ == 0:
        queue.put(("ok", result))
    return result


def spawn(cfg: TrainConfig, target=worker):
    """Run train(cfg) on cfg.gpus processes of this host; return rank 0's TrainResult.

    `target(rank, world, port, cfg, queue)` runs in each process (tests wrap `worker` to count what ranks do)."""
    import torch
    import torch.multiprocessing as mp

    n = cfg.gpus
    if backend(cfg) == "nccl" and n > torch.cuda.device_count():
        raise TrainError(
            f"gpus = {n} but only {torch.cuda.device_count()} CUDA device(s) visible; lower --gpus"
        )
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    # Ctrl-C reaches every rank (same process group); the ranks agree on a step, save and return, so the parent
    # only waits for them. A no-op handler, not SIG_IGN: that would be inherited, and loading could not be stopped
    old = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        mp.start_processes(
            target, args=(n, _free_port(), cfg, queue), nprocs=n, join=True, start_method="spawn"
        )
    except mp.ProcessRaisedException as e:
        if not queue.empty():
            status, msg = queue.get()
            if status == "error":
                raise TrainError(msg) from None
        raise TrainError(f"a training process failed: {str(e).strip().splitlines()[-1]}") from None
    finally:
        signal.signal(signal.SIGINT, old)
    status, result = queue.get()
    if status == "error":
        raise TrainError(result)
    return result
