"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageFilter

from tests.images import jpeg_bytes, textured


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A dataset with planted duplicates and quality problems, each with a known expected outcome."""
    root = tmp_path / "ds"
    (root / "sub").mkdir(parents=True)
    big = textured(1024, 768, seed=1)
    (root / "big.jpg").write_bytes(jpeg_bytes(big))
    (root / "sub" / "big_copy.jpg").write_bytes((root / "big.jpg").read_bytes())  # exact duplicate
    big.resize((800, 600), Image.Resampling.LANCZOS).save(root / "big_800.jpg", quality=75)  # near dup
    for s in range(2, 6):
        textured(800, 600, seed=s).save(root / f"distinct_{s}.png")
    textured(800, 600, seed=7).filter(ImageFilter.GaussianBlur(6)).save(root / "blurred.jpg", quality=90)
    textured(200, 150, seed=8).save(root / "tiny.png")
    return root
