#!/usr/bin/env bash
# One device call for the training-step speed (issue 14): the peer and our step variants on the same shapes in one
# process (bench/train_step.py --suite), then the gpu-marked fast-step tests. Results go to $OUT.
#   bash bench/gpu_train_step.sh [suite args...]     (run from a copy of the repo holding .whl/)
set -u
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
# tee, never tail: a command killed at the time limit takes its whole pipeline with it
timeout "${BENCH_S:-420}" python3 bench/train_step.py --suite --out "$OUT/train_step.jsonl" "$@" 2>&1 \
  | tee "$OUT/bench.log" | grep -E '^\{|Warning: fast|Error'
if [[ ${TESTS:-1} == 1 ]]; then
  timeout "${TESTS_S:-150}" python3 -m pytest tests/test_fast_step_gpu.py -m gpu -v -W ignore -p no:cacheprovider \
    --durations=5 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
fi
