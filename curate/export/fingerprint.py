"""Export fingerprints: one hash of everything an export hands the trainer, so `curate train` can tell
whether an earlier export is still what it would write now (reuse) or not (re-export).

The hash covers the kept images (paths and SHA-256 of their bytes), their effective captions, splits,
concept folders, the regularization images, the export options (trigger, class, repeats, bucket
settings, link mode, ...) and :data:`EXPORT_VERSION`. It is stored as ``fingerprint`` in the
export's ``curate_export.json``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import CurateError
from ..manifest import Manifest

# Bump when the layout or the TOML an export writes changes: older exports are then re-exported.
EXPORT_VERSION = 3  # 3: keep_tokens per subset


def digest(payload: Any) -> str:
    """SHA-256 (hex) of a JSON-able value, independent of dict order."""
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def export_fingerprint(manifest: Manifest, format: str = "kohya", **options: Any) -> str:
    """The fingerprint an export of ``manifest`` with ``options`` would record; nothing is written."""
    if format != "kohya":
        raise CurateError(f"export fingerprints exist for --format kohya only, not {format!r}")
    from .kohya import kohya_layout

    return kohya_layout(manifest, **options).fingerprint()


def read_export_record(out: Path) -> dict[str, Any] | None:
    """The ``curate_export.json`` of an earlier export in ``out``, or None (absent or unreadable)."""
    from .common import EXPORT_RECORD

    try:
        record = json.loads((Path(out) / EXPORT_RECORD).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def changed_images(old: dict[str, Any] | None, new: dict[str, Any]) -> int:
    """How many images (training, validation and regularization) differ between two export records."""

    def index(rec: dict[str, Any] | None) -> dict[str, Any]:
        if not rec:
            return {}
        out = {
            ("img", i.get("sha256")): (i.get("subset"), i.get("split"), i.get("caption"))
            for i in rec.get("images", [])
        }
        out.update({("reg", r.get("sha256")): (r.get("file"), r.get("caption")) for r in rec.get("reg", [])})
        return out

    a, b = index(old), index(new)
    return sum(1 for k in a.keys() | b.keys() if a.get(k) != b.get(k))
