"""Which tensors of a LoRA file ComfyUI's and A1111/Forge's loaders consume, for a diffusers SD1.5 model.

Re-implemented for the tests from reading ComfyUI's comfy/lora.py + comfy/weight_adapter/*.py and A1111's
extensions-builtin/Lora/networks.py + network_*.py; no code of theirs is copied. Module names:
- ComfyUI: "lora_unet_" + any UNet weight path (dots -> "_"), in LDM naming or (through unet_to_diffusers, which
  covers the whole diffusers UNet) in diffusers naming; text encoder: lora_te[12]_text_model_encoder_layers_<i>_
  {self_attn_[qkv]_proj, self_attn_out_proj, mlp_fc1, mlp_fc2}.
- A1111/Forge: diffusers names of the down/mid/up blocks, conv_in, conv_out and time_embedding are rewritten to
  compvis names and looked up in the model; text-encoder names are the model's own module names.
Tensor names per module (both): alpha, dora_scale, plus one adapter's set below; anything else is "not loaded".
"""

from __future__ import annotations

ADAPTERS = {
    "lora": {"lora_up.weight", "lora_down.weight", "lora_mid.weight"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
    "full": {"diff", "diff_b"},
    "norm": {"w_norm", "b_norm"},
}
COMMON = {"alpha", "dora_scale"}
CLIP_LAYERS = (
    "self_attn_q_proj",
    "self_attn_k_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
    "mlp_fc1",
    "mlp_fc2",
)
A1111_UNET_ROOTS = ("down_blocks_", "mid_block_", "up_blocks_", "conv_in", "conv_out", "time_embedding_")


def _unet_names(unet) -> set[str]:
    return {
        "lora_unet_" + k[: -len(".weight")].replace(".", "_")
        for k in unet.state_dict()
        if k.endswith(".weight")
    }


def _te_names(te, prefixes: tuple[str, ...], comfy: bool) -> set[str]:
    out = set()
    for k in te.state_dict():
        if not k.endswith(".weight"):
            continue
        path = k[: -len(".weight")]
        path = path if path.startswith("text_model.") else "text_model." + path
        name = path.replace(".", "_")
        if comfy and not (name.startswith("text_model_encoder_layers_") and name.endswith(CLIP_LAYERS)):
            continue
        out |= {f"{p}_{name}" for p in prefixes}
    return out


def module_names(loader: str, unet, te) -> set[str]:
    """The module names `loader` ("comfyui" | "a1111") maps to a weight of this SD1.5 model."""
    unet_names = _unet_names(unet)
    if loader == "a1111":
        unet_names = {n for n in unet_names if n[len("lora_unet_") :].startswith(A1111_UNET_ROOTS)}
    return unet_names | _te_names(te, ("lora_te",), comfy=loader == "comfyui")


def ignored_keys(tensors: dict, names: set[str]) -> list[str]:
    """The keys of a LoRA file a loader with these module names would skip (ComfyUI logs 'lora key not loaded')."""
    by_module: dict[str, set[str]] = {}
    for k in tensors:
        mod, _, suffix = k.partition(".")
        by_module.setdefault(mod, set()).add(suffix)
    ignored = []
    for mod, suffixes in by_module.items():
        if mod not in names:
            ignored += [f"{mod}.{s}" for s in suffixes]
            continue
        kinds = [a for a, keys in ADAPTERS.items() if suffixes & keys]
        if len(kinds) != 1:  # no adapter, or tensors of two adapters on one module: one of them is dropped
            ignored += [f"{mod}.{s}" for s in suffixes if kinds[1:] and s in ADAPTERS[kinds[1]] or not kinds]
            continue
        ignored += [f"{mod}.{s}" for s in suffixes - ADAPTERS[kinds[0]] - COMMON]
    return sorted(ignored)


def _norm_per(w, axis: int):
    """L2 norm of w over every axis but `axis`, kept broadcastable against w."""
    shape = [1] * w.dim()
    shape[axis] = w.shape[axis]
    return w.transpose(0, axis).reshape(w.shape[axis], -1).norm(dim=1).reshape(shape)


def comfyui_dora_weight(w0, up, down, alpha: float, dora_scale, strength: float = 1.0):
    """The weight ComfyUI merges from a LoRA + dora_scale (comfy/weight_adapter/base.py weight_decompose, read
    2025): W = W0 + alpha/rank * up @ down; dora_scale with shape[0] == out is a magnitude per output row, divided by
    the row norm of the ORIGINAL W0; otherwise per input column, divided by the column norm of W; then
    W0 + strength * (W * m / norm - W0). Older ComfyUI had only the input-column branch (as a1111_dora_weight)."""
    import torch

    w = w0 + alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
    norm = _norm_per(w0, 0) if dora_scale.shape[0] == w.shape[0] else _norm_per(w, 1)
    merged = w * (dora_scale / (norm + torch.finfo(w0.dtype).eps))
    return w0 + strength * (merged - w0)


def a1111_dora_weight(w0, up, down, alpha: float, dora_scale, strength: float = 1.0):
    """A1111/Forge's extensions-builtin/Lora network.py: the scaled LoRA delta is added to W0, then rescaled by
    dora_scale over the per-input-column norm (whatever dora_scale's shape; [out, 1] broadcasts to [out, in])."""
    w = w0 + alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
    return w0 + strength * (w * (dora_scale / _norm_per(w, 1)) - w0)
