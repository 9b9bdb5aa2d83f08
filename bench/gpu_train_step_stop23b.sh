#!/usr/bin/env bash
# Stop 23 device call 2 (issue 14), after call 1 (gpu_train_step_stop23.sh): channels-last with the transformer
# outputs kept NHWC (lever clpatch, trainer_bridge/kernels.py) on top of bf16 norms, eager and regionally compiled,
# next to the eager and the compiled peer, and SDXL bs4 with the same levers; one call of at most TOTAL_S (560) s.
#     bash bench/gpu_train_step_stop23b.sh   (carry .whl_train)     DRY=1 OUT=/tmp/x TOTAL_S=900 bash ...  # CPU
set -u
cd "$(dirname "$0")/.."
T0=$SECONDS
TOTAL=${TOTAL_S:-560}
: "${OUT:?set OUT to the results folder}"
mkdir -p "$OUT"
LOGS=/tmp/stop23b_logs
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
