#!/usr/bin/env bash
# Stop 23 device call (issue 14): regional compilation under the graphed step (compile = "regional"), next to the
# peer, in ONE call of at most TOTAL_S (560) seconds. One process per case, each under its own `timeout` cut to
# what the budget has left; every figure is appended to $OUT/train_step.jsonl as soon as it is measured, each
# case's exit status and wall time to $OUT/cases.jsonl, its stdout/stderr to $OUT/logs.tgz (re-tarred after each
# case, so a call cut short still returns them). Order:
#   1 peer SD1.5 512² bs8   2 ours graph bs8   3 ours regional-graph bs8 (its first step holds the compile)
#   4 compiled peer bs8, only if the budget still holds the bs16 cases after it
#   5 ours graph bs16   6 ours regional-graph bs16   7 the gpu test of compile = "regional" if time is left
#   8 ours graph+qkv bs8 (fused q/k/v LoRA down-projections) if time is left
#     bash bench/gpu_train_step_stop23.sh          (from a copy of the repo holding .whl_train/ or .whl/)
#     DRY=1 OUT=/tmp/x TOTAL_S=900 bash bench/gpu_train_step_stop23.sh   # CPU, tiny UNet: the code paths only
set -u
cd "$(dirname "$0")/.."
T0=$SECONDS
TOTAL=${TOTAL_S:-560}
: "${OUT:?set OUT to the results folder}"
mkdir -p "$OUT"
LOGS=/tmp/stop23_logs
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
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/stop23_inductor TRITON_CACHE_DIR=/tmp/stop23_triton
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

run_case peer8 90 420 sd15-512:8:peer-eager
run_case graph8 90 360 sd15-512:8:graph
run_case regional8 460 60 sd15-512:8:regional-graph  # the figure this call is for: all it can have
# bs16 regional compiles the same blocks at a new batch: about what bs8 took (its process wall time), a bit more
EST16=$((WALL > 0 ? WALL + 30 : 150))
if (($(left) - 60 - EST16 >= 120)); then
  run_case peer_compiled8 240 $((60 + EST16)) sd15-512:8:peer
else
  echo "{\"case\": \"sd15-512:8:peer\", \"skipped\": \"budget kept for bs16\", \"left_s\": $(left)}" \
    | tee -a "$OUT/cases.jsonl"
fi
run_case graph16 90 $((EST16 < 200 ? EST16 : 200)) sd15-512:16:graph
run_case regional16 400 15 sd15-512:16:regional-graph
if [[ ${DRY:-0} != 1 ]] && (($(left) >= 120)); then
  timeout -k 5 $(($(left) - 15)) python3 -m pytest tests/test_fast_step_gpu.py -m gpu -v -W ignore \
    -p no:cacheprovider -k regional --durations=3 >"$OUT/gpu_tests.txt" 2>&1
  tail -5 "$OUT/gpu_tests.txt"
fi
# the fused q/k/v LoRA down-projections (trainer_bridge/fused_qkv.py) on the plain graphed step, if time is left
run_case qkv8 90 10 sd15-512:8:graph+qkv

# summary: img/s, ratio to the peer, compile seconds (regional first step minus graph first step), % of 790 TFLOP/s
python3 - "$R" <<'EOF' | tee "$OUT/summary.txt"
import json, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
fig = {}
for r in rows:
    if "img_s" in r:
        who = r.get("variant") or ("peer-compiled" if r.get("compile") else "peer")
        fig[r["batch"], who] = r
for r in rows:
    if "error" in r:
        print("error:", r["error"][:200], r.get("args"))
for (bs, who), r in sorted(fig.items()):
    peer, graph = fig.get((bs, "peer")), fig.get((bs, "graph"))
    extra = f" x{r['img_s'] / peer['img_s']:.2f} peer" if peer and who != "peer" else ""
    if who == "regional-graph" and graph:
        extra += f", x{r['img_s'] / graph['img_s']:.2f} graph, compile ~{r['first_step_s'] - graph['first_step_s']:.0f} s"
        extra += f" ({r['compiled_graphs']} graphs, {r['graph_breaks']} breaks, {r['recompiles_after_first']} late)"
    tf = r.get("achieved_tflops", 0)
    print(f"bs{bs} {who}: {r['img_s']} img/s, {tf} TFLOP/s ({100 * tf / 790:.0f} %), peak {r.get('peak_mem_gib')} GiB{extra}")
EOF
echo "total ${SECONDS}s"
