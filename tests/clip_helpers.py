"""Tiny open_clip model and image sets for the CLIP tests (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def make_tiny_model(folder: Path, *, mirror_symmetric: bool = True, seed: int = 0) -> Path:
    """Random-init ViT saved as open_clip_config.json + open_clip_model.safetensors.

    With ``mirror_symmetric`` the patch filters and the positional-embedding grid are made symmetric
    under a left-right flip. Attention and pooling are permutation-equivariant, so the whole image
    tower is then exactly flip-invariant: a stand-in for a trained CLIP, which is nearly so.
    """
    import open_clip
    import torch

    from curate.models.clip import save_local_model

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CFG)
    if mirror_symmetric:
        v = model.visual
        with torch.no_grad():
            w = v.conv1.weight
            w.copy_((w + w.flip(-1)) / 2)
            pe = v.positional_embedding
            g = int(round((pe.shape[0] - 1) ** 0.5))
            grid = pe[1:].reshape(g, g, -1)
            pe[1:] = ((grid + grid.flip(1)) / 2).reshape(g * g, -1)
    return save_local_model(model, TINY_CFG, folder, name="tiny-test")


def pattern(kind: int, size: int = 96, seed: int = 0) -> Image.Image:
    """Distinct synthetic images, none left-right symmetric."""
    rng = np.random.default_rng(seed + kind)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    x = np.zeros((size, size, 3))
    if kind == 0:
        x[..., 0], x[..., 1] = xx, yy
    elif kind == 1:
        x[...] = ((((xx * 6).astype(int) + (yy * 6 + xx * 3).astype(int)) % 2) * xx)[..., None]
    elif kind == 2:
        x[...] = rng.random((size, size, 3))
    elif kind == 3:
        x[..., 2] = 0.5 + 0.5 * np.sin(xx * 20 + yy * 5)
        x[..., 0] = xx
    elif kind == 4:
        x[...] = 0.2
        x[(xx - 0.3) ** 2 + (yy - 0.5) ** 2 < 0.05] = [1, 0.5, 0]
    elif kind == 5:
        x[..., 1] = xx**2
        x[yy > 0.6] = [0.1, 0.2, 0.9]
    elif kind == 6:
        x[...] = (xx * yy)[..., None] * [0.9, 0.3, 0.6]
    else:
        x[...] = rng.random(3) * xx[..., None] + rng.random(3) * (1 - yy[..., None])
    return Image.fromarray((np.clip(x, 0, 1) * 255).astype(np.uint8), "RGB")
