"""LoRA / LoCon modules and their injection into a diffusers UNet or a CLIP text encoder.

A `LoRAModule` wraps the original layer as `base_layer` (its weights are never copied) and adds
`lora_down` / `lora_up`, like peft's LoRA layer and kohya's networks.lora. Each module knows the kohya
name it is saved under, so the exported file maps 1:1 to the modules.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FF_TARGETS = ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


class LoRAModule(nn.Module):
    """y = base_layer(x) + lora_up(dropout(lora_down(x))) * alpha / rank, for nn.Linear or nn.Conv2d."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        if isinstance(base_layer, nn.Linear):
            self.lora_down = nn.Linear(base_layer.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base_layer.out_features, bias=False)
        elif isinstance(base_layer, nn.Conv2d):
            b = base_layer
            self.lora_down = nn.Conv2d(b.in_channels, rank, b.kernel_size, b.stride, b.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, b.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA supports nn.Linear and nn.Conv2d, not {type(base_layer).__name__}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.rank, self.alpha, self.dropout = rank, float(alpha), dropout
        self.scale = self.alpha / rank
        self.kohya_name = ""  # set by inject()

    @property
    def weight(self) -> torch.Tensor:  # diffusers sometimes reads layer.weight for dtype / shape
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.forward_from_down(x, self.lora_down(x))

    def forward_from_down(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The output given h = lora_down(x), computed elsewhere (trainer_bridge/fused_qkv.py: one matmul for
        the q/k/v down-projections of a self-attention)."""
        if self.dropout and self.training:
            h = nn.functional.dropout(h, p=self.dropout)  # kohya's network_dropout: on the rank-r features
        y = self.base_layer(x)
        if isinstance(self.lora_up, nn.Linear):
            # y + scale * h @ up^T in one GEMM epilogue: no separate output-sized multiply and add
            out = torch.addmm(
                y.reshape(-1, y.shape[-1]),
                h.reshape(-1, h.shape[-1]),
                self.lora_up.weight.t(),
                alpha=self.scale,
            )
            return out.view(y.shape)
        return y + self.lora_up(h) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The dense weight update this module adds (what a merge would add to base_layer.weight)."""
        down, up = self.lora_down.weight.float(), self.lora_up.weight.float()
        if down.dim() == 2:
            return up @ down * self.scale
        return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * self.scale


# ---------------------------------------------------------------- kohya names


def _sgm_path(path: str, layers_per_block: int) -> str:
    """diffusers SDXL UNet module path -> the sgm/LDM path kohya's SDXL UNet uses (input_blocks...)."""
    n = layers_per_block
    resnet_sub = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                  "conv_shortcut": "skip_connection"}  # fmt: skip

    def res(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return resnet_sub.get(rest, resnet_sub.get(head, head) + ("." + tail if tail else ""))

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + b * (n + 1) + i
        return f"input_blocks.{idx}.0.{res(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path):
        idx = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(m[1], m[2])]
        return f"middle_block.{idx}.{res(m[3]) if m[1] == 'resnets' else m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = b * (n + 1) + i  # up blocks have layers_per_block + 1 layers
        return f"output_blocks.{idx}.0.{res(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
        # SDXL's upsampling up-blocks both have attentions, so the upsampler is the third layer (".2")
        return f"output_blocks.{int(m[1]) * (n + 1) + n}.2.conv"
    return path


def kohya_name(prefix: str, path: str, sgm_layers_per_block: int | None = None) -> str:
    """kohya module name: prefix + module path with dots -> underscores (SDXL UNet in sgm naming)."""
    if sgm_layers_per_block is not None:
        path = _sgm_path(path, sgm_layers_per_block)
    return f"{prefix}_{path.replace('.', '_')}"


# ---------------------------------------------------------------- injection


def _unet_targets(unet: nn.Module, ff: bool, conv: bool) -> list[tuple[str, nn.Module, bool]]:
    """(path, layer, is_3x3_conv) for every UNet layer we put a LoRA on."""
    out = []
    for path, mod in unet.named_modules():
        if isinstance(mod, LoRAModule) or ".base_layer" in path or ".lora_" in path:
            continue
        in_transformer = ".attentions." in path
        if isinstance(mod, nn.Linear) and in_transformer:
            if path.endswith(ATTN_TARGETS) or (ff and path.endswith(FF_TARGETS)):
                out.append((path, mod, False))
        elif isinstance(mod, nn.Conv2d) and in_transformer and ff and path.endswith(("proj_in", "proj_out")):
            out.append((path, mod, False))  # SD1.5 proj_in/out are 1x1 convs
        elif isinstance(mod, nn.Conv2d) and conv:
            if re.search(
                r"\.(resnets\.\d+\.(conv1|conv2|conv_shortcut)|downsamplers\.0\.conv|upsamplers\.0\.conv)$",
                path,
            ):
                out.append((path, mod, mod.kernel_size != (1, 1)))
    return out


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


def inject_unet(
    unet: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    ff: bool = False,
    conv_dim: int = 0,
    conv_alpha: float = 1.0,
    sdxl: bool = False,
) -> list[LoRAModule]:
    """Wrap the UNet's attention projections (and optionally feed-forward / resnet convs) with LoRA."""
    lpb = unet.config.layers_per_block if sdxl else None
    mods = []
    for path, layer, is3x3 in _unet_targets(unet, ff, conv_dim > 0):
        r, a = (conv_dim, conv_alpha) if is3x3 else (rank, alpha)  # kohya: 1x1 convs use network_dim
        m = LoRAModule(layer, r, a, dropout).to(layer.weight.device)
        m.kohya_name = kohya_name("lora_unet", path, lpb)
        _replace(unet, path, m)
        mods.append(m)
    return mods


def inject_text_encoder(
    te: nn.Module, prefix: str, rank: int, alpha: float, dropout: float = 0.0
) -> list[LoRAModule]:
    """Wrap a CLIP text encoder's attention and MLP projections (kohya's default TE targets)."""
    mods = []
    targets = [
        (p, m)
        for p, m in te.named_modules()
        if isinstance(m, nn.Linear) and p.endswith(TE_TARGETS) and ".layers." in p
    ]
    for path, layer in targets:
        m = LoRAModule(layer, rank, alpha, dropout).to(layer.weight.device)
        # kohya names CLIP layers text_model.encoder...; transformers 5's CLIPTextModel drops the text_model level
        m.kohya_name = kohya_name(prefix, path if path.startswith("text_model.") else "text_model." + path)
        _replace(te, path, m)
        mods.append(m)
    return mods


def lora_parameters(mods: list[LoRAModule]) -> list[nn.Parameter]:
    return [p for m in mods for p in (m.lora_down.weight, m.lora_up.weight)]


def lora_state_dict(mods: list[LoRAModule], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """kohya-format tensors: <name>.lora_down.weight, <name>.lora_up.weight, <name>.alpha."""
    sd = {}
    for m in mods:
        down, up = m.lora_down.weight.detach(), m.lora_up.weight.detach()
        dt = dtype or down.dtype
        sd[f"{m.kohya_name}.lora_down.weight"] = down.to("cpu", dt).contiguous()
        sd[f"{m.kohya_name}.lora_up.weight"] = up.to("cpu", dt).contiguous()
        sd[f"{m.kohya_name}.alpha"] = torch.tensor(m.alpha, dtype=dt)
    return sd


@torch.no_grad()
def load_lora_state_dict(mods: list[LoRAModule], sd: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy kohya-format tensors into injected modules (the inverse of lora_state_dict)."""
    names = {m.kohya_name for m in mods}
    if strict:
        extra = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd} - names
        if extra:
            raise KeyError(f"LoRA file has {len(extra)} modules this model lacks, e.g. {sorted(extra)[0]}")
    for m in mods:
        key = m.kohya_name
        if f"{key}.lora_down.weight" not in sd:
            if strict:
                raise KeyError(f"LoRA file lacks {key}")
            continue
        m.lora_down.weight.copy_(sd[f"{key}.lora_down.weight"])
        m.lora_up.weight.copy_(sd[f"{key}.lora_up.weight"])
        if f"{key}.alpha" in sd:
            m.alpha = float(sd[f"{key}.alpha"])
            m.scale = m.alpha / m.rank


@torch.no_grad()
def scale_weight_norms(mods: list[LoRAModule], max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's max-norm regularisation: shrink each module whose dense delta has norm > max_norm.

    Returns (number of modules scaled, mean norm) as device tensors, so the step needs no host sync.
    """
    norms = torch.stack([m.delta_weight().norm() for m in mods])
    ratio = norms.clamp(max=max_norm) / norms.clamp(min=1e-12)
    for m, r in zip(mods, ratio.sqrt().unbind(), strict=True):
        m.lora_down.weight.mul_(r.to(m.lora_down.weight.dtype))
        m.lora_up.weight.mul_(r.to(m.lora_up.weight.dtype))
    return (norms > max_norm).sum(), norms.mean()
