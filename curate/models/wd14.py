"""WD14 (SmilingWolf) taggers: ``selected_tags.csv`` plus ``model.onnx`` (onnxruntime, this module) and/or
timm ``model.safetensors`` + ``config.json`` (torch, ``wd_torch.py``); ``load_tagger`` picks the backend.

Preprocessing follows the reference tagger (SmilingWolf's wd-tagger app): composite transparency on white,
pad to a square on white with the image centred (left/top offset ``(side - w) // 2``), resize to the
model's input size with PIL bicubic (only when the side differs), float32 0-255, RGB -> BGR, NHWC.
The ONNX graph does its own normalisation and ends in a sigmoid.
"""

from __future__ import annotations

import csv
import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import CurateError, require
from . import hf_download, is_hub_id, local_dir_for

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
BACKENDS = ("auto", "torch", "onnx")
CATEGORY_NAMES = {0: "general", 1: "artist", 3: "copyright", 4: "character", 5: "meta", 9: "rating"}

# Number of ``session.run`` calls made by every tagger in this process (tests count them).
RUNS = 0
_RUNS_LOCK = threading.Lock()


def preprocess_u8(
    img: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> np.ndarray:
    """One image -> uint8 [size, size, 3] RGB: alpha on white, centred white pad, bicubic resize (reference)."""
    if img.mode != "RGB":
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        img = canvas.convert("RGB")
    w, h = img.size
    side = max(w, h)
    if w != h:
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(img, ((side - w) // 2, (side - h) // 2))
    else:
        square = img
    if side != size:
        square = square.resize((size, size), resample)
    return np.asarray(square, dtype=np.uint8)


def preprocess(img: Image.Image, size: int) -> np.ndarray:
    """One RGB image -> float32 [size, size, 3] BGR array, 0-255, exactly as the reference tagger."""
    return np.ascontiguousarray(preprocess_u8(img, size)[:, :, ::-1], dtype=np.float32)


@dataclass(frozen=True)
class Labels:
    names: list[str]
    categories: np.ndarray  # int per tag, from selected_tags.csv

    def __len__(self) -> int:
        return len(self.names)


def read_labels(path: Path) -> Labels:
    """Parse ``selected_tags.csv`` (columns tag_id,name,category,count)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        names = [r["name"] for r in rows]
        cats = np.array([int(r["category"]) for r in rows], dtype=np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise CurateError(
            f"cannot read tag list {path}: {exc}; it must be a CSV with columns tag_id,name,category,count"
        ) from None
    return Labels(names, cats)


@dataclass(frozen=True)
class ModelFiles:
    """What a tagger folder, file or Hugging Face repo holds locally (None: absent)."""

    name: str
    tags: Path | None
    onnx: Path | None
    weights: Path | None  # timm model.safetensors
    config: Path | None  # timm config.json
    repo: bool  # a Hugging Face repo id (files from the local cache)

    @property
    def has_torch(self) -> bool:
        return self.weights is not None and self.config is not None


def locate(model: str) -> ModelFiles:
    """A local folder, a ``.onnx`` file or a Hugging Face repo id -> the tagger files present, offline only."""
    p = Path(model).expanduser()

    def present(folder: Path, name: str) -> Path | None:
        return folder / name if (folder / name).is_file() else None

    if p.is_dir():
        return ModelFiles(
            model, present(p, TAGS_FILE), present(p, MODEL_FILE), present(p, WEIGHTS_FILE), present(p, CONFIG_FILE),
            False,
        )  # fmt: skip
    if p.suffix == ".onnx" and p.exists():
        return ModelFiles(model, present(p.parent, TAGS_FILE), p, None, None, False)
    if p.exists():
        raise CurateError(
            f"tagger {model} is a file; pass the folder that holds {MODEL_FILE} (or timm {WEIGHTS_FILE} + "
            f"{CONFIG_FILE}) and {TAGS_FILE}"
        )
    if not is_hub_id(model):
        kind = "file" if p.suffix == ".onnx" else "folder"
        raise CurateError(
            f"no such {kind} {model}; --model takes a folder with {MODEL_FILE} (or timm {WEIGHTS_FILE} + "
            f"{CONFIG_FILE}) + {TAGS_FILE}, or a Hugging Face repo id (owner/name)"
        )
    hub = require("huggingface_hub", "tag")
    found: dict[str, Path | None] = {}
    for name in (TAGS_FILE, MODEL_FILE, WEIGHTS_FILE, CONFIG_FILE):
        try:  # never downloads: a missing model is one clear message, not minutes of retries offline
            found[name] = Path(hub.hf_hub_download(model, name, local_files_only=True))
        except Exception:
            found[name] = None
    return ModelFiles(
        model, found[TAGS_FILE], found[MODEL_FILE], found[WEIGHTS_FILE], found[CONFIG_FILE], True
    )


def missing_message(files: ModelFiles, backend: str) -> str:
    """One line: which files the chosen backend needs and how to get them."""
    need = [*((WEIGHTS_FILE, CONFIG_FILE) if backend == "torch" else (MODEL_FILE,)), TAGS_FILE]
    if files.repo:
        local = local_dir_for(files.name)
        return (
            f"tagger {files.name} is not downloaded for the {backend} backend (not in the Hugging Face cache "
            f"{_hf_cache()}); on a connected machine run `{hf_download(files.name, tuple(need), local)}` "
            f"and pass --model ./{local}"
        )
    where = Path(files.name).expanduser()
    folder = where.parent if where.suffix == ".onnx" else where
    lacking = [n for n in need if not (folder / n).is_file()]
    return f"tagger folder {folder} lacks {' and '.join(lacking)}; put {' + '.join(need)} there"


def resolve_model(model: str) -> tuple[Path, Path]:
    """(model.onnx, selected_tags.csv) of a folder, file or cached repo; CurateError naming the fix if absent."""
    files = locate(model)
    if files.onnx is None or files.tags is None:
        raise CurateError(missing_message(files, "onnx"))
    return files.onnx, files.tags


def _hf_cache() -> str:
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )


NO_CUDA_EP = "onnxruntime has no CUDA provider: pip install 'curate[tag-gpu]'"


def _providers(device: str) -> tuple[list, str | None]:
    """Providers to try for ``device``, and a notice when CUDA was wanted (or possible) but is not there."""
    ort = require("onnxruntime", "tag")
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"], None
    if "CUDAExecutionProvider" in available:
        idx = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        return [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"], None
    notice = None
    if device.startswith("cuda") or _cuda_visible():
        notice = f"{NO_CUDA_EP} (uninstall onnxruntime first); running on the CPU"
    return ["CPUExecutionProvider"], notice


def _cuda_visible() -> bool:
    """Whether an NVIDIA GPU looks present, without importing torch."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def _dynamic_copy(onnx_path: Path) -> Path | None:
    """Rewrite a fixed batch dimension as dynamic (cached under ~/.cache/curate/onnx); None if impossible."""
    try:
        import onnx
    except ImportError:
        return None
    st = onnx_path.stat()
    key = hashlib.sha256(f"{onnx_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = Path(os.path.expanduser("~/.cache/curate/onnx")) / f"{key}.onnx"
    if out.exists():
        return out
    try:
        proto = onnx.load(str(onnx_path))
        for v in list(proto.graph.input) + list(proto.graph.output):
            dims = v.type.tensor_type.shape.dim
            if dims:
                dims[0].ClearField("dim_value")
                dims[0].dim_param = "batch"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        onnx.save(proto, str(tmp))
        tmp.replace(out)
        return out
    except Exception:
        return None


class WD14Tagger:
    """An ONNX WD14 tagger. ``predict`` takes preprocessed NHWC batches of any length."""

    backend = "onnx"

    def __init__(self, model: str, *, device: str = "auto", threads: int = 0) -> None:
        self.model = model
        onnx_path, csv_path = resolve_model(model)
        self.labels = read_labels(csv_path)
        self.providers, notice = _providers(device)
        self.notices: list[str] = [notice] if notice else []
        self._threads = threads
        self.session = self._session(onnx_path)
        tried_cuda = isinstance(self.providers[0], tuple)
        if tried_cuda and self.session.get_providers()[0] != "CUDAExecutionProvider":
            # onnxruntime-gpu is installed but its CUDA/cuDNN libraries did not load: it fell back quietly.
            self.notices.append(
                "onnxruntime's CUDA provider did not start (CUDA/cuDNN libraries missing or mismatched); "
                "running on the CPU"
            )
        inp = self.session.get_inputs()[0]
        shape = inp.shape
        if len(shape) != 4 or shape[3] != 3:
            raise CurateError(
                f"{onnx_path} does not take NHWC RGB input (input shape {shape}); not a WD14 tagger"
            )
        self.size = shape[1] if isinstance(shape[1], int) else 448
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        self.dynamic = not isinstance(shape[0], int)
        if not self.dynamic and shape[0] == 1:
            # A batch-1 export: try a copy with a dynamic batch dim; keep it only if it runs a batch of 2.
            path = _dynamic_copy(onnx_path)
            if path is not None:
                try:
                    cand = self._session(path)
                    zeros = np.zeros((2, self.size, self.size, 3), np.float32)
                    if cand.run(None, {self.input_name: zeros})[0].shape[0] == 2:
                        self.session, self.dynamic = cand, True
                except Exception:
                    pass
        n_out = self.session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.labels):
            raise CurateError(
                f"{onnx_path} outputs {n_out} scores but {csv_path} lists {len(self.labels)} tags"
            )
        self._pool = None if self.dynamic else ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))
        self._runner = ThreadPoolExecutor(1)  # one run in flight beside the caller (see ``submit``)
        provider = self.session.get_providers()[0]
        self.device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        self.default_batch = 32

    def describe(self) -> str:
        """One line for the summary: backend, device, provider."""
        return f"onnx ({self.session.get_providers()[0]}), {'dynamic batch' if self.dynamic else 'batch 1 x threads'}"

    def preprocess_image(self, img: Image.Image) -> np.ndarray:
        """What ``predict`` takes for one image (float32 BGR 0-255 HWC); runs in decode threads."""
        return preprocess(img, self.size)

    def _session(self, path: Path):
        ort = require("onnxruntime", "tag")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self._threads:
            opts.intra_op_num_threads = self._threads
        try:
            return ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as exc:
            raise CurateError(f"cannot load ONNX model {path}: {str(exc).splitlines()[0][:200]}") from None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        global RUNS
        with _RUNS_LOCK:
            RUNS += 1
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """[N, size, size, 3] float32 BGR -> [N, n_tags] probabilities."""
        if len(batch) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        if self.dynamic:
            return np.asarray(self._run(batch), dtype=np.float32)
        # Fixed batch 1: several concurrent runs of the one session (onnxruntime's Run is thread-safe).
        assert self._pool is not None
        parts = list(self._pool.map(lambda x: self._run(x[None]), list(batch)))
        return np.concatenate(parts).astype(np.float32)

    def collate(self, arrays: list[np.ndarray]) -> np.ndarray:
        return np.stack(arrays)

    def submit(self, batch: np.ndarray) -> Future:
        """Start ``predict`` on a worker thread (onnxruntime releases the GIL); ``.result()`` gives the scores."""
        return self._runner.submit(self.predict, batch)


def choose_backend(files: ModelFiles, device: str, backend: str = "auto") -> tuple[str, str]:
    """(backend, why): ``auto`` takes torch when timm weights are there and CUDA is usable, else onnx."""
    if backend not in BACKENDS:
        raise CurateError(f"unknown tagger backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend, f"--backend {backend}"
    if files.has_torch and device != "cpu" and _torch_cuda():
        return "torch", "timm weights present and torch sees CUDA"
    if files.onnx is not None:
        if files.has_torch:
            why = "--device cpu" if device == "cpu" else "torch has no CUDA here"
            return "onnx", f"{why}; the ONNX model is at least as fast on the CPU"
        return "onnx", "only model.onnx is present"
    if files.has_torch:
        return "torch", "only timm weights are present"
    return ("torch" if device != "cpu" and _cuda_visible() else "onnx"), "no model files found"


def _torch_cuda() -> bool:
    """torch importable with a usable CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


_CACHE: dict[tuple[str, str, str, str], Any] = {}


def load_tagger(
    model: str, device: str = "auto", backend: str = "auto", dtype: str = "auto", *, compile: bool = False
) -> Any:
    """Cached loader: the same (model, device, backend, dtype, compile) gives the same tagger (ONNX or torch).

    The tagger carries ``backend``, ``device``, ``notices`` (one-line warnings, e.g. CPU fallback) and
    ``why`` (how the backend was picked).
    """
    key = (model, device, backend, dtype, compile)
    if key not in _CACHE:
        files = locate(model)
        chosen, why = choose_backend(files, device, backend)
        if chosen == "torch":
            if not files.has_torch or files.tags is None:
                raise CurateError(missing_message(files, "torch"))
            from .wd_torch import TorchTagger

            tagger: Any = TorchTagger(files, device=device, dtype=dtype, compile=compile)
        else:
            if files.onnx is None or files.tags is None:
                raise CurateError(missing_message(files, "onnx"))
            tagger = WD14Tagger(model, device=device)
        tagger.why = why
        _CACHE[key] = tagger
    return _CACHE[key]


def mcut_threshold(probs: np.ndarray) -> float:
    """Maximum Cut Thresholding (Largeron et al. 2012): the midpoint of the largest gap in sorted scores."""
    if len(probs) < 2:
        return float(probs[0]) if len(probs) else 1.0
    s = np.sort(np.asarray(probs, dtype=np.float64))[::-1]
    t = int(np.argmax(s[:-1] - s[1:]))
    return float((s[t] + s[t + 1]) / 2)
