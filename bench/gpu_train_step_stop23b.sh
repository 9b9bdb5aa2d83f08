#!/usr/bin/env bash
# Stop 23 device call 2 (issue 14), after call 1 (gpu_train_step_stop23.sh): channels-last with the transformer
# outputs kept NHWC (lever clpatch, trainer_bridge/kernels.py) on top of bf16 norms, eager and regionally compiled,
# next to the eager and the compiled peer, and SDXL bs4 with the same levers; one call of at most TOTAL_S (560) s.
#     bash bench/gpu_train_step_stop23b.sh   (carry .whl_train)     DRY=1 OUT=/tmp/x TOTAL_S=900 bash ...  # CPU
set -u
CALL=stop23b TOTAL_DEFAULT=560
source "$(dirname "$0")/gpu_cases.sh"

# stop-23 call 2: channels-last (with the transformer outputs kept NHWC) on top of bf16 norms, eager and
# regionally compiled, next to the eager and the compiled peer; SDXL bs4 with the same levers
run_case levers8 150 380 sd15-512:8:peer-eager,sd15-512:8:graph+bf16norm,sd15-512:8:graph+bf16norm+cl,sd15-512:8:graph+bf16norm+clpatch,sd15-512:16:graph+bf16norm+clpatch,sd15-512:16:graph+bf16norm+cl
if [[ ${DRY:-0} != 1 ]]; then
  timeout -k 5 60 python3 bench/profile_step.py kernels --batch 16 --levers graph+bf16norm+clpatch \
    --out "$OUT/profile.jsonl" >"$LOGS/kernels.out" 2>&1
  echo "{\"case\": \"profile\", \"left_s\": $(left)}" | tee -a "$OUT/cases.jsonl"
fi
run_case sdxl4 90 300 sdxl-1024:4:peer-eager,sdxl-1024:4:graph,sdxl-1024:4:graph+bf16norm+clpatch
run_case peer_compiled8 170 150 sd15-512:8:peer
run_case regional8 300 5 sd15-512:8:regional-graph+clpatch
finish
