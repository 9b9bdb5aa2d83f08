"""WD taggers (SmilingWolf v3) through torch + timm: ``model.safetensors`` + ``config.json`` + ``selected_tags.csv``.

Preprocessing is the v3 reference's (SmilingWolf's wdv3-timm script): alpha on white, centred white pad to a
square, then timm's eval transform built from the config's ``pretrained_cfg`` (resize to the input size with
its interpolation, centre crop at ``crop_pct``, ToTensor /255, Normalize(mean, std)), RGB -> BGR, NCHW; the
logits go through a sigmoid. Decoding, padding and resizing run on CPU threads (uint8, the exact pixels the
ONNX path sees); the scale, the normalisation and the channel swap run on the device in float32.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import CurateError, require
from .wd14 import ModelFiles, preprocess_u8, read_labels

MAX_AUTO_BATCH = 128


@dataclass(frozen=True)
class TimmConfig:
    """The parts of a timm hub ``config.json`` that build the model and its input transform."""

    arch: str
    num_classes: int
    model_args: dict[str, Any] = field(default_factory=dict)
    size: int = 448
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "center"


def read_timm_config(path: Path) -> TimmConfig:
    """Parse a timm ``config.json`` (the current form with ``pretrained_cfg`` or the older flat one)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        pre = raw.get("pretrained_cfg", raw)
        arch = raw["architecture"]
        num_classes = int(raw.get("num_classes", pre.get("num_classes")))
        input_size = pre.get("input_size", [3, 448, 448])
        h, w = int(input_size[-2]), int(input_size[-1])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CurateError(
            f"cannot read timm config {path}: {exc}; it needs architecture, num_classes and pretrained_cfg"
        ) from None
    if h != w:
        raise CurateError(f"{path}: input size {w}x{h} is not square; WD taggers take square inputs")
    cfg = TimmConfig(
        arch=arch,
        num_classes=num_classes,
        model_args=dict(raw.get("model_args") or {}),
        size=h,
        mean=tuple(float(v) for v in pre.get("mean", (0.5, 0.5, 0.5))),  # type: ignore[arg-type]
        std=tuple(float(v) for v in pre.get("std", (0.5, 0.5, 0.5))),  # type: ignore[arg-type]
        interpolation=str(pre.get("interpolation") or "bicubic"),
        crop_pct=float(pre.get("crop_pct") or 0.875),  # timm's default when unset
        crop_mode=str(pre.get("crop_mode") or "center"),
    )
    if cfg.crop_pct > 1.0 or cfg.crop_mode not in ("center", "squash", "border"):
        raise CurateError(f"{path}: crop_pct {cfg.crop_pct} / crop_mode {cfg.crop_mode!r} is not supported")
    return cfg


def prepare_u8(img: Image.Image, size: int, scale: int, resample: int) -> np.ndarray:
    """Pad to a white square, resize to ``scale`` and centre-crop ``size`` (timm eval transform), uint8 RGB."""
    if scale == size:
        return preprocess_u8(img, size, Image.Resampling(resample))
    sq = preprocess_u8(img, scale, Image.Resampling(resample))
    top = int(round((scale - size) / 2.0))  # torchvision CenterCrop
    return np.ascontiguousarray(sq[top : top + size, top : top + size])


def torch_device(device: str):
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a torch.device, or a one-line error when CUDA is absent."""
    torch = require("torch", "tag")
    if device == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CurateError(
                f"--device {device}: torch {torch.__version__} sees no CUDA GPU; install a CUDA build of torch "
                "or pass --device cpu"
            )
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise CurateError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", idx)
    raise CurateError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


class _Ready:
    def __init__(self, value: np.ndarray) -> None:
        self.value = value

    def result(self) -> np.ndarray:
        return self.value


class _Pending:
    """Scores being copied back from the GPU into pinned memory; ``result`` waits for the copy only."""

    def __init__(self, event, out) -> None:
        self.event, self.out = event, out

    def result(self) -> np.ndarray:
        self.event.synchronize()
        return self.out.numpy()


class TorchTagger:
    """A timm WD tagger on torch. ``submit`` queues a uint8 RGB NHWC batch on the device and returns at once."""

    backend = "torch"

    def __init__(
        self, files: ModelFiles, *, device: str = "auto", dtype: str = "auto", compile: bool = False
    ) -> None:
        torch = require("torch", "tag")
        timm = require("timm", "tag")
        from safetensors.torch import load_file

        assert files.config is not None and files.weights is not None and files.tags is not None
        self.model = files.name
        self.cfg = read_timm_config(files.config)
        self.labels = read_labels(files.tags)
        if self.cfg.num_classes != len(self.labels):
            raise CurateError(
                f"{files.config} has {self.cfg.num_classes} classes but {files.tags} lists {len(self.labels)} tags"
            )
        self.torch_device = torch_device(device)
        self.device = str(self.torch_device)
        self.cuda = self.torch_device.type == "cuda"
        self.notices: list[str] = []
        try:
            net = timm.create_model(
                self.cfg.arch, pretrained=False, num_classes=self.cfg.num_classes, **self.cfg.model_args
            )
        except RuntimeError as exc:  # unknown architecture
            raise CurateError(
                f"timm {timm.__version__} cannot build {self.cfg.arch!r} ({str(exc).splitlines()[0][:120]}); "
                "pip install -U timm"
            ) from None
        try:
            net.load_state_dict(load_file(str(files.weights)), strict=True)
        except (RuntimeError, OSError) as exc:
            raise CurateError(
                f"{files.weights} does not fit {self.cfg.arch} from {files.config}: {str(exc).splitlines()[0][:200]}"
            ) from None
        self.conv = not any(k in self.cfg.arch for k in ("vit", "swin", "eva", "deit", "beit"))
        self._mf = torch.channels_last if self.conv else torch.contiguous_format
        self.net = net.eval().to(self.torch_device, memory_format=self._mf)
        # auto: bf16 (or fp16) autocast on CUDA, fp32 on the CPU; bf16 / fp16: weights and activations in that
        # type (faster, a little further from the fp32 reference); fp32: no reduced precision.
        if dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise CurateError(f"unknown dtype {dtype!r} for the torch tagger; use auto, fp32, bf16 or fp16")
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}
        self.amp = self.cast = None
        if dtype == "auto" and self.cuda:
            self.amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            self.dtype = f"{'bf16' if self.amp == torch.bfloat16 else 'fp16'} autocast"
        elif dtype in half:
            self.cast = half[dtype]
            self.net = self.net.to(self.cast)
            self.dtype = f"{dtype} weights"
        else:
            self.dtype = "fp32"
        self.size = self.cfg.size
        # The reference normalises RGB and then swaps to BGR; the swap happens first here, so mean/std flip too.
        self._mean = torch.tensor(self.cfg.mean[::-1], device=self.torch_device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.cfg.std[::-1], device=self.torch_device).view(1, 3, 1, 1)
        self._scale = math.floor(self.size / self.cfg.crop_pct)
        self._resample = Image.Resampling[self.cfg.interpolation.upper()]
        self._runner = ThreadPoolExecutor(1)
        # On CUDA the model runs on a stream of its own, not the legacy default stream, which every blocking
        # stream and synchronous CUDA call (libraries such as nvJPEG make some) would wait for or serialise with.
        self.stream = torch.cuda.Stream(self.torch_device) if self.cuda else None
        self.compiled, self._compiled_n, self._graphs_warm = False, 0, None
        self.default_batch = self._auto_batch() if self.cuda else 32
        # torch.compile after the memory probe, for one fixed batch shape: partial batches are padded up to
        # it (a new shape would compile again); ``warm`` compiles before the first real batch.
        self.compile_seconds = 0.0
        if compile:
            self.compiled = True
            # inductor starts its pool of compile-worker processes (one per core, each importing torch) at the
            # first compile; when its cache already holds the graph the compile ends in seconds and those
            # processes would boot while the images are being tagged, taking the cores the decoders need.
            # Without the warm-up, the pool starts only if a kernel really has to be compiled.
            os.environ.setdefault("TORCH_WARM_POOL", "0")
            self.net = torch.compile(self.net, dynamic=False)
            self.dtype += ", compiled"

    def warm(self, batch: int) -> float:
        """Compile for batches of ``batch`` now (a compiled model only), so loading, not tagging, pays for it."""
        if not self.compiled or (self._graphs_warm is not None and self._compiled_n == batch):
            return 0.0
        import time

        t0 = time.perf_counter()
        self._compiled_n = batch
        self.predict(np.zeros((batch, self.size, self.size, 3), np.uint8))
        self._graphs_warm = _compiled_graphs()
        _stop_compile_workers()
        self.compile_seconds += time.perf_counter() - t0
        return time.perf_counter() - t0

    @property
    def recompiles(self) -> int:
        """Graphs torch.compile built after ``warm`` (0 when every batch hit the warmed one; -1 if never warmed)."""
        if not self.compiled or self._graphs_warm is None:
            return -1 if self.compiled else 0
        return _compiled_graphs() - self._graphs_warm

    def check_recompiles(self) -> None:
        """Add a notice when tagging compiled again after ``warm`` (it pays the compile once more)."""
        n = self.recompiles
        msg = f"torch.compile compiled {n} more graph(s) while tagging (TORCH_LOGS=recompiles says why)"
        if n > 0 and msg not in self.notices:
            self.notices.append(msg)

    def describe(self) -> str:
        """One line for the summary: backend, device, precision."""
        where = self.device
        if self.cuda:
            where += f" ({self._torch.cuda.get_device_name(self.torch_device)})"
        compiled = f" in {self.compile_seconds:.1f} s" if self.compile_seconds else ""
        return f"torch {self._torch.__version__} + timm ({self.cfg.arch}), {where}, {self.dtype}{compiled}"

    @property
    def _torch(self):
        import torch

        return torch

    @property
    def decode_spec(self) -> tuple[int, int, int]:
        """Arguments of ``prepare_u8`` after the image: picklable, for decoding in other processes."""
        return (self.size, self._scale, int(self._resample))

    def preprocess_image(self, img: Image.Image) -> np.ndarray:
        """uint8 [size, size, 3] RGB: the padded square resized as timm's eval transform does; decode threads."""
        return prepare_u8(img, *self.decode_spec)

    def _forward(self, x):
        """uint8 NHWC RGB on the device -> float32 probabilities."""
        torch = self._torch
        x = x.flip(-1).permute(0, 3, 1, 2).float().div_(255.0)  # BGR, NCHW view, as ToTensor
        x = x.sub_(self._mean).div_(self._std).contiguous(memory_format=self._mf)
        if self.cast is not None:
            x = x.to(self.cast)
        if self.amp is not None:
            with torch.autocast(self.torch_device.type, dtype=self.amp):
                logits = self.net(x)
        else:
            logits = self.net(x)
        return logits.float().sigmoid_()

    def collate(self, arrays: list[np.ndarray]):
        """Stack preprocessed images straight into pinned host memory (one copy less per batch on CUDA)."""
        if not self.cuda:
            return np.stack(arrays)
        buf = self._torch.empty((len(arrays), *arrays[0].shape), dtype=self._torch.uint8, pin_memory=True)
        np.stack(arrays, out=buf.numpy())
        return buf

    def _run(self, x):
        """Probabilities of a uint8 batch on the device. Compiled, every call has the one warmed batch size:
        smaller batches are padded with zero images (their rows dropped), bigger ones run in pieces, so no
        batch after ``warm`` compiles again (a new shape under ``dynamic=False`` would)."""
        if not self.compiled:
            return self._forward(x)
        torch = self._torch
        n = len(x)
        m = self._compiled_n = self._compiled_n or n  # without ``warm`` the first batch fixes the shape
        if n > m:
            return torch.cat([self._run(x[i : i + m]) for i in range(0, n, m)])
        if n < m:
            x = torch.cat([x, x.new_zeros((m - n, *x.shape[1:]))])
        return self._forward(x)[:n]

    def _launch(self, batch):
        torch = self._torch
        with torch.inference_mode():
            x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
            if not self.cuda:
                return _Ready(self._run(x).numpy())
            caller = torch.cuda.current_stream(self.torch_device)
            with torch.cuda.stream(self.stream):
                self.stream.wait_stream(caller)  # a batch the caller placed on the device is complete first
                if x.device != self.torch_device:  # host batch (already on the device after nvJPEG decoding)
                    if not x.is_pinned():
                        x = x.pin_memory()
                    x = x.to(self.torch_device, non_blocking=True)
                else:
                    x.record_stream(self.stream)  # its memory is not reused before the model has read it
                probs = self._run(x)
                out = torch.empty(probs.shape, dtype=torch.float32, pin_memory=True)
                out.copy_(probs, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            return _Pending(event, out)

    def submit(self, batch):
        """Queue a batch; ``.result()`` gives [N, n_tags] scores. On CUDA only the launch happens here."""
        if len(batch) == 0:
            return _Ready(np.zeros((0, len(self.labels)), np.float32))
        if not self.cuda:
            fut: Future = self._runner.submit(lambda: self._launch(batch).result())
            return fut
        try:
            return self._launch(batch)
        except self._torch.cuda.OutOfMemoryError:
            return _Ready(self._split(batch))

    def _split(self, batch) -> np.ndarray:
        """Out of GPU memory: run the batch in halves (and remember the smaller size)."""
        self._torch.cuda.empty_cache()
        if len(batch) == 1:
            raise CurateError("out of GPU memory at batch 1; pass --device cpu or free the GPU")
        half = len(batch) // 2
        self.default_batch = max(1, half)
        msg = f"out of GPU memory at batch {len(batch)}; continuing with batches of {half} (--batch-size)"
        if msg not in self.notices:
            self.notices.append(msg)
        return np.concatenate([self.predict(batch[:half]), self.predict(batch[half:])])

    def predict(self, batch) -> np.ndarray:
        """[N, size, size, 3] uint8 RGB -> [N, n_tags] probabilities (blocking)."""
        return np.asarray(self.submit(batch).result(), dtype=np.float32)

    def _auto_batch(self) -> int:
        """Batch sized to free GPU memory from a probe at batch 4 (also warms up the kernels)."""
        torch = self._torch
        probe = 4
        x = np.zeros((probe, self.size, self.size, 3), np.uint8)
        try:
            torch.cuda.synchronize(self.torch_device)
            base = torch.cuda.memory_allocated(self.torch_device)
            torch.cuda.reset_peak_memory_stats(self.torch_device)
            self._launch(x).result()
            per_image = max(1, (torch.cuda.max_memory_allocated(self.torch_device) - base) / probe)
            free, _ = torch.cuda.mem_get_info(self.torch_device)
        except Exception:
            return 16
        fits = int(0.5 * free / per_image)
        return max(1, min(MAX_AUTO_BATCH, fits // 8 * 8 if fits >= 8 else fits))


def _stop_compile_workers() -> None:
    """Shut inductor's compile-worker processes down once the model is compiled (idle, they hold memory and a
    watchdog thread; a later compile starts them again)."""
    try:
        from torch._inductor import async_compile
    except ImportError:
        return
    if getattr(async_compile, "_pool_set", None):
        async_compile.shutdown_compile_workers()


def _compiled_graphs() -> int:
    """Graphs torch.compile has built in this process (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def prepare_tensor(img, size: int, scale: int, interpolation: str = "bicubic"):
    """uint8 [3, H, W] RGB tensor (any device) -> uint8 [size, size, 3]: ``prepare_u8`` done with torch ops.

    Centred white pad (offset ``(side - w) // 2``), then a resize to ``scale`` only when the side differs (antialiased
    ``interpolate``, within a few levels of PIL's filter), then the centre crop. Used after nvJPEG decoding so that
    pad and resize run on the GPU; on the CPU it is what the tests compare with the PIL path.
    """
    import torch
    import torch.nn.functional as F

    _, h, w = img.shape
    side = max(h, w)
    if h != w:
        sq = torch.full((3, side, side), 255, dtype=torch.uint8, device=img.device)
        top, left = (side - h) // 2, (side - w) // 2
        sq[:, top : top + h, left : left + w] = img
    else:
        sq = img
    if side != scale:
        mode = interpolation if interpolation in ("bicubic", "bilinear") else "bicubic"
        x = F.interpolate(
            sq[None].float(), size=(scale, scale), mode=mode, antialias=True, align_corners=False
        )
        sq = x[0].round_().clamp_(0, 255).to(torch.uint8)
    if scale != size:
        top = int(round((scale - size) / 2.0))
        sq = sq[:, top : top + size, top : top + size]
    return sq.permute(1, 2, 0)


def decode_jpegs(datas: list, device) -> list:
    """JPEG byte tensors -> uint8 [3, H, W] RGB on ``device`` in one nvJPEG call; None for an image it rejects."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        if len(datas) == 1:
            return [None]
    return [decode_jpegs([d], device)[0] for d in datas]


def gpu_batch(tagger: TorchTagger, datas: list):
    """JPEG bytes (uint8 tensors) -> (uint8 [N, size, size, 3] on the tagger's device, ok mask) via nvJPEG.

    Images nvJPEG rejects (progressive CMYK, corrupt) come back not ok; the caller decodes them with PIL.
    """
    import torch

    imgs = decode_jpegs(datas, tagger.torch_device)
    n, s = len(datas), tagger.size
    out = torch.empty((n, s, s, 3), dtype=torch.uint8, device=tagger.torch_device)
    ok = []
    for i, img in enumerate(imgs):
        ok.append(img is not None)
        if img is not None:
            out[i] = prepare_tensor(img, s, tagger._scale, tagger.cfg.interpolation)
    return out, ok
