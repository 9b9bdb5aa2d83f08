#!/usr/bin/env bash
# One GPU-machine call for issue 15 (stop 22): `curate tag` end to end on 8192 JPEGs of 448x448 written on the
# device, each case a fresh CLI process (bench/tag_cli_speed.py --only): vit defaults, --compile, --compile again
# (inductor's cache warm: the stop-21 386 img/s case), --dtype bf16, --compile --dtype bf16, then swinv2
# defaults and --compile (last: it may run out of the total).
# Before them, the tagging GPU tests (compile + nvJPEG + the model on its own stream against the CPU path).
# Run from a copy of the repo with the wheels the machine lacks in ../.whl; results land in $OUT as measured:
#   tag_gpu_h200_stop22.jsonl  one line per case (waits, notices, compile_s, scores vs the shape's first run),
#                              then one tag_cli_summary line per shape (vs_eager, break_even_images)
#   logs/NN_<case>.txt         each CLI's stderr (TORCH_LOGS=recompiles: why a graph compiled again)
#   tag_gpu_tests.txt, env.txt
# The whole call stays under TOTAL seconds (default 410): each case has its own limit and gets at most what is
# left. CPU dry run: IMAGES=64 CASES="tiny:;tiny:--compile" SKIP_INSTALL=1 OUT=/tmp/o bash bench/run_tag_gpu_stop22.sh
set -uo pipefail
T0=$(date +%s)
TOTAL=${TOTAL:-410}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT/logs"
left() { echo $((TOTAL - ($(date +%s) - T0))); }
if [ -z "${SKIP_INSTALL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site --find-links ../.whl \
    diffusers open_clip_torch ImageHash ftfy PyWavelets wcwidth importlib_metadata zipp faiss-cpu rich typer tomli_w \
    lycoris-lora pydantic pydantic-core annotated-types typing-inspection einops toml || echo "wheel install failed"
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# inductor's caches in /tmp: a second compile of the same graph (the second vit --compile) loads, not compiles
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache} TORCH_LOGS=${TORCH_LOGS:-recompiles}
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import os, torch, torchvision, timm
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
print("torch", torch.__version__, "cuda", torch.version.cuda, gpu, "torchvision", torchvision.__version__,
      "timm", timm.__version__, "cores", os.cpu_count())
PY
{
  echo "## pytest -m gpu tests/test_tag_compile.py tests/test_tag_gpu_decode.py tests/test_tag_gpu.py -k 'not blip'"
  timeout "${TESTS_TIMEOUT:-70}" python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_tag_compile.py \
    tests/test_tag_gpu_decode.py tests/test_tag_gpu.py -k "not blip" 2>&1 \
    | grep -v -E "^$|Loading weights|TracerWarning|return self.detach|if not condition"
  echo "pytest rc ${PIPESTATUS[0]}"
} > "$OUT/tag_gpu_tests.txt"
tail -5 "$OUT/tag_gpu_tests.txt"
CASES=${CASES:-"vit:@60;vit:--compile@110;vit:--compile@70;vit:--dtype bf16@60;vit:--compile --dtype bf16@110;swinv2:@80;swinv2:--compile@200"}
BUDGET=$(($(left) - 5))
echo "bench: ${IMAGES:-8192} images, ${BUDGET} s left for writing, scanning and the cases"
timeout "$BUDGET" python3 bench/tag_cli_speed.py --images "${IMAGES:-8192}" --only "$CASES" --budget "$((BUDGET - 3))" \
  --baseline-from bench/results/tag_gpu_h200_stop21_call1.jsonl --logs "$OUT/logs" \
  --out "$OUT/tag_gpu_h200_stop22.jsonl" > "$OUT/bench_log.txt" 2>&1
echo "bench rc $? after $(($(date +%s) - T0)) s"
python3 - "$OUT/tag_gpu_h200_stop22.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d.get("case") == "curate_tag_cli":
        print(d["shape"], d.get("flags"), d.get("images_per_second"), "compile_s", d.get("compile_s"), "cpu_s",
              d.get("cpu_s"), "load_s", round(d.get("load_seconds") or 0, 1), "waits",
              d.get("waits"), "diff", d.get("worst_score_diff_vs_first_run"), d.get("notices") or "",
              d.get("error", "")[-160:], d.get("skipped", ""))
    elif d.get("bench") == "tag_cli_summary":
        print("summary", d["shape"], json.dumps({k: {q: v[q] for q in ("img_per_s", "vs_eager", "break_even_images")
                                                     if q in v} for k, v in d["cases"].items()}))
PY
grep -l -i "recompil" "$OUT"/logs/*.txt 2>/dev/null | sed 's/^/recompile logged: /'
grep -v -E '^\{' "$OUT/bench_log.txt" | tail -6
