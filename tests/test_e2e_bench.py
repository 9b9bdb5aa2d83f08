"""bench/e2e_train.py runs end to end (--tiny: the tiny test models on the CPU) and reports what the lead reads on
the GPU: cache times and counts, steady img/s, total wall, and the bench step's img/s beside it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.trainer_fixtures import sd15_dir  # noqa: F401  (pytest fixture)


def test_e2e_bench_tiny_runs_and_reports(sd15_dir, tmp_path):  # noqa: F811
    spec = importlib.util.spec_from_file_location(
        "e2e_train", Path(__file__).parents[1] / "bench" / "e2e_train.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "e2e.jsonl"
    head, first, summary = bench.main(["--tiny", "--workdir", str(tmp_path / "w"), "--base", str(sd15_dir),
                                       "--out", str(out)])  # fmt: skip
    assert head["images"] == 4 and head["steps"] == 4
    # 4 latents and 5 captions (4 + "" for caption dropout) encoded; a second run would read both caches
    # (tests/test_te_cache.py); --runs 2 shows it on the GPU
    assert (first["latents_encoded"], first["te_encoded"], first["steps"]) == (4, 5, 4)
    assert first["wall_s"] >= first["total_s"] > first["train_s"] > 0 and first["steady_img_s"] > 0
    assert summary["bench_step_img_s"] > 0 and summary["ratio"] > 0
    assert len(out.read_text().splitlines()) == 4  # setup, the run, the bench step, the comparison
