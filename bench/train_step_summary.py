"""The summary of a device call's bench/train_step.py figures (and bench/profile_step.py's, if any): per case and
batch, img/s, TFLOP/s and % of 790 (the bf16 peak issue 14 counts against), peak memory, the ratio to the eager
peer of the same case, and for regional compile the ratio to the graph step and the compile seconds.

    python bench/train_step_summary.py OUT/train_step.jsonl [OUT/profile.jsonl]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PEAK_TFLOPS = 790


def summary(rows: list[dict]) -> list[str]:
    out, fig = [], {}
    for r in rows:
        if "img_s" in r:
            who = r.get("variant") or ("peer-compiled" if r.get("compile") else "peer")
            fig[r["case"][:4] + str(r["batch"]), who] = r
        elif "error" in r:
            out.append(f"error: {r['error'][:200]} {r.get('args')}")
    for (shape, who), r in sorted(fig.items()):
        peer, graph = fig.get((shape, "peer")), fig.get((shape, "graph"))
        extra = f" x{r['img_s'] / peer['img_s']:.2f} peer" if peer and who != "peer" else ""
        if who.startswith("regional-graph") and graph:
            extra += f", x{r['img_s'] / graph['img_s']:.2f} graph, compile ~{r['first_step_s'] - graph['first_step_s']:.0f} s"
            extra += f" ({r['compiled_graphs']} graphs, {r['graph_breaks']} breaks, {r['recompiles_after_first']} late)"
        tf = r.get("achieved_tflops", 0)
        out.append(f"{shape} {who}: {r['img_s']} img/s, {tf} TFLOP/s ({100 * tf / PEAK_TFLOPS:.0f} %), "
                   f"peak {r.get('peak_mem_gib')} GiB{extra}")  # fmt: skip
    return out


def profile_summary(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r.get("what") == "sdpa":
            out.append(
                f"sdpa {r['shape']} { ({k: v for k, v in r.items() if k.endswith(('_ms', '_error'))}) }"
            )
        elif r.get("what") == "kernels":
            out.append(
                f"kernels {r['levers']} wall {r['wall_ms']} kernel {r['kernel_ms']} {r['by_category_ms']}"
            )
    return out


def read(path: str) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


if __name__ == "__main__":
    lines = summary(read(sys.argv[1]))
    if len(sys.argv) > 2:
        lines += profile_summary(read(sys.argv[2]))
    print("\n".join(lines))
