"""CLIP near-duplicates (crops, flips, recolours, re-renders that perceptual hashes miss) and outliers.

``clip_pair_finder`` returns the callable that :func:`curate.stages.dedupe.dedupe` merges with hash
pairs; ``outliers`` scores every kept image by its mean similarity to its k nearest neighbours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import CurateError
from ..manifest import ImageRecord, Manifest

Pairs = list[tuple[int, int, dict[str, Any]]]


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not -1.0 <= threshold <= 1.0:
        raise CurateError(f"CLIP threshold is a cosine similarity between -1 and 1, got {threshold}")
    return threshold


def clip_pair_finder(
    manifest: Manifest,
    *,
    progress: Callable[[int, int], None] | None = None,
    model: str = "ViT-B-32",
    pretrained: str | None = "openai",
    threshold: float = 0.95,
    device: str | None = None,
    batch_size: int = 256,
    workers: int | None = None,
    gpu_decode: bool | None = None,
    exact_max: int | None = None,
    index: str = "auto",
    k: int | None = None,  # [clip] options of `curate outliers`, shared section
    z: float | None = None,
    min_gap: float | None = None,
    encoder_for: Callable[[str, str | None], Any] | None = None,
    **unknown: Any,
) -> Callable[[list[ImageRecord]], Pairs]:
    """Build the CLIP pair source for dedupe; the model loads here, so a missing model fails early.

    ``encoder_for(model, pretrained)`` gives an encoder that embeds the images not cached yet elsewhere
    (curate.engine.ray_engine.clip_encoder: Ray actors; see :func:`embed_records`).

    The returned callable has a ``stats`` dict (index used, time, sampled recall) after it runs.
    """
    if unknown:
        raise CurateError(
            f"unknown option(s) {', '.join(sorted(unknown))} in [clip]; valid: model, pretrained, threshold, "
            "device, batch_size, workers, gpu_decode, exact_max, index"
        )
    threshold = _check_threshold(threshold)
    if batch_size < 1:
        raise CurateError(f"--batch-size must be at least 1, got {batch_size}")
    if index not in ("auto", "flat", "ivf"):
        raise CurateError(f"[clip] index must be auto, flat or ivf, got {index!r}")
    from ..models.clip import load_clip
    from .embed import embed_records
    from .similarity import EXACT_MAX, similar_pairs

    cm = load_clip(model, pretrained, device)
    encoder = encoder_for(model, pretrained) if encoder_for is not None else None

    def find(records: list[ImageRecord]) -> Pairs:
        ok, (emb,) = embed_records(
            manifest, records, [cm], batch_size=batch_size, workers=workers, gpu_decode=gpu_decode,
            progress=progress, encoder=encoder,
        )  # fmt: skip
        idx = np.flatnonzero(ok)
        res = similar_pairs(
            emb[idx], threshold, exact_max=exact_max or EXACT_MAX, index=index, device=cm.device
        )
        find.stats.update({"model": cm.model_id, "pretrained": cm.pretrained, "threshold": threshold,
                           "embedded": int(len(idx)), **res.as_dict()})  # fmt: skip
        return [
            (int(idx[a]), int(idx[b]), {"clip": round(float(s), 4)})
            for a, b, s in zip(res.i, res.j, res.sim, strict=True)
        ]

    find.stats = {}  # type: ignore[attr-defined]
    return find


@dataclass
class OutlierResult:
    k: int
    scores: list[tuple[str, float]]  # (path, mean similarity to k nearest), lowest first
    flagged: list[str]
    cutoff: float
    stats: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "cutoff": self.cutoff,
            "flagged": self.flagged,
            "scores": [{"path": p, "knn_similarity": s} for p, s in self.scores],
            **self.stats,
        }


def outliers(
    manifest: Manifest,
    *,
    k: int = 10,
    z: float = 3.0,
    min_gap: float = 0.02,
    model: str = "ViT-B-32",
    pretrained: str | None = "openai",
    device: str | None = None,
    batch_size: int = 256,
    workers: int | None = None,
    gpu_decode: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
    **_clip_options: Any,
) -> OutlierResult:
    """Score kept images by mean similarity to their k nearest neighbours; flag the low tail for review.

    Flagged: score below median - max(z * 1.4826 * MAD, min_gap), a robust z-score with a floor so a
    very uniform set (MAD near 0) does not flag differences in the third decimal. Nothing is rejected; the score
    is stored in ``images.scores['clip_knn']`` so filters and the report can use it.
    """
    if k < 1:
        raise CurateError(f"--k must be at least 1, got {k}")
    from ..models.clip import load_clip
    from .embed import embed_records
    from .similarity import knn_mean_similarity

    records = manifest.kept_images()
    if len(records) < 3:
        raise CurateError(
            f"outliers needs at least 3 kept images, found {len(records)}; run `curate scan` first"
        )
    cm = load_clip(model, pretrained, device)
    ok, (emb,) = embed_records(
        manifest, records, [cm], batch_size=batch_size, workers=workers, gpu_decode=gpu_decode,
        progress=progress,
    )  # fmt: skip
    idx = np.flatnonzero(ok)
    score = knn_mean_similarity(emb[idx], k)
    med = float(np.median(score))
    mad = float(np.median(np.abs(score - med))) * 1.4826
    cutoff = med - max(z * mad, min_gap)
    updates = []
    scored = []
    for r_i, s in zip(idx, score, strict=True):
        rec = records[r_i]
        scores = dict(rec.scores)
        scores["clip_knn"] = round(float(s), 5)
        updates.append((rec.sha256, {"scores": scores}))
        scored.append((rec.path, round(float(s), 5)))
    manifest.update_images(updates)
    scored.sort(key=lambda t: t[1])
    flagged = [p for p, s in scored if s < cutoff]
    stats = {"model": cm.model_id, "pretrained": cm.pretrained, "median": round(med, 5), "images": len(idx)}
    return OutlierResult(min(k, len(idx) - 1), scored, flagged, round(cutoff, 5), stats)
