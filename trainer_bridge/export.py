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


def _read_lora_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, float], dict[str, str]]:
    """(tensor shapes, alpha values, metadata) without loading the weights; TrainError if unreadable."""
    from safetensors import safe_open

    if path.is_dir():
        raise TrainError(f"{path} is a folder; pass the LoRA .safetensors file inside it")
    if not path.is_file():
        raise TrainError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            alphas = {}
            for k in shapes:
                if k.endswith(".alpha"):
                    try:
                        alphas[k] = float(f.get_tensor(k).float().flatten()[0])
                    except Exception:  # an empty or odd alpha tensor: reported as missing, not a crash
                        continue
    except OSError as e:
        raise TrainError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise TrainError(f"{path} is not a readable safetensors file ({first})") from None
    return shapes, alphas, meta


def _number(meta: dict[str, str], key: str, kind: type, problems: list[str]) -> float | int | None:
    raw = meta.get(key)
    if raw in (None, ""):
        return None
    try:
        v = kind(float(raw)) if kind is int else kind(raw)
    except (TypeError, ValueError, OverflowError):
        problems.append(f"{key} {str(raw)[:30]!r} is not a number")
        return None
    if v != v or v in (float("inf"), float("-inf")):  # NaN / inf
        problems.append(f"{key} {str(raw)[:30]!r} is not a finite number")
        return None
    return v


def _tag_counts(meta: dict[str, str], problems: list[str]) -> dict[str, int]:
    """Summed tag counts of ss_tag_frequency ({folder: {tag: count}}); odd parts are skipped and reported."""
    raw = meta.get("ss_tag_frequency")
    if raw in (None, ""):
        return {}
    try:
        freq = json.loads(raw)
    except ValueError:
        problems.append("ss_tag_frequency is not JSON")
        return {}
    if not isinstance(freq, dict):
        problems.append(f"ss_tag_frequency is a JSON {type(freq).__name__}, not {{folder: {{tag: count}}}}")
        return {}
    top: dict[str, int] = {}
    odd = 0
    for tags in freq.values():
        if not isinstance(tags, dict):
            odd += 1
            continue
        for t, n in tags.items():
            try:
                top[str(t)] = top.get(str(t), 0) + int(n)
            except (TypeError, ValueError, OverflowError):
                odd += 1
    if odd:
        problems.append(
            f"ss_tag_frequency has {odd} entr{'y' if odd == 1 else 'ies'} that are not tag counts"
        )
    return top


SUBSET_KEYS = ("image_dir", "img_count", "num_repeats", "keep_tokens", "shuffle_caption", "flip_aug",
               "class_tokens", "is_reg")  # fmt: skip  # what lora-info shows of each ss_datasets subset


def _subsets(meta: dict[str, str], problems: list[str]) -> list[dict[str, Any]]:
    """The per-subset training settings of ss_datasets ([{subsets: [{image_dir, keep_tokens, ...}]}], as
    sd-scripts and curate write them), one dict of SUBSET_KEYS per subset (None where a key is missing);
    image_dir is the folder's name. Odd parts are skipped and reported."""
    raw = meta.get("ss_datasets")
    if raw in (None, ""):
        return []
    try:
        datasets = json.loads(raw)
    except ValueError:
        problems.append("ss_datasets is not JSON")
        return []
    if not isinstance(datasets, list):
        problems.append(f"ss_datasets is a JSON {type(datasets).__name__}, not a list of datasets")
        return []
    out, odd = [], 0
    for d in datasets:
        subs = d.get("subsets") if isinstance(d, dict) else None
        if not isinstance(subs, list):
            odd += 1
            continue
        for sub in subs:
            if not isinstance(sub, dict):
                odd += 1
                continue
            row = {k: sub.get(k) for k in SUBSET_KEYS}
            if isinstance(row["image_dir"], str):
                row["image_dir"] = Path(row["image_dir"]).name or row["image_dir"]
            out.append(row)
    if odd:
        problems.append(
            f"ss_datasets has {odd} entr{'y that is' if odd == 1 else 'ies that are'} not a dataset or subset"
        )
    return out


def lora_info(path: str | Path) -> dict[str, Any]:
    """Summary of a LoRA file for `curate lora-info`: rank, alpha, base model, lrs, modules, tag frequency and
    the per-subset settings (keep_tokens, shuffle_caption, repeats, class tokens) from ss_datasets.

    Odd metadata never stops it: what can be read is shown, and ``problems`` says what could not.
    """
    path = Path(path)
    shapes, alpha_values, meta = _read_lora_header(path)
    problems: list[str] = []
    ranks = {int(s[0]) for k, s in shapes.items() if k.endswith("lora_down.weight") and s}
    alphas = set(alpha_values.values())
    modules = {k.split(".")[0] for k in shapes}
    if not shapes:
        problems.append("the file holds no tensors")
    elif not any(m.startswith(("lora_unet_", "lora_te")) for m in modules):
        problems.append("no lora_unet_* / lora_te* tensors: this does not look like a kohya LoRA")

    def js(key: str, kind: type) -> Any:
        raw = meta.get(key)
        if raw in (None, ""):
            return None
        try:
            v = json.loads(raw)
        except ValueError:
            problems.append(f"{key} is not JSON")
            return None
        if not isinstance(v, kind):
            problems.append(f"{key} is a JSON {type(v).__name__}, not a {kind.__name__}")
            return None
        return v

    dim = _number(meta, "ss_network_dim", int, problems)
    alpha = _number(meta, "ss_network_alpha", float, problems)
    top = _tag_counts(meta, problems)
    return {
        "file": str(path),
        "rank": dim or (max(ranks) if ranks else 0),
        "alpha": alpha or (max(alphas) if alphas else 0.0),
        "ranks": sorted(ranks),
        "modules": len(modules),
        "unet_modules": sum(m.startswith("lora_unet_") for m in modules),
        "text_encoder_modules": sum(m.startswith("lora_te") for m in modules),
        "base_model": meta.get("ss_base_model_version", ""),
        "base_model_name": meta.get("ss_sd_model_name", ""),
        "base_model_hash": meta.get("ss_sd_model_hash", ""),
        "v_prediction": meta.get("ss_v_parameterization", "False") == "True",
        "network_module": meta.get("ss_network_module", ""),
        "network_args": js("ss_network_args", dict) or {},
        "learning_rate": meta.get("ss_learning_rate", ""),
        "unet_lr": meta.get("ss_unet_lr", ""),
        "text_encoder_lr": meta.get("ss_text_encoder_lr", ""),
        "optimizer": meta.get("ss_optimizer", ""),
        "epochs": meta.get("ss_num_epochs", ""),
        "steps": meta.get("ss_steps", ""),
        "resolution": meta.get("ss_resolution", ""),
        "bucket_no_upscale": meta.get("ss_bucket_no_upscale", ""),
        "num_train_images": meta.get("ss_num_train_images", ""),
        "top_tags": sorted(top.items(), key=lambda kv: -kv[1])[:20],
        "subsets": _subsets(meta, problems),
        "model_hash": meta.get("sshs_model_hash", ""),
        "resize": js("curate_resize", dict),  # written by `curate lora-resize`, else None
        "problems": problems,
        "metadata": meta,
    }
