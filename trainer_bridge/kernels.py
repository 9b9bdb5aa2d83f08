"""Kernel-level levers for the frozen base UNet under bf16 autocast (trainer option `kernels`).

Under autocast, GroupNorm and LayerNorm run in fp32: each norm first casts its bf16 input to a new fp32 tensor,
writes an fp32 output, the SiLU after it reads and writes fp32, and the next conv casts back to bf16. At SD1.5's
64x64x320 activations those are four extra full-size passes per norm, forward and backward, all memory-bound.
`bf16_norms` makes every GroupNorm / LayerNorm of the frozen base run in its input's dtype with autocast off: the
CUDA kernels still accumulate mean and variance in fp32, only the stored output is bf16 (as in a pure-bf16 UNet).

    n = bf16_norms(unet)              # in place; returns how many norms were switched
    n = channels_last(unet)           # NHWC convs without layout copies; returns the transformers patched
    set_attention_backend("cudnn")    # SDPA backend for the whole process: auto | flash | efficient | cudnn
    n = compiled_pointwise(unet)      # GroupNorm and GEGLU as small inductor kernels (any layout, any shape)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_BACKENDS = ("auto", "flash", "efficient", "cudnn")


def _in_input_dtype(mod: nn.Module, x: torch.Tensor, norm, *args) -> torch.Tensor | None:
    """norm(x, *args, weight, bias, eps) with autocast off and the affine parameters in x's half dtype, or None
    (the module's own forward) for fp32 inputs or outside autocast."""
    if x.dtype in (torch.float32, torch.float64) or not torch.is_autocast_enabled(x.device.type):
        return None
    w = None if mod.weight is None else mod.weight.to(x.dtype)
    b = None if mod.bias is None else mod.bias.to(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        return norm(x, *args, w, b, mod.eps)


class _GroupNormInputDtype(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _in_input_dtype(self, x, F.group_norm, self.num_groups)
        return super().forward(x) if y is None else y


class _LayerNormInputDtype(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _in_input_dtype(self, x, F.layer_norm, self.normalized_shape)
        return super().forward(x) if y is None else y


def bf16_norms(model: nn.Module) -> int:
    """Switch every plain nn.GroupNorm / nn.LayerNorm of `model` to run in its input's (half) dtype under
    autocast; parameters and state-dict keys are untouched. Returns the number of modules switched."""
    n = 0
    for m in model.modules():
        if type(m) is nn.GroupNorm:
            m.__class__ = _GroupNormInputDtype
            n += 1
        elif type(m) is nn.LayerNorm:
            m.__class__ = _LayerNormInputDtype
            n += 1
    return n


def _output_keeping_layout(self, hidden_states, residual, batch_size, height, width, inner_dim):
    """Transformer2DModel's output for image inputs, without the `.contiguous()` that turns a channels-last
    result back into NCHW (a full copy, and then a layout transform in the next conv, forward and backward)."""
    if not self.use_linear_projection:
        hidden_states = self.proj_out(
            hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        )
    else:
        hidden_states = (
            self.proj_out(hidden_states).reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        )
    return hidden_states + residual


def channels_last(unet: nn.Module) -> int:
    """Put `unet` in channels-last (NHWC) memory format, so cuDNN runs its convolutions without transposing each
    input and output, and keep the transformer blocks' outputs in that layout. Feed it channels-last latents.
    Returns the number of Transformer2DModel blocks whose output step was switched."""
    import types

    unet.to(memory_format=torch.channels_last)
    n = 0
    for m in unet.modules():
        if type(m).__name__ == "Transformer2DModel" and hasattr(m, "_get_output_for_continuous_inputs"):
            m._get_output_for_continuous_inputs = types.MethodType(_output_keeping_layout, m)
            n += 1
    return n


def set_attention_backend(name: str) -> str:
    """Restrict torch's scaled_dot_product_attention to one backend for this process ("auto": torch's own
    choice). Returns the name. A backend this torch lacks raises ValueError naming the ones it has."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    b = torch.backends.cuda
    if name == "cudnn" and not hasattr(b, "enable_cudnn_sdp"):
        raise ValueError("this torch has no cuDNN attention backend; use auto, flash or efficient")
    want = {"flash": name in ("auto", "flash"), "mem_efficient": name in ("auto", "efficient"),
            "cudnn": name in ("auto", "cudnn")}  # fmt: skip
    b.enable_flash_sdp(want["flash"])
    b.enable_mem_efficient_sdp(want["mem_efficient"])
    if hasattr(b, "enable_cudnn_sdp"):
        b.enable_cudnn_sdp(want["cudnn"])
    b.enable_math_sdp(name == "auto")  # a forced backend that cannot run must fail, not fall back to math
    return name


def _group_norm_nchw(x, weight, bias, eps: float):
    """GroupNorm of a contiguous (B, C, ...) x: statistics over (C/G, spatial) of each group, in fp32."""
    b, c = x.shape[:2]
    g, cg = weight.shape
    xg = x.reshape(b, g, cg, -1)
    xf = xg.float()
    mean = xf.mean((2, 3), keepdim=True)
    var = (xf - mean).square().mean((2, 3), keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.float()[None, :, :, None] + bias.float()[
        None, :, :, None
    ]
    return y.to(x.dtype).reshape(x.shape)


def _group_norm_nhwc(x, weight, bias, eps: float):
    """GroupNorm of a channels-last (B, C, H, W) x without leaving the layout: the grouped view is (B, HW, G, C/G)."""
    b, c, h, w = x.shape
    g, cg = weight.shape
    xg = x.permute(0, 2, 3, 1).reshape(b, h * w, g, cg)
    xf = xg.float()
    mean = xf.mean((1, 3), keepdim=True)
    var = (xf - mean).square().mean((1, 3), keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.float() + bias.float()
    return y.to(x.dtype).reshape(b, h, w, c).permute(0, 3, 1, 2)


def _geglu(h):
    a, gate = h.chunk(2, dim=-1)
    return a * F.gelu(gate)


_COMPILED: dict = {}


def _compiled(fn, backend: str):
    key = (fn, backend)
    if key not in _COMPILED:  # one dynamic-shape compile serves every channel count, batch and bucket size
        _COMPILED[key] = torch.compile(fn, dynamic=True, backend=backend)
    return _COMPILED[key]


class _GroupNormCompiled(nn.GroupNorm):
    backend = "inductor"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64) or not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        c, g = x.shape[1], self.num_groups
        fn = _compiled(_group_norm_nhwc if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
                       else _group_norm_nchw, self.backend)  # fmt: skip
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, self.weight.view(g, c // g), self.bias.view(g, c // g), self.eps)


def _geglu_forward(self, hidden_states, *args, **kwargs):
    h = self.proj(hidden_states)
    if h.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(h.device.type):
        return _geglu(h)
    with torch.autocast(h.device.type, enabled=False):
        return _compiled(_geglu, self.backend)(h)


def compiled_pointwise(model: nn.Module, backend: str = "inductor") -> int:
    """The memory-bound pieces that eager PyTorch runs as several passes, as small compiled kernels: every
    affine nn.GroupNorm (fp32 statistics, output in the input's dtype and memory layout, so channels-last stays
    channels-last) and every diffusers GEGLU (chunk, gelu and product in one pass). The functions are compiled
    once with dynamic shapes, so bucket sizes and channel counts add no compiles. Returns the modules switched."""
    import types

    import torch._dynamo

    # one compile per (layout, eps, input requires grad): a handful, above dynamo's default limit of 8 in all
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    n = 0
    for m in model.modules():
        if isinstance(m, nn.GroupNorm) and m.affine:
            m.__class__ = type("_GroupNormCompiled", (_GroupNormCompiled,), {"backend": backend})
            n += 1
        elif type(m).__name__ == "GEGLU" and hasattr(m, "proj"):
            m.backend = backend
            m.forward = types.MethodType(_geglu_forward, m)
            n += 1
    return n
