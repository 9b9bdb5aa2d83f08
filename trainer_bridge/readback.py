"""Reading device scalars (the logged train loss) back to the host without stalling the GPU.

A `.item()` on a CUDA tensor waits until the GPU has run everything queued before it, so the host queues nothing
meanwhile and the GPU idles for a moment after every read (with the graphed step, most of the queue). Instead,
push() starts a non-blocking copy into pinned host memory and records an event behind it; the value is read once
the event has passed: poll() returns what has arrived, flush() waits for the rest (end of an epoch, before a save).

    rb = Readback(device)
    rb.push(step, loss_mean)              # no host sync on CUDA; on a CPU the value is read at once
    for step, value in rb.poll():         # oldest first, each value once
        ...
    for step, value in rb.flush():        # everything still in flight
        ...

The value is the float32 the device holds, read with .item() (the same Python float a synchronous read gives).
"""

from __future__ import annotations

from collections import deque
from typing import Any


class Readback:
    """Non-blocking device -> host reads of scalars, handed back in push order as (step, value) pairs."""

    def __init__(self, device: Any, spare: int = 4) -> None:
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.pending: deque[tuple[int, Any, Any]] = deque()  # (step, host copy or float, event or None)
        # pinned buffers for reuse, allocated here: cudaHostAlloc synchronizes the device, so a push must not
        # allocate (measured on the H200: a first push that allocated made the GPU drain its queue)
        self.spare: list[Any] = []
        if self.cuda:
            import torch

            self.spare = [torch.empty(1, dtype=torch.float32, pin_memory=True) for _ in range(spare)]

    def push(self, step: int, value: Any) -> None:
        """Start reading `value` (a 0-dim tensor) for `step`."""
        self.pending.append((step, *self._start(value.detach())))

    def poll(self) -> list[tuple[int, float]]:
        """The values whose copies have finished, oldest first (stops at the first still in flight)."""
        out = []
        while self.pending and (self.pending[0][2] is None or self.pending[0][2].query()):
            out.append(self._take())
        return out

    def flush(self) -> list[tuple[int, float]]:
        """Every value still in flight, oldest first; waits for their copies (not for the rest of the GPU queue)."""
        out = []
        while self.pending:
            if self.pending[0][2] is not None:
                self.pending[0][2].synchronize()
            out.append(self._take())
        return out

    def _start(self, value: Any) -> tuple[Any, Any]:
        """(what the host will read, the event that says it is there); a CPU tensor is read at once."""
        import torch

        if not self.cuda or value.device.type != "cuda":
            return value.item(), None
        value = value.reshape(-1)  # copied as a 1-element tensor (see the note in __init__)
        host = next((b for b in self.spare if b.dtype == value.dtype and b.shape == value.shape), None)
        if host is None:
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        else:
            self.spare.remove(host)
        host.copy_(value, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def _take(self) -> tuple[int, float]:
        step, held, event = self.pending.popleft()
        if event is None:  # read at push
            return step, held
        value = held.item()  # pinned CPU memory the copy has filled: no device sync
        self.spare.append(held)
        return step, value
