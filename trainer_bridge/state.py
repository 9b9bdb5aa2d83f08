"""Resumable training state without pickle: tensors -> safetensors, everything else -> JSON."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from trainer_bridge.config import TrainError, write_error
from trainer_bridge.export import write_safetensors


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
    """Write lora.safetensors, optimizer.safetensors and state.json into `folder` (replaced atomically).

    A failed write (disk full) removes the partial folder and leaves any earlier state untouched."""
    tmp = folder.with_name(folder.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_safetensors(tmp / "lora.safetensors", lora)
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_json = _split(optimizer.state_dict(), "opt", opt_tensors)
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        for name, g in generators.items():
            rng[f"gen_{name}"] = g.get_state()
        write_safetensors(
            tmp / "optimizer.safetensors", {**opt_tensors, **{f"rng.{k}": v for k, v in rng.items()}}
        )
        doc = {"info": info, "optimizer": opt_json, "scheduler": scheduler.state_dict()}
        with open(tmp / "state.json", "w", encoding="utf-8") as f:  # written last: its presence marks a state
            f.write(json.dumps(doc, indent=1))
            f.flush()
            os.fsync(f.fileno())
    except (OSError, TrainError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise (e if isinstance(e, TrainError) else write_error(folder, e)) from None
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.replace(old)
    tmp.replace(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _read_doc(folder: Path) -> dict:
    """state.json of a state folder, checked; one-line errors for a missing, wrong or damaged one."""
    if not folder.exists():
        raise TrainError(f"resume state not found: no such folder {folder}")
    if not folder.is_dir() or not (folder / "state.json").is_file():
        raise TrainError(
            f"{folder} is not a training state folder (no state.json); pass a <name>-state folder a run wrote"
        )
    try:
        doc = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        info = doc["info"]
        assert isinstance(doc["optimizer"], dict) and isinstance(doc["scheduler"], dict)
        for k in ("step", "epoch", "batch"):
            assert isinstance(info[k], int)
        assert isinstance(info["config"], dict) and len(info["host_rng"]) == 3
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        raise TrainError(
            f"{folder / 'state.json'} is damaged (not the JSON a training state holds); resume from another "
            "state (each saved epoch has a <name>-NNNNNN-state) or start the run again"
        ) from None
    return doc


def state_config(folder: str | Path) -> dict[str, Any]:
    """The TrainConfig values a state was written with (so `curate train --resume STATE` needs nothing else)."""
    return dict(_read_doc(Path(folder).expanduser())["info"]["config"])


def load_state(folder: str | Path) -> tuple[dict, dict, dict, dict, dict]:
    """(lora tensors, optimizer state_dict, scheduler state_dict, info, rng tensors) from a state folder."""
    folder = Path(folder).expanduser()
    doc = _read_doc(folder)
    files = {}
    for name in ("lora.safetensors", "optimizer.safetensors"):
        if not (folder / name).is_file():
            raise TrainError(
                f"the state {folder} is incomplete: {name} is missing; resume from another state"
            )
        try:
            files[name] = load_file(str(folder / name))
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise TrainError(
                f"{folder / name} is damaged ({type(e).__name__}); resume from another state"
            ) from None
    tensors = files["optimizer.safetensors"]
    try:
        opt = _join(doc["optimizer"], tensors)
        for g in opt["param_groups"]:  # JSON turned tuples into lists
            for k, v in g.items():
                if k != "params" and isinstance(v, list):
                    g[k] = tuple(v)
        opt["state"] = {int(k): v for k, v in opt["state"].items()}
    except KeyError as e:
        raise TrainError(
            f"{folder / 'optimizer.safetensors'} lacks the tensor {e}; resume from another state"
        ) from None
    except (TypeError, ValueError, AttributeError):
        raise TrainError(
            f"{folder / 'state.json'} is damaged (optimizer state); resume from another state"
        ) from None
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    if "torch_cpu" not in rng or not files["lora.safetensors"]:
        raise TrainError(
            f"the state {folder} lacks its random-number or LoRA tensors; resume from another state"
        )
    return files["lora.safetensors"], opt, doc["scheduler"], doc["info"], rng


# what fixes the network's and optimizer's shapes: a resumed run must agree on these
SHAPE_OPTIONS = ("model_family", "network_dim", "conv_dim", "network_train_ff", "optimizer")


def check_resume(cfg: Any, info: dict[str, Any]) -> None:
    """A state written with another network shape cannot continue this run: say which option differs."""
    old = info.get("config", {})
    for k in SHAPE_OPTIONS:
        if old.get(k) and old.get(k) != getattr(cfg, k):
            raise TrainError(
                f"the state {cfg.resume} was written with {k} = {old[k]!r}, this run has {getattr(cfg, k)!r}; "
                "resume with the same settings (`curate train --resume STATE` alone takes them from the state)"
            )
    if "text_encoder_lr" in old and (float(old["text_encoder_lr"]) > 0) != (cfg.text_encoder_lr > 0):
        raise TrainError(
            f"the state {cfg.resume} was written {'with' if old['text_encoder_lr'] else 'without'} text-encoder "
            "training; resume with the same text_encoder_lr (or `curate train --resume STATE` alone)"
        )


def restore_rng(rng: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    for name, g in generators.items():
        if f"gen_{name}" in rng:
            g.set_state(rng[f"gen_{name}"])
