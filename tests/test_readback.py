"""The logged train loss comes back from the device without a host sync (trainer_bridge/readback.py), yet every
consumer (result.losses, tensorboard, the epochs table) gets the numbers a synchronous read gives, at the same steps."""

from __future__ import annotations

import pytest
import torch

from tests.test_trainer_train import tiny_config
from tests.trainer_fixtures import dataset, sd15_dir  # noqa: F401  (pytest fixtures)
from trainer_bridge import readback as RB
from trainer_bridge import train


class _Late:
    """The event of a copy that arrives at poll number `ready_at` of its readback (or when waited for)."""

    def __init__(self, rb: LateReadback, ready_at: int) -> None:
        self.rb, self.ready_at = rb, ready_at

    def query(self) -> bool:
        return self.rb.tick >= self.ready_at

    def synchronize(self) -> None:
        self.ready_at = self.rb.tick


class LateReadback(RB.Readback):
    """CPU stand-in for the CUDA path: each value arrives `polls` polls after its push, as a copy still in flight."""

    polls = 5
    made: list[LateReadback] = []

    def __init__(self, device) -> None:
        super().__init__(device)
        self.tick = 0
        self.in_flight: list[int] = []  # values already in flight at each push
        self.held_back = 0  # polls that left a value in flight
        self.flushed: list[int] = []  # values still in flight at each flush
        LateReadback.made.append(self)

    def _start(self, value):
        self.in_flight.append(len(self.pending))
        return value.clone(), _Late(self, self.tick + self.polls)

    def flush(self):
        self.flushed.append(len(self.pending))
        return super().flush()

    def poll(self):
        self.tick += 1
        out = super().poll()
        self.held_back += bool(self.pending)
        return out


def test_cpu_reads_at_once_with_the_synchronous_float():
    rb = RB.Readback(torch.device("cpu"))
    x = torch.tensor(1.0) / torch.tensor(3.0)  # float32 0.3333333432674408, not the float64 1/3
    rb.push(5, x)
    assert rb.poll() == [(5, x.item())] and x.item() != 1 / 3
    assert rb.poll() == [] and rb.flush() == []


def test_poll_keeps_push_order_and_flush_returns_the_rest_once():
    rb = LateReadback(torch.device("cpu"))
    for step, value, ready_at in [(10, 0.5, 3), (20, 0.25, 2), (30, 0.125, 4)]:
        rb.push(step, torch.tensor(value))
        rb.pending[-1][2].ready_at = ready_at  # the first copy is slower than the second
    assert rb.poll() == []
    assert rb.poll() == []  # 20 has arrived, 10 has not: nothing comes out of order
    assert rb.poll() == [(10, 0.5), (20, 0.25)]
    rb.push(40, torch.tensor(2.0))
    assert rb.flush() == [(30, 0.125), (40, 2.0)]
    assert rb.poll() == [] and rb.flush() == [] and not rb.pending


def _scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.parametrize("stop", [0, 6], ids=["to-the-end", "stopped-at-6"])
def test_train_late_readback_gives_the_synchronous_numbers(sd15_dir, dataset, tmp_path, monkeypatch, stop):  # noqa: F811
    """8 steps over 2 epochs (4 each), logged every 3: steps 3, 6 and the last one, 8 (3 does not divide 8); the
    interval 4..6 spans the epoch end. Held-back values land at the same steps with the same floats."""
    kw = dict(epochs=2, log_every_n_steps=3, save_every_n_epochs=1, save_state=False, stop_after_steps=stop)
    sync = train(tiny_config(sd15_dir, dataset, tmp_path / "sync", **kw))
    LateReadback.made.clear()
    monkeypatch.setattr(RB, "Readback", LateReadback)
    late = train(tiny_config(sd15_dir, dataset, tmp_path / "late", **kw))
    (rb,) = LateReadback.made
    # values really were in flight: the last ones (6 and 8; at a stop, 6) came in only at the last flush
    assert (
        rb.held_back > 0 and max(rb.in_flight) >= (0 if stop else 1) and rb.flushed[-1] == (1 if stop else 2)
    )
    steps = [3, 6] if stop else [3, 6, 8]
    assert len(sync.losses) == len(steps) and len(set(sync.losses)) == len(steps)
    assert late.losses == sync.losses  # exact floats
    assert [e.train_loss for e in late.epochs] == [e.train_loss for e in sync.epochs]
    assert len(sync.epochs) == (1 if stop else 2) and all(e.train_loss for e in sync.epochs)
    assert late.interrupted == bool(stop) and late.steps == sync.steps == (stop or 8)
    for tag in ("loss/train", "perf/it_per_s", "lr/unet"):
        got, want = _scalars(tmp_path / "late" / "logs", tag), _scalars(tmp_path / "sync" / "logs", tag)
        assert [s for s, _ in got] == [s for s, _ in want] == steps, tag
    want = [
        (s, torch.tensor(v).item()) for s, v in zip(steps, sync.losses, strict=True)
    ]  # tensorboard: float32
    assert _scalars(tmp_path / "late" / "logs", "loss/train") == want


@pytest.mark.gpu
def test_cuda_readback_waits_for_the_copy_not_the_host():
    """On CUDA the read is a non-blocking copy + event: push and poll do no host sync (sync debug mode "error")
    and return while the GPU is still busy; flush gives the exact float a synchronous .item() gives."""
    import time

    dev = torch.device("cuda")
    rb = RB.Readback(dev)
    vals = [torch.randn((), device=dev) / 3 for _ in range(4)]
    torch.cuda.synchronize()
    busy = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        busy[0].record()
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU time, queued ahead of the copies
        busy[1].record()
        t = time.perf_counter()
        for k, v in enumerate(vals[:3]):
            rb.push(k, v * 1.0)
        first = rb.poll()
        host_s = time.perf_counter() - t
        events = [e for *_, e in rb.pending]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    busy[1].synchronize()
    busy_s = busy[0].elapsed_time(busy[1]) / 1e3
    # the host came back long before the GPU finished its queue: the pushes and the poll did not wait for it
    assert busy_s > 0.2 and host_s < busy_s / 4, (host_s, busy_s)
    assert first == [] and len(events) == 3 and all(isinstance(e, torch.cuda.Event) for e in events), first
    assert rb.flush() == [(k, v.item()) for k, v in enumerate(vals[:3])]
    assert len(rb.spare) == 4  # the buffers allocated up front (allocating in push would sync) are free again
    rb.push(3, vals[3])
    assert len(rb.spare) == 3 and rb.flush() == [(3, vals[3].item())]


@pytest.mark.gpu
def test_cuda_train_graph_step_reads_back_without_host_sync(tmp_path, monkeypatch):
    """train() with the graphed step: from the 3rd optimizer step until the next flush the loop runs in sync debug
    mode "error" (any .item() / blocking copy raises), and result.losses are the exact floats of the pushed
    device tensors read synchronously, at steps 2, 4, 6, 8."""
    from tests.test_trainer_gpu import _tiny_setup
    from trainer_bridge import TrainConfig
    from trainer_bridge import fast_step as FS

    pushed: list[tuple[int, torch.Tensor]] = []

    class Checked(RB.Readback):
        def push(self, step, value):
            assert self.cuda
            pushed.append((step, value.detach().clone()))
            super().push(step, value)

        def flush(self):
            torch.cuda.set_sync_debug_mode(0)  # saves, validation and the epoch's loss read sync, on purpose
            return super().flush()

    calls = []
    real_opt = FS.FastStep.optimizer_step

    def opt_step(self):
        calls.append(1)
        if len(calls) >= 3:  # the graphs are captured by now (one bucket shape)
            torch.cuda.set_sync_debug_mode("error")
        return real_opt(self)

    monkeypatch.setattr(RB, "Readback", Checked)
    monkeypatch.setattr(FS.FastStep, "optimizer_step", opt_step)
    setup = {**_tiny_setup("sd15", tmp_path), "enable_bucket": False, "log_every_n_steps": 2, "max_steps": 8,
             "save_state": False}  # fmt: skip
    try:
        r = train(TrainConfig(**setup, output_dir=str(tmp_path / "a")))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert r.timings["step"] == "graph" and len(calls) == 8
    assert [s for s, _ in pushed] == [2, 4, 6, 8]
    assert r.losses == [t.item() for _, t in pushed]


@pytest.mark.gpu
def test_cuda_uncached_prompt_encoding_copies_token_ids_without_host_sync(tmp_path):
    """Uncached text encoders (shuffle_caption, a trained text encoder) tokenize every micro-step: the token ids go
    to the GPU from pinned memory without blocking (a pageable copy would wait for the whole GPU queue)."""
    from tests.trainer_fixtures import make_tokenizer
    from trainer_bridge.data import encode_prompts

    tok = make_tokenizer(tmp_path / "tok")
    seen = []

    def te(ids):  # stands in for the CLIP text model: only the copy of the ids is under test here
        seen.append(ids)
        return (ids.float()[..., None],)

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.cuda._sleep(50_000_000)
        emb, _ = encode_prompts([tok], [te], ["sks, photo", "red"], torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = tok(["sks, photo", "red"], padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids  # fmt: skip
    assert seen[0].is_cuda and torch.equal(emb[..., 0].cpu().long(), want)
