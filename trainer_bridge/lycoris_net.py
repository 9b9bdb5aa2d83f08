"""LyCORIS networks (LoHa, LoKr, DoRA, full, norms) on a diffusers UNet / CLIP text encoder, saved in kohya keys.

The math and the per-module tensor names (hada_w1_a, lokr_w1, dora_scale, ...) are lycoris-lora's; this module
only picks the layers (lycoris' presets), applies block-wise dims, and renames lycoris' module names (built from
diffusers paths) to the kohya names ComfyUI and A1111/Forge load (lora_unet_..., lora_te1_..., SDXL in sgm naming),
with the same rules as trainer_bridge/lora.py. LoRA and LoCon without DoRA keep the fast path in lora.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer_bridge.config import TrainError
from trainer_bridge.lora import kohya_name

ALGOS = {"lora", "locon", "loha", "lokr", "dora", "full"}
PRESETS = ("full", "full-lin", "attn-mlp", "attn-only", "unet-transformer-only", "unet-convblock-only")
BLOCKS = {"sd15": 25, "sdxl": 19}  # IN00-IN11, MID, OUT00-OUT11 (SD1.5); IN00-IN08, MID, OUT00-OUT08 (SDXL)
_PREFIX = "lycoris"


def uses_lycoris(cfg) -> bool:
    """True when the config needs lycoris' modules; plain LoRA/LoCon stay on lora.py's fast path."""
    return cfg.network not in ("lora", "locon") or bool(
        cfg.preset or cfg.block_dims or cfg.rank_dropout or cfg.module_dropout or cfg.train_norm
        or cfg.use_tucker or cfg.use_scalar
    )  # fmt: skip


def block_index(path: str, layers_per_block: int) -> int:
    """kohya's block number of a diffusers UNet path: 0.. for input blocks, then the mid block, then output blocks;
    -1 for layers outside the blocks (conv_in, time embedding, conv_out). n input blocks = 1 + levels * (lpb + 1)."""
    n, path = layers_per_block + 1, path + "."
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", path):
        return 1 + int(m[1]) * n + int(m[3])
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.", path):
        return (int(m[1]) + 1) * n
    return -2 if path.startswith("mid_block.") else _up_index(path, layers_per_block)


def _up_index(path: str, lpb: int) -> int:
    n, path = lpb + 1, path + "."
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", path):
        return 1000 + int(m[1]) * n + int(m[3])
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.", path):
        return 1000 + int(m[1]) * n + lpb
    return -1


def _block_slot(path: str, lpb: int, n_in: int) -> int:
    """Position of a path in the block_dims list (input blocks, MID, output blocks); -1 outside the blocks."""
    i = block_index(path, lpb)
    if i == -1:
        return -1
    if i == -2:
        return n_in
    return i if i < 1000 else n_in + 1 + (i - 1000)


@dataclass
class LycorisNet:
    """The lycoris networks put on one model family's UNet and text encoders, with their kohya names."""

    unet_nets: list = field(default_factory=list)
    te_nets: list = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # lycoris module name -> kohya module name

    @property
    def modules(self) -> list[nn.Module]:
        return [m for n in self.unet_nets + self.te_nets for m in n.loras]

    def parameters(self, part: str = "all") -> list[nn.Parameter]:
        nets = {"unet": self.unet_nets, "te": self.te_nets, "all": self.unet_nets + self.te_nets}[part]
        return [p for n in nets for m in n.loras for p in m.parameters() if p.requires_grad]

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """kohya/LyCORIS tensors: <kohya name>.<lycoris tensor name> (hada_w1_a, lokr_w1, dora_scale, alpha...)."""
        sd = {}
        for m in self.modules:
            for k, v in m.state_dict().items():
                if k.startswith("org_"):
                    continue
                v = v.detach().to("cpu")
                sd[f"{self.names[m.lora_name]}.{k}"] = (
                    v.to(dtype) if dtype and v.is_floating_point() else v
                ).contiguous()
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """The inverse of state_dict; KeyError on a tensor no module has or a module tensor the file lacks."""
        want = set()
        for m in self.modules:
            own = {k: v for k, v in m.state_dict().items() if not k.startswith("org_")}
            name = self.names[m.lora_name]
            for k in own:
                want.add(f"{name}.{k}")
                if f"{name}.{k}" not in sd:
                    raise KeyError(f"LoRA file lacks {name}.{k}")
                if k == "dora_scale" and sd[f"{name}.{k}"].shape != own[k].shape:
                    raise ValueError(
                        f"{name}.dora_scale has shape {list(sd[f'{name}.{k}'].shape)}, this network "
                        f"{list(own[k].shape)}: the file was written with DoRA per output row (curate before "
                        "wd_on_output=False); train it again"
                    )
            m.load_state_dict({k: sd[f"{name}.{k}"] for k in own}, strict=False)
        extra = set(sd) - want
        if extra:
            raise KeyError(f"LoRA file has {len(extra)} tensors this network lacks, e.g. {sorted(extra)[0]}")

    @torch.no_grad()
    def scale_weight_norms(self, max_norm: float) -> None:
        for n in self.unet_nets + self.te_nets:
            n.apply_max_norm_regularization(max_norm, next(iter(n.parameters())).device)


def _preset(name: str, part: str) -> dict:
    from lycoris.config import BUILTIN_PRESET_CONFIGS

    p = BUILTIN_PRESET_CONFIGS[name]
    mods = list(p.unet_target_module if part == "unet" else p.text_encoder_target_module)
    if {"CrossAttention", "SelfAttention"} & set(mods):
        mods.append("Attention")  # diffusers >= 0.20 names its attention class Attention
    names = list(p.unet_target_name if part == "unet" else p.text_encoder_target_name)
    return {"enable_conv": p.enable_conv, "target_module": mods, "target_name": names, "lora_prefix": _PREFIX}


def _make(model: nn.Module, cfg, part: str, dim: int, alpha: float, conv_dim: int, conv_alpha: float,
          exclude: list[str]) -> object:  # fmt: skip
    import logging

    from lycoris import LycorisNetwork

    logging.getLogger("LyCORIS").setLevel(
        logging.WARNING
    )  # its per-module INFO lines would drown the progress bar

    algo = {"dora": "lora", "locon": "lora"}.get(cfg.network, cfg.network)
    preset = dict(_preset(cfg.preset or "full", part), exclude_name=exclude)
    LycorisNetwork.apply_preset(preset)
    LycorisNetwork.NAME_ALGO_MAP, LycorisNetwork.MODULE_ALGO_MAP, LycorisNetwork.USE_FNMATCH = {}, {}, False
    net = LycorisNetwork(
        model, multiplier=1.0, lora_dim=dim, alpha=alpha, conv_lora_dim=conv_dim, conv_alpha=conv_alpha,
        dropout=cfg.network_dropout, rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout,
        use_tucker=cfg.use_tucker, use_scalar=cfg.use_scalar, network_module=algo, train_norm=cfg.train_norm,
        weight_decompose=cfg.network == "dora" or cfg.dora_wd, full_matrix=cfg.full_matrix,
        factor=cfg.lokr_factor, warn_on_unmatched=False, wd_on_out=False,
    )  # fmt: skip
    # wd_on_out=False: DoRA's magnitude per input column, dora_scale [1, in, (1, 1)]. A1111/Forge and ComfyUI before
    # its orientation check read dora_scale only so; ComfyUI's [out, 1] branch divides by the norm of the original
    # weight instead of the merged one. lycoris' default [out, 1] files come out wrong in all three (docs/networks.md)
    return net


# SDXL layers outside lora.py's LoRA targets, in sgm/LDM naming (what A1111/Forge's SDXL model and sd-scripts use)
_SGM_EXTRA = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip


def _register(
    net, model: nn.Module, names: dict[str, str], prefix: str, sdxl_lpb: int | None, te: bool
) -> None:
    paths = {f"{_PREFIX}_{p.replace('.', '_')}": p for p, _ in model.named_modules() if p}
    for m in net.loras:
        path = paths[m.lora_name]
        if te and not path.startswith("text_model."):
            path = (
                "text_model." + path
            )  # transformers 5's CLIPTextModel drops the text_model level (as lora.py)
        if sdxl_lpb is not None and path in _SGM_EXTRA:
            names[m.lora_name + f"@{id(net)}"] = f"{prefix}_{_SGM_EXTRA[path].replace('.', '_')}"
            continue
        if sdxl_lpb is not None and (n := re.fullmatch(r"(.+resnets\.\d+)\.norm([12])", path)):
            sub = "in_layers_0" if n[2] == "1" else "out_layers_0"  # LDM ResBlock: norm1, norm2
            base = kohya_name(prefix, n[1] + ".conv1", sdxl_lpb).rsplit("_in_layers_2", 1)[0]
            names[m.lora_name + f"@{id(net)}"] = f"{base}_{sub}"
            continue
        names[m.lora_name + f"@{id(net)}"] = kohya_name(prefix, path, sdxl_lpb)
    net.apply_to()
    for m in net.loras:
        names[m.lora_name] = names.pop(m.lora_name + f"@{id(net)}")


def n_blocks(unet: nn.Module) -> int:
    """block_dims length: input blocks + mid + output blocks (25 for SD1.5, 19 for SDXL, fewer for tiny models)."""
    c = unet.config
    return 2 * len(c.block_out_channels) * (c.layers_per_block + 1) + 1


def n_blocks_of(base: str, family: str) -> int | None:
    """n_blocks() from a diffusers folder's unet/config.json, or the family's for a single .safetensors file;
    None when only the loaded model can tell (a hub id): checked again after the model loads."""
    import json
    from pathlib import Path

    p = Path(base).expanduser()
    if (p / "unet" / "config.json").is_file():
        try:
            c = json.loads((p / "unet" / "config.json").read_text())
            return 2 * len(c["block_out_channels"]) * (int(c["layers_per_block"]) + 1) + 1
        except (ValueError, KeyError, TypeError):
            return None  # the loader reports a broken config
    if p.is_file():
        return {"sd15": 25, "sdxl": 19}.get(family)
    return None


def check_blocks(cfg, family: str, want: int) -> None:
    """One-line errors for block_dims / block_alphas of the wrong length or with bad values."""
    for name in ("block_dims", "block_alphas"):
        v = getattr(cfg, name)
        if v and len(v) != want:
            raise TrainError(
                f"{name} has {len(v)} values; {family} takes {want} (input blocks, the mid block, output blocks)"
            )
        if any(not isinstance(x, int | float) or isinstance(x, bool) or x < 0 for x in v):
            raise TrainError(f"{name} must be numbers >= 0, got {v}")
    if cfg.block_alphas and not cfg.block_dims:
        raise TrainError("block_alphas needs block_dims (one dim per block) as well")


def build(unet: nn.Module, tes: list[nn.Module], cfg, sdxl: bool, train_te: bool) -> LycorisNet:
    """Put the configured lycoris network on the UNet (and the text encoders when they train)."""
    family = "sdxl" if sdxl else "sd15"
    check_blocks(cfg, family, n_blocks(unet))
    lpb = unet.config.layers_per_block
    sgm = lpb if sdxl else None
    out = LycorisNet()
    conv_dim = cfg.conv_dim if cfg.conv_dim else (cfg.network_dim if cfg.network == "full" else 0)
    if cfg.block_dims:
        n_in = (len(cfg.block_dims) - 1) // 2
        paths = [p for p, _ in unet.named_modules() if p]
        slot = {p: _block_slot(p, lpb, n_in) for p in paths}
        alphas = cfg.block_alphas or [cfg.network_alpha] * len(cfg.block_dims)
        groups: dict[tuple, list[int]] = {}
        for i, (d, a) in enumerate(zip(cfg.block_dims, alphas, strict=True)):
            groups.setdefault((int(d), float(a)), []).append(i)
        groups.setdefault((cfg.network_dim, cfg.network_alpha), []).append(-1)  # layers outside the blocks
        for (d, a), slots in groups.items():
            if d == 0:
                continue
            keep = set(slots)
            exclude = [re.escape(p) + "$" for p in paths if slot[p] not in keep and slot[p] != -3]
            cd = min(conv_dim, d) if conv_dim else 0
            net = _make(unet, cfg, "unet", d, a, cd, cfg.conv_alpha, exclude)
            _register(net, unet, out.names, "lora_unet", sgm, te=False)
            out.unet_nets.append(net)
    else:
        net = _make(unet, cfg, "unet", cfg.network_dim, cfg.network_alpha, conv_dim, cfg.conv_alpha, [])
        _register(net, unet, out.names, "lora_unet", sgm, te=False)
        out.unet_nets.append(net)
    if train_te:
        prefixes = ["lora_te1", "lora_te2"] if sdxl else ["lora_te"]
        for te, prefix in zip(tes, prefixes, strict=True):
            net = _make(te, cfg, "te", cfg.network_dim, cfg.network_alpha, 0, cfg.conv_alpha, [])
            _register(net, te, out.names, prefix, None, te=True)
            out.te_nets.append(net)
    dev = next(unet.parameters()).device  # lycoris builds its modules (and buffers) on the CPU
    for m in out.modules:
        m.to(dev).float().requires_grad_(True)
        for k, p in m.named_parameters():
            if k.startswith("org_"):
                p.requires_grad_(False)
    return out


def network_args(cfg) -> dict[str, str]:
    """ss_network_args as LyCORIS' kohya wrapper is given them (all values strings)."""
    algo = {"dora": "lora", "locon": "locon"}.get(cfg.network, cfg.network)
    args = {"algo": algo, "preset": cfg.preset or "full"}
    if cfg.conv_dim:
        args |= {"conv_dim": str(cfg.conv_dim), "conv_alpha": f"{cfg.conv_alpha:g}"}
    for k in ("rank_dropout", "module_dropout"):
        if getattr(cfg, k):
            args[k] = f"{getattr(cfg, k):g}"
    if cfg.network_dropout:
        args["dropout"] = f"{cfg.network_dropout:g}"
    if cfg.network == "dora" or cfg.dora_wd:
        # wd_on_output: lycoris' kohya wrapper (sd-scripts) then rebuilds our [1, in] dora_scale
        args |= {"dora_wd": "True", "wd_on_output": "False"}
    for k in ("train_norm", "use_tucker", "use_scalar", "full_matrix"):
        if getattr(cfg, k):
            args[k] = "True"
    if cfg.network == "lokr" and cfg.lokr_factor != -1:
        args["factor"] = str(cfg.lokr_factor)
    if cfg.block_dims:
        args["block_dims"] = ",".join(f"{x:g}" for x in cfg.block_dims)
    if cfg.block_alphas:
        args["block_alphas"] = ",".join(f"{x:g}" for x in cfg.block_alphas)
    return args
