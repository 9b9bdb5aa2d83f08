#!/usr/bin/env bash
# Stop 23 device call 1 (issue 14): where the step's GPU time goes, the eager kernel levers (bf16 norms, cuDNN
# attention) at SD1.5 bs8 / bs16 next to the peer, then regional compilation inside the graphs, in ONE call of at
# most TOTAL_S (560) seconds. One process per group, each under its own `timeout` cut to what the budget has left;
# every figure is appended to $OUT/train_step.jsonl (profile figures to $OUT/profile.jsonl) as soon as it is
# measured, each case's exit status and wall time to $OUT/cases.jsonl, stdout/stderr to $OUT/logs.tgz.
#     bash bench/gpu_train_step_stop23.sh          (from a copy of the repo holding .whl_train/ or .whl/)
#     DRY=1 OUT=/tmp/x TOTAL_S=900 bash bench/gpu_train_step_stop23.sh   # CPU, tiny UNet: the code paths only
set -u
CALL=stop23 TOTAL_DEFAULT=560
source "$(dirname "$0")/gpu_cases.sh"

# 0: where the time goes (SDPA backends at SD1.5's shapes; kernel time per category at bs16), ~90 s
if [[ ${DRY:-0} != 1 ]]; then
  timeout -k 5 60 python3 bench/profile_step.py sdpa --batch 16 --out "$OUT/profile.jsonl" >"$LOGS/sdpa.out" 2>&1
  timeout -k 5 120 python3 bench/profile_step.py kernels --batch 16 --levers plain,graph,graph+bf16norm \
    --out "$OUT/profile.jsonl" >"$LOGS/kernels.out" 2>&1
  echo "{\"case\": \"profile\", \"left_s\": $(left)}" | tee -a "$OUT/cases.jsonl"
fi
# 1: the eager levers at bs8 and bs16, one process each (the attention-backend cases last: a CUDA error there
# must not cost the others)
run_case levers8 150 300 sd15-512:8:peer-eager,sd15-512:8:graph,sd15-512:8:graph+bf16norm,sd15-512:8:graph+cudnnattn,sd15-512:8:graph+bf16norm+cudnnattn
run_case levers16 120 240 sd15-512:16:graph,sd15-512:16:graph+bf16norm,sd15-512:16:graph+bf16norm+cudnnattn
# 2: regional compilation inside the graphs, bs8: all the call has left
run_case regional8 400 10 sd15-512:8:regional-graph
finish
