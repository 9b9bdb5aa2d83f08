"""WD14 (SmilingWolf) taggers through onnxruntime: ``model.onnx`` + ``selected_tags.csv``.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import CurateError, require
from . import hf_download, is_hub_id, local_dir_for

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
CATEGORY_NAMES = {0: "general", 1: "artist", 3: "copyright", 4: "character", 5: "meta", 9: "rating"}

# Number of ``session.run`` calls made by every tagger in this process (tests count them).
RUNS = 0
_RUNS_LOCK = threading.Lock()


def preprocess(img: Image.Image, size: int) -> np.ndarray:
    """One RGB image -> float32 [size, size, 3] BGR array, 0-255, exactly as the reference tagger."""
    if img.mode != "RGB":
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        img = canvas.convert("RGB")
    w, h = img.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(img, ((side - w) // 2, (side - h) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(square, dtype=np.float32)[:, :, ::-1])


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


def resolve_model(model: str) -> tuple[Path, Path]:
    """A local folder or a Hugging Face repo id -> (model.onnx, selected_tags.csv), offline first."""
    p = Path(model).expanduser()
    if p.is_dir():
        onnx_path, csv_path = p / MODEL_FILE, p / TAGS_FILE
        missing = [f.name for f in (onnx_path, csv_path) if not f.exists()]
        if missing:
            raise CurateError(
                f"tagger folder {p} lacks {' and '.join(missing)}; put {MODEL_FILE} and {TAGS_FILE} there"
            )
        return onnx_path, csv_path
    if p.suffix == ".onnx" and p.exists():
        csv_path = p.with_name(TAGS_FILE)
        if not csv_path.exists():
            raise CurateError(f"no {TAGS_FILE} next to {p}; put the model's tag list there")
        return p, csv_path
    if p.exists():
        raise CurateError(
            f"tagger {model} is a file; pass the folder that holds {MODEL_FILE} and {TAGS_FILE}"
        )
    if not is_hub_id(model):
        kind = "file" if p.suffix == ".onnx" else "folder"
        raise CurateError(
            f"no such {kind} {model}; --model takes a folder with {MODEL_FILE} + {TAGS_FILE} "
            "or a Hugging Face repo id (owner/name)"
        )
    hub = require("huggingface_hub", "tag")
    files = []
    for name in (MODEL_FILE, TAGS_FILE):
        try:  # never downloads: a missing model is one clear message, not minutes of retries offline
            files.append(Path(hub.hf_hub_download(model, name, local_files_only=True)))
        except Exception:
            break
    if len(files) != 2:
        local = local_dir_for(model)
        raise CurateError(
            f"tagger {model} is not downloaded (no folder {model} here, not in the Hugging Face cache "
            f"{_hf_cache()}); on a connected machine run `{hf_download(model, (MODEL_FILE, TAGS_FILE), local)}` "
            f"and pass --model ./{local}"
        )
    return files[0], files[1]


def _hf_cache() -> str:
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )


def _providers(device: str) -> list:
    ort = require("onnxruntime", "tag")
    available = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" not in available:
        raise CurateError(
            "onnxruntime has no CUDA provider here; pip install onnxruntime-gpu, or pass --device cpu"
        )
    if device in ("auto",) or device.startswith("cuda"):
        if "CUDAExecutionProvider" in available:
            idx = int(device.split(":")[1]) if ":" in device else 0
            return [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


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

    def __init__(self, model: str, *, device: str = "auto", threads: int = 0) -> None:
        self.model = model
        onnx_path, csv_path = resolve_model(model)
        self.labels = read_labels(csv_path)
        self.providers = _providers(device)
        self._threads = threads
        self.session = self._session(onnx_path)
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


_CACHE: dict[tuple[str, str], WD14Tagger] = {}


def load_tagger(model: str, device: str = "auto") -> WD14Tagger:
    """Cached loader: the same (model, device) gives the same session."""
    key = (model, device)
    if key not in _CACHE:
        _CACHE[key] = WD14Tagger(model, device=device)
    return _CACHE[key]


def mcut_threshold(probs: np.ndarray) -> float:
    """Maximum Cut Thresholding (Largeron et al. 2012): the midpoint of the largest gap in sorted scores."""
    if len(probs) < 2:
        return float(probs[0]) if len(probs) else 1.0
    s = np.sort(np.asarray(probs, dtype=np.float64))[::-1]
    t = int(np.argmax(s[:-1] - s[1:]))
    return float((s[t] + s[t + 1]) / 2)
