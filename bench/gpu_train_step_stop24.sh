#!/usr/bin/env bash
# Stop 24 device call 1 (issue 14): the goal table at today's defaults (graph step + bf16 norms) next to the eager
# peer in one call, for every goal shape (SD1.5 bs1/8/16, SDXL bs1/4); the fused q/k/v LoRA lever (+qkv) measured;
# the GPU tests of the fast step including the regional-compile trainer test (channels-last); regional at bs16.
#     bash bench/gpu_train_step_stop24.sh   (carry .whl_train)     DRY=1 OUT=/tmp/x TOTAL_S=900 bash ...  # CPU
set -u
CALL=stop24 TOTAL_DEFAULT=570
source "$(dirname "$0")/gpu_cases.sh"

D=graph+bf16norm
run_case sd15 150 400 sd15-512:1:peer-eager,sd15-512:1:$D,sd15-512:8:peer-eager,sd15-512:8:$D,sd15-512:8:$D+qkv,sd15-512:16:peer-eager,sd15-512:16:$D,sd15-512:16:$D+qkv
run_case sdxl 150 300 sdxl-1024:1:peer-eager,sdxl-1024:1:$D,sdxl-1024:4:peer-eager,sdxl-1024:4:$D,sdxl-1024:4:$D+qkv
if [[ ${DRY:-0} != 1 ]]; then
  timeout -k 5 $((170 < $(left) - 100 ? 170 : $(left) - 100)) python3 -m pytest tests/test_fast_step_gpu.py \
    tests/test_kernels.py -v -W ignore -p no:cacheprovider --durations=5 >"$OUT/gpu_tests.txt" 2>&1
  tail -4 "$OUT/gpu_tests.txt"
  echo "{\"case\": \"gpu tests\", \"left_s\": $(left)}" | tee -a "$OUT/cases.jsonl"
fi
run_case regional16 250 5 sd15-512:16:regional-graph+clpatch+qkv
finish
