"""Fused q/k/v LoRA down-projections: in a self-attention the LoRAs on to_q, to_k and to_v all read the same
input, so their down-projections run as one matmul over the concatenated A matrices (3 x rank rows), split after.

The LoRA parameters stay the modules' own (the concatenation is rebuilt each forward, and its gradient flows back
into each lora_down.weight), so saving, resuming and the optimizer see no difference. Cross-attention (k/v read
the text embedding), masks, group / spatial norms and 4-D inputs take diffusers' own processor unchanged.

    n = fuse_qkv_lora(unet)   # in place, before compile / capture; returns the self-attentions fused
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from trainer_bridge.lora import LoRAModule


class FusedQKVLoRAProcessor:
    """diffusers' AttnProcessor2_0 for self-attention, with one matmul for the q/k/v LoRA down-projections."""

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback  # the processor it replaces, for every call it does not handle

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):  # fmt: skip
        if (encoder_hidden_states is not None or attention_mask is not None or args or kwargs
                or attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3):  # fmt: skip
            return self.fallback(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        x, mods = hidden_states, (attn.to_q, attn.to_k, attn.to_v)
        down = torch.cat([m.lora_down.weight for m in mods])
        hq, hk, hv = F.linear(x, down).split([m.rank for m in mods], dim=-1)
        query, key, value = (m.forward_from_down(x, h) for m, h in zip(mods, (hq, hk, hv), strict=True))
        b = x.shape[0]
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(b, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + x
        return out / attn.rescale_output_factor


def fusable(attn: Any) -> bool:
    """A self-attention whose to_q / to_k / to_v are all LoRA-wrapped nn.Linear layers."""
    mods = [getattr(attn, n, None) for n in ("to_q", "to_k", "to_v")]
    return (not getattr(attn, "is_cross_attention", True) and all(isinstance(m, LoRAModule) for m in mods)
            and all(isinstance(m.lora_down, torch.nn.Linear) for m in mods))  # fmt: skip


def fuse_qkv_lora(unet: Any) -> int:
    """Give every fusable self-attention of `unet` the fused processor (in place); returns how many."""
    n = 0
    for mod in unet.modules():
        if (
            hasattr(mod, "set_processor")
            and fusable(mod)
            and not isinstance(mod.processor, FusedQKVLoRAProcessor)
        ):
            mod.set_processor(FusedQKVLoRAProcessor(mod.processor))
            n += 1
    return n
