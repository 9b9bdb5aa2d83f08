# Sourced by the bench/gpu_train_step_stop23*.sh device calls: installs the carried wheels (or, with DRY=1, stays
# on the CPU), then gives `left` (seconds of the call's TOTAL_S budget left), `run_case TAG WANT_S RESERVE_S SPEC`
# (one bench/train_step.py --cases process under its own timeout, cut to the budget) and `finish` (the summary:
# bench/train_step_summary.py over $OUT, logs tarred). Set CALL (a name for /tmp folders) and TOTAL_DEFAULT first.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T0=$SECONDS
TOTAL=${TOTAL_S:-${TOTAL_DEFAULT:-560}}
: "${OUT:?set OUT to the results folder}"
mkdir -p "$OUT"
LOGS=/tmp/${CALL:-gpu_cases}_logs
rm -rf "$LOGS" && mkdir -p "$LOGS"
DRYARG=()
if [[ ${DRY:-0} == 1 ]]; then
  DRYARG=(--dry-run)
  export PYTHONPATH=$PWD
else
  WHL=.whl_train
  [[ -d $WHL ]] || WHL=.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHL"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
fi
# a fresh inductor / triton cache under /tmp: the compile times below are cold-cache times
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/${CALL:-gpu_cases}_inductor \
  TRITON_CACHE_DIR=/tmp/${CALL:-gpu_cases}_triton
export TORCH_LOGS=${TORCH_LOGS:-graph_breaks}
R=$OUT/train_step.jsonl

left() { echo $((TOTAL - (SECONDS - T0))); }
WALL=0
# run_case TAG WANT_S RESERVE_S SPEC: at most WANT_S, and never into the RESERVE_S kept for the cases after it
run_case() {
  local tag=$1 want=$2 reserve=$3 spec=$4 lim t rc
  lim=$(($(left) - reserve))
  ((lim > want)) && lim=$want
  if ((lim < ${MIN_S:-25})); then
    echo "{\"case\": \"$spec\", \"skipped\": \"budget\", \"left_s\": $(left)}" | tee -a "$OUT/cases.jsonl"
    WALL=0
    return
  fi
  t=$SECONDS
  timeout -k 5 "$lim" python3 bench/train_step.py "${DRYARG[@]}" --cases "$spec" --out "$R" \
    >"$LOGS/$tag.out" 2>"$LOGS/$tag.err"
  rc=$?
  WALL=$((SECONDS - t))
  echo "{\"case\": \"$spec\", \"rc\": $rc, \"limit_s\": $lim, \"wall_s\": $WALL, \"left_s\": $(left)}" \
    | tee -a "$OUT/cases.jsonl"
  grep -E '^\{' "$LOGS/$tag.out" | grep -v '"gpu"' | cut -c1-400
  tar czf "$OUT/logs.tgz" -C "$LOGS" .
}

finish() {
  python3 bench/train_step_summary.py "$R" "$OUT/profile.jsonl" | tee "$OUT/summary.txt"
  tar czf "$OUT/logs.tgz" -C "$LOGS" .
  echo "total ${SECONDS}s"
}
