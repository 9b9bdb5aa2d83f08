"""Which part of a device->host scalar read blocks the host while the GPU is busy (stop-24 probe, issue 14)."""

import time

import torch

dev = torch.device("cuda")


def timed(name, fn):
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU work queued first
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    print(f"{name:40s} host {dt * 1e3:8.2f} ms", flush=True)


v0 = torch.randn((), device=dev)
v1 = torch.randn(1, device=dev)
p0 = torch.empty((), pin_memory=True)
p1 = torch.empty(1, pin_memory=True)
timed("mul 0-dim", lambda: v0 * 1.0)
timed("event record", lambda: torch.cuda.Event().record())
timed("copy_ 0-dim -> pinned 0-dim", lambda: p0.copy_(v0, non_blocking=True))
timed("copy_ (1,) -> pinned (1,)", lambda: p1.copy_(v1, non_blocking=True))
timed("copy_ 0-dim.reshape(1) -> pinned (1,)", lambda: p1.copy_(v0.reshape(1), non_blocking=True))
timed("to(cpu, non_blocking) (1,)", lambda: v1.to("cpu", non_blocking=True))
timed("pinned empty", lambda: torch.empty(1, pin_memory=True))
