#!/usr/bin/env bash
# Stop 23 device call 3 (issue 14): the rerun of calls 1 and 2 (gpu_train_step_stop23.sh, ..._stop23b.sh) for
# the figures committed, with the GPU tests of the new default (bf16 norms); one call of at most TOTAL_S (575) s.
#     bash bench/gpu_train_step_stop23c.sh   (carry .whl_train)     DRY=1 OUT=/tmp/x TOTAL_S=900 bash ...  # CPU
set -u
cd "$(dirname "$0")/.."
T0=$SECONDS
TOTAL=${TOTAL_S:-575}
: "${OUT:?set OUT to the results folder}"
mkdir -p "$OUT"
LOGS=/tmp/stop23c_logs
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

# summary: img/s, ratio to the peer, compile seconds (regional first step minus graph first step), % of 790 TFLOP/s
python3 - "$R" <<'EOF' | tee "$OUT/summary.txt"
import json, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
fig = {}
for r in rows:
    if "img_s" in r:
        who = r.get("variant") or ("peer-compiled" if r.get("compile") else "peer")
        fig[r["case"][:4] + str(r["batch"]), who] = r
for r in rows:
    if "error" in r:
        print("error:", r["error"][:200], r.get("args"))
for (bs, who), r in sorted(fig.items()):
    peer, graph = fig.get((bs, "peer")), fig.get((bs, "graph"))
    extra = f" x{r['img_s'] / peer['img_s']:.2f} peer" if peer and who != "peer" else ""
    if who.startswith("regional-graph") and graph:
        extra += f", x{r['img_s'] / graph['img_s']:.2f} graph, compile ~{r['first_step_s'] - graph['first_step_s']:.0f} s"
        extra += f" ({r['compiled_graphs']} graphs, {r['graph_breaks']} breaks, {r['recompiles_after_first']} late)"
    tf = r.get("achieved_tflops", 0)
    print(f"{bs} {who}: {r['img_s']} img/s, {tf} TFLOP/s ({100 * tf / 790:.0f} %), peak {r.get('peak_mem_gib')} GiB{extra}")
EOF
python3 - "$OUT/profile.jsonl" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys, os

if os.path.exists(sys.argv[1]):
    for r in map(json.loads, open(sys.argv[1])):
        if r.get("what") == "sdpa":
            print("sdpa", r["shape"], {k: v for k, v in r.items() if k.endswith(("_ms", "_error"))})
        elif r.get("what") == "kernels":
            print("kernels", r["levers"], "wall", r["wall_ms"], "kernel", r["kernel_ms"], r["by_category_ms"])
EOF
tar czf "$OUT/logs.tgz" -C "$LOGS" .
echo "total ${SECONDS}s"
