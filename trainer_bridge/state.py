"""Resumable training state without pickle: tensors -> safetensors, everything else -> JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from trainer_bridge.config import TrainError


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by {"__tensor__": key}, collecting it into `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _split(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_state(folder: Path, lora: dict[str, torch.Tensor], optimizer, scheduler, info: dict[str, Any],
               generators: dict[str, torch.Generator]) -> Path:  # fmt: skip
    """Write lora.safetensors, optimizer.safetensors and state.json into `folder` (replaced atomically)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(lora, str(tmp / "lora.safetensors"))
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_json = _split(optimizer.state_dict(), "opt", opt_tensors)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    for name, g in generators.items():
        rng[f"gen_{name}"] = g.get_state()
    save_file({**opt_tensors, **{f"rng.{k}": v for k, v in rng.items()}}, str(tmp / "optimizer.safetensors"))
    doc = {"info": info, "optimizer": opt_json, "scheduler": scheduler.state_dict()}
    (tmp / "state.json").write_text(json.dumps(doc, indent=1))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.replace(old)
    tmp.replace(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_state(folder: str | Path) -> tuple[dict, dict, dict, dict, dict]:
    """(lora tensors, optimizer state_dict, scheduler state_dict, info, rng tensors) from a state folder."""
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        raise TrainError(f"{folder} is not a training state folder (no state.json)")
    doc = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    opt = _join(doc["optimizer"], tensors)
    for g in opt["param_groups"]:  # JSON turned tuples into lists
        for k, v in g.items():
            if k != "params" and isinstance(v, list):
                g[k] = tuple(v)
    opt["state"] = {int(k): v for k, v in opt["state"].items()}
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    return load_file(str(folder / "lora.safetensors")), opt, doc["scheduler"], doc["info"], rng


def restore_rng(rng: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    for name, g in generators.items():
        if f"gen_{name}" in rng:
            g.set_state(rng[f"gen_{name}"])
