#!/usr/bin/env bash
# One device call for issue 14's end-to-end comparison: kohya's sd-scripts (train_network.py, unmodified, offline;
# ../shared/bench/kohya copied into .kohya/) and then `curate train` on the SAME random-weight SD1.5 model folder and
# the SAME kohya data folder (480 JPEGs in 5 buckets, batch 8, rank 32, alpha 32, lr 1e-4, AdamW, bf16, latents
# cached), UNet-only LoRA on both sides. curate trains twice (cold caches, then warm), then the bench step.
#   bash bench/gpu_kohya_e2e.sh        (carry [".kohya", ".whl_train"]; results under $OUT)
# FAMILY=sdxl: sdxl_train_network.py (cached text-encoder outputs) against curate on the SDXL folder and the
# harness's 240 JPEGs at 1024, batch 4.
# env: STEPS=240  KOHYA_S=330  OURS_S=240  KOHYA_EXTRA="--vae_batch_size 8" (more sd-scripts args)
#      TESTS=1 then runs the gpu-marked trainer tests and tests/test_networks.py (TESTS_S=200)
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
STEPS=${STEPS:-240}
FAMILY=${FAMILY:-sd15}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
# 1. sd-scripts first, on its own pinned library stack (its script keeps our wheels off its PYTHONPATH)
(
  cd .kohya && env -u PYTHONPATH OUT="$OUT" STEPS="$STEPS" EXTRA_ARGS="--network_train_unet_only ${KOHYA_EXTRA:-}" \
    timeout "${KOHYA_S:-330}" bash run_peer.sh "$FAMILY" pinned > "$OUT/kohya_stdout.txt" 2>&1
  echo "kohya rc=$?" | tee -a "$OUT/kohya_stdout.txt"
)
tail -3 "$OUT/kohya_stdout.txt"
# 2. curate on the same model and data
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl_train/*.whl || exit 1
export PYTHONPATH=/tmp/site:$ROOT PYTHONUNBUFFERED=1
MODEL=/tmp/kohya-work/models_full/$FAMILY
BATCH=8 DATA=/tmp/kohya-work/data_512_480_b8
[[ $FAMILY == sdxl ]] && BATCH=4 DATA=/tmp/kohya-work/data_1024_240_b4
# tee, never tail: a command killed at the time limit takes its whole pipeline with it
timeout "${OURS_S:-240}" python3 bench/e2e_train.py --family "$FAMILY" --batch "$BATCH" --base "$MODEL" --data "$DATA" \
  --steps "$STEPS" --runs "${RUNS:-2}" --workdir /tmp/e2e_kohya --out "$OUT/e2e_train_kohya_data.jsonl" \
  2>"$OUT/e2e_kohya_data.log" | tee -a "$OUT/e2e_stdout.jsonl"
echo "ours rc=${PIPESTATUS[0]}"
if [[ ${TESTS:-0} == 1 ]]; then
  timeout "${TESTS_S:-200}" python3 -m pytest tests/test_cache_gpu.py tests/test_fast_step_gpu.py tests/test_trainer_gpu.py \
    tests/test_networks.py -v -W ignore -p no:cacheprovider --durations=8 2>&1 | tee "$OUT/trainer_gpu_tests.txt" | tail -25
fi
