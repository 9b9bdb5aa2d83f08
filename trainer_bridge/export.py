"""kohya-format LoRA files: safetensors tensors named lora_unet_* / lora_te*_*, with ss_* string metadata."""

from __future__ import annotations

import hashlib
import json
from io import BytesIO
from pathlib import Path
from typing import Any

from trainer_bridge.config import TrainError, write_error

BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}


def model_hashes(tensors: dict, metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya/additional-networks compute them: sha256 of the tensor
    bytes of the file written with only the ss_* metadata, and the legacy 8-hex hash of a fixed window."""
    from safetensors.torch import save

    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    b = BytesIO(data)
    b.seek(0x100000)
    return hashlib.sha256(data[8 + n :]).hexdigest(), hashlib.sha256(b.read(0x10000)).hexdigest()[:8]


def save_lora(path: str | Path, tensors: dict, metadata: dict[str, Any]) -> Path:
    """Write tensors + metadata (values stringified as kohya does), adding sshs_* hashes; atomic."""
    meta = {
        k: v if isinstance(v, str) else json.dumps(v) if isinstance(v, dict | list) else str(v)
        for k, v in metadata.items()
    }
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hashes(tensors, meta)
    return write_safetensors(Path(path), tensors, meta)


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Atomic safetensors write: a temporary name, flushed and fsynced, then renamed; on failure (disk full) the
    temporary file is removed and the error is one line. (safetensors' own save_file ignores a failed flush.)"""
    import os

    from safetensors.torch import save

    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = save(tensors, metadata)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None
    return path


def load_lora(path: str | Path) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a LoRA safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TrainError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise TrainError(f"{path} is not a readable safetensors file ({e})") from None


def lora_info(path: str | Path) -> dict[str, Any]:
    """Summary of a LoRA file for `curate lora-info`: rank, alpha, base model, lrs, modules, tag frequency."""
    tensors, meta = load_lora(path)
    ranks = {int(v.shape[0]) for k, v in tensors.items() if k.endswith("lora_down.weight")}
    alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    modules = {k.split(".")[0] for k in tensors}

    def js(key: str) -> Any:
        try:
            return json.loads(meta[key])
        except (KeyError, ValueError):
            return None

    def num(key: str, kind: type) -> Any:  # odd metadata (ss_network_dim = "abc") reads as 0, not a traceback
        try:
            return kind(float(meta.get(key, 0)))
        except (TypeError, ValueError, OverflowError):
            return kind(0)

    tags = js("ss_tag_frequency")
    top: dict[str, int] = {}
    for freq in tags.values() if isinstance(tags, dict) else []:
        for t, n in freq.items() if isinstance(freq, dict) else []:
            if isinstance(n, int | float) and not isinstance(n, bool):
                top[str(t)] = top.get(str(t), 0) + int(n)
    return {
        "file": str(path),
        "rank": num("ss_network_dim", int) or (max(ranks) if ranks else 0),
        "alpha": num("ss_network_alpha", float) or (max(alphas) if alphas else 0.0),
        "ranks": sorted(ranks),
        "modules": len(modules),
        "unet_modules": sum(m.startswith("lora_unet_") for m in modules),
        "text_encoder_modules": sum(m.startswith("lora_te") for m in modules),
        "base_model": meta.get("ss_base_model_version", ""),
        "base_model_name": meta.get("ss_sd_model_name", ""),
        "base_model_hash": meta.get("ss_sd_model_hash", ""),
        "v_prediction": meta.get("ss_v_parameterization", "False") == "True",
        "network_module": meta.get("ss_network_module", ""),
        "network_args": args if isinstance(args := js("ss_network_args"), dict) else {},
        "learning_rate": meta.get("ss_learning_rate", ""),
        "unet_lr": meta.get("ss_unet_lr", ""),
        "text_encoder_lr": meta.get("ss_text_encoder_lr", ""),
        "optimizer": meta.get("ss_optimizer", ""),
        "epochs": meta.get("ss_num_epochs", ""),
        "steps": meta.get("ss_steps", ""),
        "resolution": meta.get("ss_resolution", ""),
        "num_train_images": meta.get("ss_num_train_images", ""),
        "top_tags": sorted(top.items(), key=lambda kv: -kv[1])[:20],
        "model_hash": meta.get("sshs_model_hash", ""),
        "metadata": meta,
    }
