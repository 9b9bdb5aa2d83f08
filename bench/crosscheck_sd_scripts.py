"""Compare our buckets and dataset TOML with kohya-ss/sd-scripts' own code, from a local checkout.

    git clone https://github.com/kohya-ss/sd-scripts /tmp/sd-scripts
    PYTHONPATH=. python bench/crosscheck_sd_scripts.py --sd-scripts /tmp/sd-scripts [--toml out/dataset.toml]

Loads only ``make_bucket_resolutions``, ``BucketManager`` and ``ConfigSanitizer`` from their sources
(no torch needed; ``pip install voluptuous toml`` for the TOML check) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import types
from pathlib import Path

import numpy as np

from curate.stages.bucket import BucketSettings, make_buckets, place

SETTINGS = [
    (512, 256, 1024, 64),
    (768, 256, 1024, 64),
    (1024, 256, 2048, 64),
    (1024, 512, 2048, 32),
    (640, 320, 1280, 64),
]


def _block(path: Path, first: str, stop: str | None, n: int | None = None) -> str:
    lines = path.read_text(encoding="utf-8").splitlines()
    s = next(i for i, line in enumerate(lines) if line.startswith(first))
    e = s + n if n else next(i for i, line in enumerate(lines) if i > s and line.startswith(stop))
    return "\n".join(lines[s:e])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sd-scripts", required=True, type=Path)
    ap.add_argument("--toml", type=Path, action="append", default=[])
    ap.add_argument("--n", type=int, default=3000)
    args = ap.parse_args()
    lib = args.sd_scripts / "library"
    mu: dict = {"math": math}
    exec(_block(lib / "model_util.py", "def make_bucket_resolutions", "if __name__"), mu)
    g = {"math": math, "np": np, "random": random, "Tuple": tuple,
         "model_util": types.SimpleNamespace(make_bucket_resolutions=mu["make_bucket_resolutions"])}  # fmt: skip
    exec(_block(lib / "train_util.py", "class BucketManager", "class BucketBatchIndex"), g)
    rng = random.Random(0)
    same = differ = theirs_crash = 0
    for res, mn, mx, step in SETTINGS:
        lists_equal = make_buckets(res, mn, mx, step) == mu["make_bucket_resolutions"](
            (res, res), mn, mx, step
        )
        differ += not lists_equal
        for no_up in (False, True):
            bm = g["BucketManager"](no_up, (res, res), mn, mx, step)
            if not no_up:
                bm.make_buckets()
            for _ in range(args.n):
                w, h = rng.randint(64, 5000), rng.randint(64, 5000)
                ours = place(w, h, BucketSettings(res, mn, mx, step, no_up))
                try:
                    reso, resized, _ = bm.select_bucket(w, h)
                except ZeroDivisionError:  # extreme aspect in no-upscale mode: sd-scripts fails, we warn
                    theirs_crash += 1
                    continue
                if (tuple(reso), tuple(resized)) == (ours.bucket, ours.resized):
                    same += 1
                else:
                    differ += 1
    out = {"case": "buckets", "same": same, "differ": differ, "sd_scripts_crashed": theirs_crash}
    if args.toml:
        import toml
        import voluptuous

        ns = {
            **vars(voluptuous),
            "voluptuous": voluptuous,
            "functools": __import__("functools"),
            "logger": None,
            "argparse": argparse,
        }
        ns.update({k: getattr(__import__("typing"), k) for k in ("Sequence", "Tuple", "Union", "Optional")})
        exec(_block(lib / "config_util.py", "class ConfigSanitizer", "class BlueprintGenerator"), ns)
        sanitizer = ns["ConfigSanitizer"](True, True, False, True)  # as train_network.py builds it
        out["toml_accepted"] = {}
        for p in args.toml:
            try:
                sanitizer.sanitize_user_config(toml.load(p))
                out["toml_accepted"][str(p)] = True
            except voluptuous.MultipleInvalid as exc:
                out["toml_accepted"][str(p)] = str(exc)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
