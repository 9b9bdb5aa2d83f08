"""BLIP captioners through transformers (BlipForConditionalGeneration + BlipProcessor), safetensors only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CurateError, require
from . import hf_download, is_hub_id, local_dir_for

_CACHE: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}


def pick_device(device: str = "auto") -> str:
    torch = require("torch", "tag")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CurateError("no CUDA device is visible; pass --device cpu")
    return device


def pick_dtype(device: str, dtype: str = "auto"):
    """fp32 on CPU; bf16 on GPUs that support it (else fp16) unless asked otherwise."""
    torch = require("torch", "tag")
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}  # fmt: skip
    if dtype != "auto":
        if dtype not in table:
            raise CurateError(f"unknown dtype {dtype!r}; choose auto, fp32, fp16 or bf16")
        return table[dtype]
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_blip(model: str, device: str = "auto", dtype: str = "auto"):
    """(processor, model, torch dtype) from a local folder or a hub id, offline first; cached."""
    require("torch", "tag")
    transformers = require("transformers", "tag")
    device = pick_device(device)
    key = (model, device, dtype)
    if key in _CACHE:
        return _CACHE[key]
    torch_dtype = pick_dtype(device, dtype)
    src = str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model
    local = Path(src).is_dir()
    if not local and Path(model).expanduser().exists():
        raise CurateError(f"captioner {model} is a file; pass the folder saved with save_pretrained")
    if not local and not is_hub_id(model):
        raise CurateError(
            f"no such folder {model}; --model takes a folder saved with save_pretrained "
            "or a Hugging Face repo id (owner/name)"
        )
    try:  # local files only: a missing model is one clear message, not minutes of retries offline
        processor = transformers.BlipProcessor.from_pretrained(src, local_files_only=True)
        net = transformers.BlipForConditionalGeneration.from_pretrained(
            src, local_files_only=True, use_safetensors=True, dtype=torch_dtype
        )
    except Exception as exc:  # missing files or no safetensors weights
        if local:
            raise CurateError(
                f"cannot load BLIP from {src}: {str(exc).splitlines()[0][:160]}; it needs config.json, "
                "model.safetensors and the processor files (save_pretrained output)"
            ) from None
        local_dir = local_dir_for(model)
        raise CurateError(
            f"captioner {model} is not downloaded (safetensors weights needed); on a connected machine run "
            f"`{hf_download(model, local_dir=local_dir)}` and pass --model ./{local_dir}"
        ) from None
    net = net.to(device).eval()
    _CACHE[key] = (processor, net, torch_dtype)
    return _CACHE[key]


def generate_captions(
    processor: Any,
    net: Any,
    images: list,
    *,
    dtype: Any,
    prompt: str = "",
    num_beams: int = 3,
    min_length: int = 5,
    max_length: int = 40,
    repetition_penalty: float = 1.0,
) -> list[str]:
    """Captions for a batch of PIL images (one ``generate`` call)."""
    torch = require("torch", "tag")
    text = [prompt] * len(images) if prompt else None
    inputs = processor(images=images, text=text, return_tensors="pt")
    device = next(net.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.inference_mode():
        out = net.generate(
            **inputs,
            num_beams=num_beams,
            min_length=min_length,
            max_length=max_length,
            repetition_penalty=repetition_penalty,
        )
    texts = processor.batch_decode(out, skip_special_tokens=True)
    return [" ".join(t.split()) for t in texts]
