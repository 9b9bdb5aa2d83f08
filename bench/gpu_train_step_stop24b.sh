#!/usr/bin/env bash
# Stop 24 device call 2 (issue 14): the compiled-pointwise lever (+cpw: GroupNorm and GEGLU as small dynamic-shape
# inductor kernels, trainer_bridge/kernels.py compiled_pointwise) alone and with channels-last (+clpatch) and +qkv,
# next to today's default and the eager peer; then the regional-compile trainer test on its own.
#     bash bench/gpu_train_step_stop24b.sh   (carry .whl_train)     DRY=1 OUT=/tmp/x TOTAL_S=900 bash ...  # CPU
set -u
CALL=stop24b TOTAL_DEFAULT=520
source "$(dirname "$0")/gpu_cases.sh"

D=graph+bf16norm
run_case cpw 230 250 sd15-512:8:peer-eager,sd15-512:8:$D,sd15-512:8:$D+cpw,sd15-512:8:$D+cpw+clpatch,sd15-512:8:$D+cpw+clpatch+qkv,sd15-512:16:$D,sd15-512:16:$D+cpw+clpatch+qkv
if [[ ${DRY:-0} != 1 ]]; then
  timeout -k 5 60 python3 -m pytest tests/test_readback.py -m gpu -v -W ignore -p no:cacheprovider \
    >"$OUT/gpu_tests_readback.txt" 2>&1
  tail -4 "$OUT/gpu_tests_readback.txt"
  timeout -k 5 $(($(left) - 30)) python3 -m pytest tests/test_fast_step_gpu.py -k regional \
    -v -W ignore -p no:cacheprovider --durations=5 >"$OUT/gpu_tests.txt" 2>&1
  tail -4 "$OUT/gpu_tests.txt"
  echo "{\"case\": \"gpu tests\", \"left_s\": $(left)}" | tee -a "$OUT/cases.jsonl"
fi
finish
