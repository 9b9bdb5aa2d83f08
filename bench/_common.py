"""Helpers shared by the benchmarks: machine description, JSON output, timing summaries."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, Python and library versions."""
    import numpy
    import PIL

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "?"
    info: dict[str, Any] = {
        "cpu_model": cpu,
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "pillow": PIL.__version__,
        "numpy": numpy.__version__,
    }
    try:
        from PIL import features

        info["libjpeg_turbo"] = features.version("libjpeg_turbo")
    except Exception:
        pass
    return info


def summarize(times: list[float], n_items: int) -> dict[str, Any]:
    """Seconds of each run and the best/median rate in items per second."""
    best, med = min(times), statistics.median(times)
    return {
        "runs_s": [round(t, 3) for t in times],
        "best_s": round(best, 3),
        "median_s": round(med, 3),
        "best_per_s": round(n_items / best, 2),
        "median_per_s": round(n_items / med, 2),
    }


def emit(record: dict[str, Any], out: str | Path | None = None) -> None:
    """One JSON line per case on stdout, also appended to `out` when given (so a run cut short keeps its lines)."""
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / name
    payload = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **payload}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out


def run_json_child(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run a measurement in a fresh process; its last JSON line is the result, else an error dict."""
    import subprocess

    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])
