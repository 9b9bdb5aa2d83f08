#!/usr/bin/env bash
# Stop 24 device call 4 (issue 14, SDXL end to end): curate train on the SAME random SDXL folder and 240-JPEG kohya
# folder that ../shared/bench/kohya builds for sd-scripts (make_models.py / make_data.py under its pinned stack),
# with sd-scripts' settings of call 3 (batch 4, 120 steps, rank 32, UNet only). sd-scripts itself did not fit
# into the budget left, so its figures are from call 3 (another fresh H200): not a same-call ratio.
#     bash bench/gpu_kohya_sdxl_ours.sh   (carry [".whl_train", ".kohya"])
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
K=$ROOT/.kohya SITE=/tmp/kohya-site W=/tmp/kohya-work
mkdir -p "$SITE" "$W"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$K"/wheels/common/*.whl "$K"/wheels/pinned/*.whl
t=$SECONDS
( cd "$K" && PYTHONPATH=$SITE python3 make_models.py $W/models_full --full --sdxl --no-sd15 > "$OUT/build.txt" 2>&1
  PYTHONPATH=$SITE python3 make_data.py $W/data_1024_240_b4 240 --base 1024 --batch-multiple 4 >> "$OUT/build.txt" 2>&1 )
echo "build $((SECONDS - t)) s" | tee -a "$OUT/build.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl_train/*.whl || exit 1
export PYTHONPATH=/tmp/site:$ROOT PYTHONUNBUFFERED=1
timeout -k 5 "${OURS_S:-220}" python3 bench/e2e_train.py --family sdxl --batch 4 --base $W/models_full/sdxl \
  --data $W/data_1024_240_b4 --steps "${STEPS:-120}" --runs 1 --workdir /tmp/e2e_kohya \
  --out "$OUT/e2e_train_kohya_data.jsonl" 2>"$OUT/e2e_kohya_data.log" | tee -a "$OUT/e2e_stdout.jsonl"
echo "ours rc=${PIPESTATUS[0]}"
