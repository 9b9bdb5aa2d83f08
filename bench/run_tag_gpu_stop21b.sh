#!/usr/bin/env bash
# Second GPU call for issue 15: the tagging GPU tests (fixed), then `curate tag` with --compile (compiled at load).
# Baseline figures come from the first call's JSONL (bench/results/tag_gpu_h200_stop21_call1.jsonl).
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site --find-links ../.whl \
  diffusers open_clip_torch ImageHash ftfy PyWavelets wcwidth importlib_metadata zipp faiss-cpu rich typer tomli_w \
  lycoris-lora pydantic pydantic-core annotated-types typing-inspection einops toml || echo "wheel install failed"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{
  echo "## python -m pytest -m gpu tests/test_tag_gpu.py tests/test_tag_gpu_decode.py tests/test_blip.py tests/test_tag_backends.py"
  timeout 100 python3 -m pytest -q -rs -s -p no:cacheprovider -m gpu tests/test_tag_gpu.py tests/test_tag_gpu_decode.py \
    tests/test_blip.py tests/test_tag_backends.py 2>&1 | grep -v -E "^$|Loading weights|Writing model shards|TracerWarning|return self.detach|if not condition"
} > "$OUT/tag_gpu_tests.txt"
tail -6 "$OUT/tag_gpu_tests.txt"
timeout "${BENCH_TIMEOUT:-200}" python3 bench/tag_cli_speed.py --images 2048 \
  --only "${ONLY:-vit:;vit:--compile;swinv2:--compile}" --baseline-from bench/results/tag_gpu_h200_stop21_call1.jsonl \
  --out "$OUT/tag_gpu_h200_stop21_call2.jsonl" > "$OUT/bench_log.txt" 2>&1
echo "bench rc $?"
grep -E '^\{' "$OUT/bench_log.txt" | cut -c1-200
grep -v -E '^\{' "$OUT/bench_log.txt" | tail -8
