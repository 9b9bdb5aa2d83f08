"""Per-epoch bookkeeping: which saved epoch is best, when the run overfits, and the prompt x epoch sample grid.

Each saved epoch (save_every_n_epochs, and the final file) becomes one EpochRecord. The best epoch is the one with
the lowest validation loss (fixed noise and timesteps, so epochs compare). Pure functions on the records, so the
rules are tested on plain numbers and re-applied to a finished run's `curate_epochs` metadata.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EpochRecord:
    epoch: int  # 1-based, as in the file names
    step: int  # optimizer steps done when it was saved
    train_loss: float | None  # mean train loss over this epoch's micro-batches (None: no batch ran in it)
    val_loss: float | None  # None without a validation set
    file: str  # the LoRA file's name inside output_dir
    removed: bool = False  # deleted by keep_last_n
    samples: list[str] = field(default_factory=list)  # one image per sample prompt (names inside output_dir)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochRecord:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def best_index(records: list[EpochRecord]) -> int | None:
    """Index of the record with the lowest val loss (the earliest on a tie); None without val losses."""
    scored = [(r.val_loss, i) for i, r in enumerate(records) if r.val_loss is not None]
    return min(scored)[1] if scored else None


def overfitting(records: list[EpochRecord]) -> str | None:
    """A one-line warning when val loss rose on two consecutive saved epochs while train loss fell; else None.

    The first such run of three records is reported (a, b, c with val a < b < c and train a > b > c)."""
    rows = [r for r in records if r.val_loss is not None and r.train_loss is not None]
    for a, b, c in zip(rows, rows[1:], rows[2:], strict=False):
        if a.val_loss < b.val_loss < c.val_loss and a.train_loss > b.train_loss > c.train_loss:
            return (
                f"overfitting: val loss rose for two epochs in a row (epoch {a.epoch} {a.val_loss:.4f} -> "
                f"{b.epoch} {b.val_loss:.4f} -> {c.epoch} {c.val_loss:.4f}) while train loss fell "
                f"({a.train_loss:.4f} -> {c.train_loss:.4f}); use an earlier epoch's file, or train fewer epochs "
                "or at a lower learning rate"
            )
    return None


def keep_files(records: list[EpochRecord], keep_last_n: int, final: str) -> list[EpochRecord]:
    """The epoch records whose files keep_last_n deletes now: all but the newest keep_last_n and the best one.

    The best epoch (lowest val loss so far) is never deleted, so up to keep_last_n + 1 epoch files stay.
    The final file (`final`) is not an epoch file and is never counted."""
    if keep_last_n <= 0:
        return []
    alive = [r for r in records if not r.removed and r.file != final]
    best = best_index(records)
    best_file = records[best].file if best is not None else None
    return [r for r in alive[:-keep_last_n] if r.file != best_file]


def table_rows(records: list[EpochRecord]) -> list[list[str]]:
    """Rows for the end-of-run table: epoch, step, train loss, val loss, file, note (best / removed by keep_last_n)."""
    best = best_index(records)
    rows = []
    for i, r in enumerate(records):
        note = ", ".join(n for n, on in (("best", i == best), ("removed", r.removed)) if on)
        rows.append([
            str(r.epoch), str(r.step), "-" if r.train_loss is None else f"{r.train_loss:.4f}",
            "-" if r.val_loss is None else f"{r.val_loss:.4f}", r.file, note,
        ])  # fmt: skip
    return rows


def summary(records: list[EpochRecord]) -> dict[str, Any]:
    """The table as JSON (the final file's `curate_epochs`, logs/epochs.json, `curate train --json`)."""
    best = best_index(records)
    return {
        "epochs": [r.to_dict() for r in records],
        "best_epoch": records[best].epoch if best is not None else None,
        "best_file": records[best].file if best is not None else None,
        "warnings": [w for w in [overfitting(records)] if w],
    }


def epochs_grid(records: list[EpochRecord], out_dir: Path, path: Path) -> Path | None:
    """Compose the per-epoch samples into one PNG: a row per prompt, a column per saved epoch (left to right).

    Each cell is one sample at its own size (the first sample's, if they differ), labelled in its corner with the
    epoch (and "best"). None when no record has samples."""
    from PIL import Image, ImageDraw

    cols = [r for r in records if r.samples]
    if not cols:
        return None
    n_prompts = max(len(r.samples) for r in cols)
    with Image.open(out_dir / cols[0].samples[0]) as first:
        w, h = first.size
    grid = Image.new("RGB", (w * len(cols), h * n_prompts), "black")
    best = best_index(records)
    best_epoch = records[best].epoch if best is not None else None
    draw = ImageDraw.Draw(grid)
    for j, r in enumerate(cols):
        for k, name in enumerate(r.samples):
            with Image.open(out_dir / name) as img:
                grid.paste(img.convert("RGB").resize((w, h)), (j * w, k * h))
        label = f"e{r.epoch}" + (" best" if r.epoch == best_epoch else "")
        draw.text((j * w + 2, 1), label, fill="white", stroke_width=1, stroke_fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
