#!/usr/bin/env bash
# Stop 23 device call 3 (issue 14): the rerun of calls 1 and 2 (gpu_train_step_stop23.sh, ..._stop23b.sh) for
# the figures committed, with the GPU tests of the new default (bf16 norms); one call of at most TOTAL_S (575) s.
#     bash bench/gpu_train_step_stop23c.sh   (carry .whl_train)     DRY=1 OUT=/tmp/x TOTAL_S=900 bash ...  # CPU
set -u
CALL=stop23c TOTAL_DEFAULT=575
source "$(dirname "$0")/gpu_cases.sh"

# stop-23 call 3: the rerun. bf16 norms (now the trainer's default) against the graph step before them and the
# eager peer; the GPU tests of the default path; then the compiled peer and regional compile + channels-last
run_case levers 100 480 sd15-512:8:peer-eager,sd15-512:8:graph,sd15-512:8:graph+bf16norm,sd15-512:16:graph,sd15-512:16:graph+bf16norm
if [[ ${DRY:-0} != 1 ]]; then
  timeout -k 5 $((100 < $(left) - 370 ? 100 : $(left) - 370)) python3 -m pytest tests/test_fast_step_gpu.py \
    tests/test_kernels.py -v -W ignore -p no:cacheprovider -k "not regional" --durations=5 >"$OUT/gpu_tests.txt" 2>&1
  tail -4 "$OUT/gpu_tests.txt"
  echo "{\"case\": \"gpu tests\", \"left_s\": $(left)}" | tee -a "$OUT/cases.jsonl"
fi
run_case peer_compiled8 175 185 sd15-512:8:peer
run_case regional8 300 5 sd15-512:8:regional-graph+clpatch
finish
