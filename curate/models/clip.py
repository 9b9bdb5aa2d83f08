"""CLIP image encoder from open_clip: a built-in name + pretrained tag, an ``hf-hub:`` id or a local folder.

Offline-first: weights are only ever read from disk (a local folder, a ``.safetensors`` file, or the
Hugging Face cache); when they are missing the error names the file to download and where to put it.
Weights load from safetensors only (no pickle). Instances are cached per (model, pretrained, device).
bf16 (or fp16) on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import CurateError, require
from . import hf_download, local_dir_for, looks_like_path

SAFE_WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class ClipModel:
    """A loaded image tower plus what is needed to feed it and to key its embeddings."""

    model: Any  # open_clip CLIP module (eval, no grad)
    model_id: str  # cache key part 1: built-in name, hf-hub id, or local config name
    pretrained: str  # cache key part 2: tag, or sha256 prefix of the weights file
    device: str
    dtype: Any  # torch dtype of the weights
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    forward_calls: int = 0  # number of batches encoded (tests use it to prove cache hits)

    @property
    def key(self) -> tuple[str, str]:
        return self.model_id, self.pretrained

    @property
    def preprocess_spec(self) -> tuple[int, str, str]:
        """What the CPU side must produce (uint8 crops); models with equal specs share one crop."""
        return self.image_size, self.interpolation, self.resize_mode

    def encode(self, batch_uint8):
        """uint8 tensor [B, 3, S, S] (any device) -> L2-normalised float32 embeddings [B, D] on CPU."""
        import torch

        self.forward_calls += 1
        dev = torch.device(self.device)
        x = batch_uint8.to(dev, non_blocking=True)
        mean = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=dev).view(1, 3, 1, 1) * 255.0
        x = ((x.float() - mean) / std).to(self.dtype)
        with torch.inference_mode():
            emb = self.model.encode_image(x)
        emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        return emb.cpu()


def pick_device(device: str | None = None) -> str:
    """``None``/``auto`` -> cuda when available, else cpu. Validates explicit choices."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CurateError(f"--device {device} asked for, but torch sees no CUDA GPU; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise CurateError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    return device


@lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def weights_digest(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return "sha256:" + _file_digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _safe_weights_in(folder: Path) -> Path | None:
    for name in SAFE_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors"))
    return found[0] if found else None


def _refuse_pickle(where: str, folder: Path | None = None) -> None:
    hint = (
        f" (found {', '.join(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)})"
        if folder
        else ""
    )
    raise CurateError(
        f"{where} has no .safetensors weights{hint}; curate does not load pickled checkpoints. Convert once "
        "with: python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('W.bin', "
        "weights_only=True), 'open_clip_model.safetensors')\""
    )


def _resolve(model: str, pretrained: str | None) -> dict[str, Any]:
    """Work out (config source, weights file, cache key) without touching the network."""
    open_clip = require("open_clip", "clip", "open_clip_torch")
    path = Path(model[len("local-dir:") :] if model.startswith("local-dir:") else model).expanduser()
    if model.startswith("local-dir:") or path.is_dir():
        if not path.is_dir():
            raise CurateError(f"CLIP model folder {path} does not exist; check --model")
        cfg_file = path / "open_clip_config.json"
        if not cfg_file.is_file():
            raise CurateError(
                f"{path} has no open_clip_config.json; put the model's open_clip_config.json and "
                "open_clip_model.safetensors in that folder"
            )
        weights = _safe_weights_in(path)
        if weights is None:
            _refuse_pickle(f"CLIP model folder {path}", path)
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CurateError(f"cannot parse {cfg_file}: {exc}") from None
        if "model_cfg" not in cfg:
            raise CurateError(f"{cfg_file} lacks 'model_cfg'; it is not an open_clip config")
        return {
            "kind": "dir",
            "folder": path.resolve(),
            "weights": weights,
            "model_cfg": cfg["model_cfg"],
            "preprocess_cfg": cfg.get("preprocess_cfg", {}),
            "model_id": f"local:{cfg.get('model_name') or path.resolve().name}",
            "pretrained": weights_digest(weights),
        }
    if model.startswith("hf-hub:"):
        repo = model[len("hf-hub:") :].strip("/")
        hub = require("huggingface_hub", "clip", "huggingface_hub")
        cfg_path = hub.try_to_load_from_cache(repo, "open_clip_config.json")
        weights = None
        for name in SAFE_WEIGHT_NAMES:
            p = hub.try_to_load_from_cache(repo, name)
            if isinstance(p, str):
                weights = Path(p)
                break
        if not isinstance(cfg_path, str) or weights is None:
            local = local_dir_for(repo)
            cmd = hf_download(repo, ("open_clip_config.json", "open_clip_model.safetensors"), local)
            raise CurateError(
                f"CLIP model {model} is not in the local Hugging Face cache; on a connected machine run "
                f"`{cmd}` and pass --model ./{local}"
            )
        folder = Path(cfg_path).parent
        cfg = json.loads(Path(cfg_path).read_text(encoding="utf-8"))
        return {
            "kind": "dir",
            "folder": folder,
            "weights": weights,
            "model_cfg": cfg["model_cfg"],
            "preprocess_cfg": cfg.get("preprocess_cfg", {}),
            "model_id": model,
            "pretrained": weights_digest(weights),
        }
    if looks_like_path(model) or path.exists():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise CurateError(
            f"no such folder {model}: it {what}; --model takes a folder with open_clip_config.json + "
            "open_clip_model.safetensors, an open_clip name (ViT-B-32) or hf-hub:owner/name"
        )
    name = model.replace("/", "-")
    if name not in open_clip.list_models():
        raise CurateError(
            f"unknown CLIP model {model!r}; use an open_clip name (e.g. ViT-B-32, ViT-L-14), "
            "hf-hub:org/repo, or a folder holding open_clip_config.json + open_clip_model.safetensors"
        )
    pretrained = pretrained or "openai"
    pfile = Path(pretrained).expanduser()
    if pfile.suffix in PICKLE_SUFFIXES:
        _refuse_pickle(f"--pretrained {pretrained}")
    if pfile.suffix == ".safetensors":
        if not pfile.is_file():
            raise CurateError(f"weights file {pfile} does not exist; check --pretrained")
        return {"kind": "name", "name": name, "weights": pfile, "tag_cfg": {}, "model_id": name,
                "pretrained": weights_digest(pfile)}  # fmt: skip
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise CurateError(
            f"unknown pretrained tag {pretrained!r} for {name}; choose from {', '.join(tags) or 'none'}, "
            "or pass a .safetensors file"
        )
    repo = (tag_cfg.get("hf_hub") or "").strip("/")
    weights = None
    if repo:
        hub = require("huggingface_hub", "clip", "huggingface_hub")
        for fname in SAFE_WEIGHT_NAMES:
            p = hub.try_to_load_from_cache(repo, fname)
            if isinstance(p, str):
                weights = Path(p)
                break
    if weights is None:
        missing = f"CLIP weights {name}/{pretrained} are not on this machine (offline)"
        if not repo:
            raise CurateError(
                f"{missing}; convert them to .safetensors and pass --pretrained /path/to/open_clip_model.safetensors"
            )
        local = local_dir_for(repo)
        raise CurateError(
            f"{missing}; on a connected machine run `{hf_download(repo, ('open_clip_model.safetensors',), local)}` "
            f"and pass --pretrained ./{local}/open_clip_model.safetensors"
        )
    return {"kind": "name", "name": name, "weights": weights, "tag_cfg": tag_cfg, "model_id": name,
            "pretrained": pretrained}  # fmt: skip


def _build(spec: dict[str, Any], device: str):
    import open_clip
    import torch

    if spec["kind"] == "dir":
        # open_clip's own local-dir path; we checked above that the file it will pick is safetensors.
        found = open_clip.factory._find_checkpoint_in_dir(spec["folder"])
        if found is None or not str(found).endswith(".safetensors"):
            _refuse_pickle(f"CLIP model folder {spec['folder']}", spec["folder"])
        model = open_clip.create_model(f"local-dir:{spec['folder']}", device="cpu")
    else:
        tag = spec["tag_cfg"]
        kwargs = {k: tag[k] for k in ("interpolation", "resize_mode") if k in tag}
        if "mean" in tag:
            kwargs["image_mean"], kwargs["image_std"] = tag["mean"], tag["std"]
        model = open_clip.create_model(
            spec["name"],
            pretrained=str(spec["weights"]),
            force_quick_gelu=bool(tag.get("quick_gelu", False)),
            device="cpu",
            **kwargs,
        )
    model.eval().requires_grad_(False)
    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    # Only the image tower is used; drop the text tower's memory on the GPU.
    model = model.to(device=device, dtype=dtype)
    return model, dtype


_CACHE: dict[tuple[str, str, str], ClipModel] = {}


def load_clip(
    model: str = "ViT-B-32", pretrained: str | None = "openai", device: str | None = None
) -> ClipModel:
    """Load (once per process) an open_clip image encoder; raises CurateError when weights are missing."""
    dev = pick_device(device)
    spec = _resolve(str(model), pretrained)  # cheap: the weights digest is memoised per (size, mtime)
    key = (spec["model_id"], spec["pretrained"], dev)
    if key in _CACHE:
        return _CACHE[key]
    try:
        net, dtype = _build(spec, dev)
    except CurateError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise CurateError(f"cannot build CLIP model {model}: {str(exc).splitlines()[0][:200]}") from None
    from open_clip.model import get_model_preprocess_cfg

    pp = get_model_preprocess_cfg(net)
    size = pp.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    cm = ClipModel(
        model=net,
        model_id=spec["model_id"],
        pretrained=spec["pretrained"],
        device=dev,
        dtype=dtype,
        image_size=int(size),
        mean=tuple(pp.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        std=tuple(pp.get("std", (0.26862954, 0.26130258, 0.27577711))),
        interpolation=pp.get("interpolation", "bicubic"),
        resize_mode=pp.get("resize_mode", "shortest"),
    )
    _CACHE[key] = cm
    return cm


def save_local_model(
    model, model_cfg: dict[str, Any], folder: str | os.PathLike, name: str = "custom"
) -> Path:
    """Write an open_clip model as a folder (open_clip_config.json + open_clip_model.safetensors).

    Used by tests and benchmarks to exercise the real local-path loader with random-init weights.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from open_clip.model import get_model_preprocess_cfg

    pp = get_model_preprocess_cfg(model)
    pp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_name": name, "model_cfg": model_cfg, "preprocess_cfg": pp}, indent=1)
    )
    return folder
