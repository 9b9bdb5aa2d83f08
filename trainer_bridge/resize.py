"""SVD resize of a kohya-format LoRA/LoCon file: fixed rank or a dynamic rule per module.

Each module's effective delta W = up @ down * alpha / rank is factored by SVD and truncated to rank k. Every module
of the output gets the same alpha A (the input's most common alpha/rank times the largest new rank) and its factors
carry W * k / A, so up @ down * A / k is the truncated W. One alpha matters: diffusers (0.42) drops the per-module
alpha of attention modules (its alpha_pattern keys say `processor.to_q_lora`, which match no module) and gives them
the most common alpha, so per-module alphas (sd-scripts writes scale * k) scale them wrongly. A rank is never raised.
Dynamic rules follow the names of sd-scripts' resize_lora.py: sv_ratio, sv_fro, sv_cumulative, plus threshold.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from trainer_bridge.config import TrainError

METHODS = ("sv_ratio", "sv_fro", "sv_cumulative", "threshold")


class ResizeError(TrainError):
    """A user-facing resize problem (one line)."""


def choose_rank(s, method: str | None, param: float | None, rank: int | None) -> int:
    """Rank to keep from descending singular values `s` under a fixed `rank` or a dynamic `method`."""
    import torch

    n = int(s.numel())
    if method is None:
        return max(1, min(int(rank), n))
    if method == "sv_ratio":  # keep s_i with s_max / s_i < ratio (strict, as sd-scripts)
        k = int((s > s[0] / param).sum())
    elif method == "sv_fro":  # smallest r whose Frobenius fraction reaches param
        frac = torch.sqrt(torch.cumsum(s**2, 0) / (s**2).sum())
        k = int((frac < param - 1e-12).sum()) + 1
    elif method == "sv_cumulative":  # smallest r whose sum of singular values reaches param
        frac = torch.cumsum(s, 0) / s.sum()
        k = int((frac < param - 1e-12).sum()) + 1
    elif method == "threshold":  # keep s_i > param
        k = int((s > param).sum())
    else:
        raise ResizeError(f"unknown dynamic method {method!r}; use one of {', '.join(METHODS)}")
    k = max(1, min(k, n))
    if rank is not None:  # a --rank with --dynamic acts as a cap
        k = min(k, int(rank))
    return k


def resize_lora(
    src: str | Path,
    out: str | Path,
    rank: int | None = None,
    method: str | None = None,
    param: float | None = None,
) -> dict:
    """Resize `src` into `out` (atomic write); returns {'modules': {name: {...}}, 'method', 'param'}."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    if not src.is_file():
        raise ResizeError(f"{src}: no such LoRA file")
    if out.resolve() == src.resolve():
        raise ResizeError("--out must differ from the input; resize never overwrites its input")
    if rank is None and method is None:
        raise ResizeError("give --rank N or --dynamic METHOD=VALUE")
    try:
        with safe_open(str(src), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # not safetensors, truncated: one line
        raise ResizeError(f"{src} is not a readable safetensors file ({e})") from None
    odd = [k for k in tensors if any(t in k for t in ("hada_", "lokr_", ".dora_scale", "lora_mid"))]
    if odd:
        raise ResizeError(f"{src.name}: LoHa/LoKr/DoRA keys ({odd[0]}); lora-resize supports LoRA/LoCon only")
    names = sorted(k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight"))
    if not names:
        raise ResizeError(f"{src.name}: no lora_down/lora_up keys; lora-resize supports LoRA/LoCon only")
    from collections import Counter

    result, new, factored = {}, dict(tensors), {}
    for name in names:
        down = tensors[f"{name}.lora_down.weight"].float()
        up = tensors[f"{name}.lora_up.weight"].float()
        r = down.shape[0]
        alpha = (
            float(tensors[f"{name}.alpha"].float().flatten()[0]) if f"{name}.alpha" in tensors else float(r)
        )
        w = up.reshape(up.shape[0], r) @ down.reshape(r, -1) * (alpha / r)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        k = min(choose_rank(s, method, param, rank), r)  # never upscale
        factored[name] = (u, s, vh, k, alpha / r)
    # one alpha for the whole file (see the module docstring): the common input scale at the largest new rank
    common = Counter(round(f[4], 6) for f in factored.values()).most_common(1)[0][0]
    new_alpha = float(
        torch.tensor(common * max(f[3] for f in factored.values())).bfloat16()
    )  # exact in fp16 too
    for name, (u, s, vh, k, _) in factored.items():
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        r = down.shape[0]
        scale = new_alpha / k  # what every loader applies: alpha / rank; the factors carry W / scale
        sq = torch.sqrt(s[:k] / scale)
        new_up = (u[:, :k] * sq).reshape(up.shape[0], k, *up.shape[2:])
        new_down = (sq[:, None] * vh[:k]).reshape(k, *down.shape[1:])
        dtype = tensors[f"{name}.lora_down.weight"].dtype
        new[f"{name}.lora_down.weight"] = new_down.to(dtype).contiguous()
        new[f"{name}.lora_up.weight"] = new_up.to(dtype).contiguous()
        new[f"{name}.alpha"] = torch.tensor(new_alpha).to(dtype)
        total = float((s**2).sum())
        kept = float((s[:k] ** 2).sum())
        err = ((total - kept) / total) ** 0.5 if total > 0 else 0.0
        result[name] = {
            "rank_in": r,
            "rank": k,
            "alpha": new_alpha,
            "rel_fro_error": err,
            "retained": kept / total if total else 1.0,
        }
    ranks = [m["rank"] for m in result.values()]
    meta["ss_network_dim"] = str(max(ranks))
    meta["ss_network_alpha"] = f"{new_alpha:g}"
    note = {"method": method or "rank", "param": param if method else rank, "modules": result}
    meta["curate_resize"] = json.dumps(note)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(new, tmp, metadata=meta)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return note


def describe(note: dict) -> str:
    """One line for `lora-info`: the method, the rank range and the worst / mean relative error."""
    mods = note.get("modules") or {}
    try:
        ranks = [int(m["rank"]) for m in mods.values()]
        errs = [float(m["rel_fro_error"]) for m in mods.values()]
    except (KeyError, TypeError, ValueError, AttributeError):
        return f"{note.get('method')}={note.get('param')} (per-module record unreadable)"
    if not mods:
        return f"{note.get('method')}={note.get('param')}"
    rank = f"{min(ranks)}" if min(ranks) == max(ranks) else f"{min(ranks)}-{max(ranks)}"
    return (
        f"{note.get('method')}={note.get('param')}: rank {rank}, relative error "
        f"max {max(errs):.4f} mean {sum(errs) / len(errs):.4f} over {len(mods)} modules"
    )
