"""`curate run`: every curation stage in order, each a call on the same manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape

from .dataset import Dataset
from .errors import CurateError
from .stages.bucket import DEFAULT_FAMILY, RESOLUTION
from .ui import console, progress_bar, table


def run_pipeline(
    ds: Dataset,
    *,
    out: str | None = None,
    model: str = DEFAULT_FAMILY,
    trigger: str | None = None,
    class_word: str | None = None,
    val: float = 0.1,
    seed: int = 0,
    reg: str | None = None,
    show: bool = True,
) -> dict[str, Any]:
    """scan -> filter -> dedupe -> split -> bucket -> report, then export + training plan into ``out``."""
    if model not in RESOLUTION:
        raise CurateError(f"unknown --model {model!r}; choose sd15 or sdxl")
    if reg is not None and out is None:
        raise CurateError("--reg exports regularization images with the curated set; add --out FOLDER")
    if reg is not None and not Path(reg).expanduser().is_dir():
        raise CurateError(f"--reg {reg} is not a folder; pass the folder of regularization images")
    if out is not None:
        target = Path(out)
        if target.exists() and any(target.iterdir()):
            raise CurateError(
                f"{target} exists and is not empty; choose another --out (exports never overwrite)"
            )
    summary: dict[str, Any] = {}
    with progress_bar("scan", enabled=show) as bar:
        summary["scan"] = ds.scan(progress=bar).as_dict()
    summary["filter"] = ds.filter().as_dict()
    dd = ds.dedupe()
    summary["dedupe"] = {"groups": len(dd.groups), "rejected": dd.rejected}
    summary["split"] = ds.split(val=val, seed=seed).as_dict()
    summary["bucket"] = ds.bucket(model).as_dict()
    summary["report"] = str(ds.report())
    summary["counts"] = ds.summary()
    summary["kept"] = len(ds.kept())
    rejected = ds.manifest.rejected_paths()
    summary["unusable"] = sum(1 for items in rejected.values() if any(s == "scan" for s, _, _ in items))
    if out is not None:
        from .stages.plan import write_plan

        res = ds.export(out, format="kohya", trigger=trigger, class_word=class_word, reg=reg)
        summary["export"] = res.as_dict()
        p = ds.plan(model=model, trigger=trigger, class_word=class_word)
        summary["plan"] = str(write_plan(p, Path(out) / "train.toml"))
    if show:
        sp = summary["split"]
        rows = [
            ("files scanned", summary["scan"]["total_files"]),
            ("unreadable / corrupt", summary["unusable"]),
            ("rejected by quality filters", summary["filter"]["rejected"]),
            *((f"  {k}", v) for k, v in sorted(summary["filter"]["by_reason"].items())),
            ("duplicate groups", summary["dedupe"]["groups"]),
            ("files marked duplicate", summary["dedupe"]["rejected"]),
            ("images kept", summary["kept"]),
            ("train / val", f"{sp.get('train', '?')} / {sp.get('val', '?')}"),
            ("buckets used", len(summary["bucket"].get("buckets", {}) or {})),
        ]
        if out is not None:
            rows.append(("exported to", summary["export"]["out"]))
            rows.append(("training plan", summary["plan"]))
        console.print(table("curate run", ["stage", "result"], rows))
        console.print(f"report: {summary['report']}", markup=False)
        for w in summary.get("export", {}).get("warnings", []):
            console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
    return summary
