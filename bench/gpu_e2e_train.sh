#!/usr/bin/env bash
# One device call for `curate train` end to end (issue 14): bench/e2e_train.py on a real-size random SD1.5 (bs 1,
# then bs 8; each trains twice: cold caches, then warm), then the gpu-marked cache tests. Results go to $OUT.
#   bash bench/gpu_e2e_train.sh [extra e2e_train.py args...]     (run from a copy of the repo holding .whl/)
#   FAMILIES="sd15 sdxl" bash bench/gpu_e2e_train.sh              # SDXL too (1024 px, bs 1 and 4)
set -u
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
W=/tmp/e2e_work
for fam in ${FAMILIES:-sd15}; do
  if [[ $fam == sdxl ]]; then batches="1 4"; else batches="1 8"; fi
  for bs in $batches; do
    # tee, never tail: a command killed at the time limit takes its whole pipeline with it
    timeout "${BENCH_S:-240}" python3 bench/e2e_train.py --family "$fam" --batch "$bs" --images "${IMAGES:-200}" \
      --steps "${STEPS:-600}" --runs 2 --workdir "$W" --out "$OUT/e2e_train.jsonl" "$@" 2>"$OUT/e2e_${fam}_bs$bs.log" \
      | tee -a "$OUT/e2e_stdout.jsonl"
  done
done
if [[ ${TESTS:-1} == 1 ]]; then
  timeout "${TESTS_S:-180}" python3 -m pytest tests/test_cache_gpu.py -m gpu -v -W ignore -p no:cacheprovider \
    --durations=5 2>&1 | tee "$OUT/cache_gpu_tests.txt" | tail -15
fi
