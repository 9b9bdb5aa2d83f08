"""From a folder of images to a kohya-ready export and a training plan, in Python.

python examples/prepare_for_kohya.py ./my_images ./my_export --trigger mychar --class woman
"""

from __future__ import annotations

import argparse

from curate import Dataset
from curate.stages.plan import write_plan

ap = argparse.ArgumentParser()
ap.add_argument("dataset")
ap.add_argument("out")
ap.add_argument("--trigger")
ap.add_argument("--class", dest="class_word")
ap.add_argument("--model", default="sdxl", choices=["sd15", "sdxl"])
ap.add_argument("--vram", type=float, default=24)
args = ap.parse_args()

with Dataset.open(args.dataset) as ds:
    ds.scan()
    ds.filter()
    ds.dedupe()
    split = ds.split(val=0.1, seed=0)  # near-duplicates never straddle train/val
    resolution = 1024 if args.model == "sdxl" else 512
    buckets = ds.bucket(resolution=resolution, max_size=2 * resolution)  # the trainer's own bucket rules
    for w in buckets.warnings:
        print("bucket warning:", w)
    res = ds.export(args.out, "kohya", repeats=10, trigger=args.trigger, class_word=args.class_word)
    plan = ds.plan(model=args.model, vram=args.vram, trigger=args.trigger, class_word=args.class_word)
    path = write_plan(plan, ds.root / ".curate" / "train.toml")
print(
    f"{split.train} train / {split.val} val images exported to {res.out}; dataset TOML: {res.out / 'dataset.toml'}"
)
print(f"plan: {plan.total_steps} steps, unet_lr {plan.train['unet_lr']}, written to {path}")
