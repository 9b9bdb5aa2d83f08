"""`curate run`: every curation stage in order, each a call on the same manifest."""

from __future__ import annotations

from typing import Any

from .dataset import Dataset
from .ui import console, progress_bar, table


def run_pipeline(ds: Dataset, *, out: str | None = None, show: bool = True) -> dict[str, Any]:
    """scan -> filter -> dedupe -> report; returns a summary dict (printed as a table when ``show``)."""
    summary: dict[str, Any] = {}
    with progress_bar("scan", enabled=show) as bar:
        summary["scan"] = ds.scan(progress=bar).as_dict()
    summary["filter"] = ds.filter().as_dict()
    dd = ds.dedupe()
    summary["dedupe"] = {"groups": len(dd.groups), "rejected": dd.rejected}
    summary["report"] = str(ds.report())
    summary["counts"] = ds.summary()
    summary["kept"] = len(ds.kept())
    rejected = ds.manifest.rejected_paths()
    summary["unusable"] = sum(1 for items in rejected.values() if any(s == "scan" for s, _, _ in items))
    if show:
        rows = [
            ("files scanned", summary["scan"]["total_files"]),
            ("unreadable / corrupt", summary["unusable"]),
            ("rejected by quality filters", summary["filter"]["rejected"]),
            *((f"  {k}", v) for k, v in sorted(summary["filter"]["by_reason"].items())),
            ("duplicate groups", summary["dedupe"]["groups"]),
            ("files marked duplicate", summary["dedupe"]["rejected"]),
            ("images kept", summary["kept"]),
        ]
        console.print(table("curate run", ["stage", "count"], rows))
        console.print(f"report: {summary['report']}")
    return summary
