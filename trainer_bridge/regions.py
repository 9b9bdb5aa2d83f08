"""Regional compilation: torch.compile each repeated UNet block (LoRA modules inside) instead of the whole UNet.

Compiling the whole SD1.5 UNet (forward + backward) takes minutes, because dynamo traces and inductor compiles
one huge graph. A UNet is mostly copies of a few block classes (ResnetBlock2D, Transformer2DModel /
BasicTransformerBlock, Downsample2D, Upsample2D). Each block instance is compiled in place with
``nn.Module.compile`` (the state-dict keys do not change). Dynamo caches compiled code per code object and treats
a module's parameters as graph inputs, so every block of one class with the same shapes reuses one compiled graph:
the compile work follows the number of distinct block shapes, not the depth of the UNet (SD1.5: 27 graphs for
44 blocks; on a CPU that compiled in about the time of the whole UNet, bench/README.md).

The code inductor generates in its default mode is plain kernel launches with no host syncs, so it can run
inside trainer_bridge.fast_step's own CUDA graph capture, once the warm-up passes (which run before the capture)
have compiled, loaded and autotuned every kernel.

    names = compile_regions(unet)      # in place; returns the compiled modules' paths
"""

from __future__ import annotations

from typing import Any

# diffusers block classes (by name, so no diffusers import here) compiled as one region each
REGION_CLASSES = ("ResnetBlock2D", "Transformer2DModel", "BasicTransformerBlock", "Downsample2D",
                  "Upsample2D")  # fmt: skip
# a Transformer2DModel deeper than this (SDXL's 10-layer blocks) is compiled per BasicTransformerBlock instead,
# so its identical layers share code rather than being unrolled into one long graph
MAX_BLOCKS_IN_REGION = 2
# every distinct (block class, shape) is one recompile of the same code object; the SD1.5 UNet has about a dozen
# ResnetBlock2D shapes per bucket shape, over dynamo's default limit of 8 (past it the block would run eagerly)
RECOMPILE_LIMIT = 256
# the CPU tests set "aot_eager": dynamo + AOTAutograd over the same regions, without compiling kernels
BACKEND = "inductor"
ACCUMULATED_LIMIT = 4096


def raise_recompile_limits() -> None:
    """Lift dynamo's per-code-object recompile limit so that every block shape of every bucket gets compiled."""
    import torch._dynamo.config as dc

    for name, want in (("recompile_limit", RECOMPILE_LIMIT), ("cache_size_limit", RECOMPILE_LIMIT),
                       ("accumulated_recompile_limit", ACCUMULATED_LIMIT),
                       ("accumulated_cache_size_limit", ACCUMULATED_LIMIT)):  # fmt: skip
        # older torch has cache_size_limit, newer recompile_limit (the old name an alias)
        if hasattr(dc, name) and getattr(dc, name) < want:
            setattr(dc, name, want)


def region_paths(unet: Any) -> list[str]:
    """Paths of the modules compile_regions compiles: outermost region blocks, parents before children."""
    out: list[str] = []
    for path, mod in unet.named_modules():
        if any(path.startswith(p + ".") for p in out):
            continue  # inside a region already
        name, depth = type(mod).__name__, len(getattr(mod, "transformer_blocks", ()))
        if name == "Transformer2DModel" and depth > MAX_BLOCKS_IN_REGION:
            continue  # its BasicTransformerBlocks are the regions
        if name in REGION_CLASSES:
            out.append(path)
    return out


def compile_regions(unet: Any, *, fullgraph: bool = False, **compile_kw) -> list[str]:
    """torch.compile (dynamic=False) every region block of `unet` in place; returns their paths.

    Compilation itself happens at each block's first call (per input shape). LoRA modules injected before this
    call are inside the regions and are compiled with them."""
    raise_recompile_limits()
    paths = region_paths(unet)
    for p in paths:
        kw = {"backend": BACKEND, "dynamic": False, "fullgraph": fullgraph, **compile_kw}
        unet.get_submodule(p).compile(**kw)
    return paths
