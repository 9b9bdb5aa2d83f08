#!/usr/bin/env bash
# One GPU-machine call for the WD v3 torch backend: env, GPU + tagger tests, bench/tagger_speed.py --v3.
# Prepare here: wheels for what the machine lacks (typer + pydantic, rich, ImageHash, PyWavelets, ...) in .whl/.
# Results land in $OUT (the device tool's output folder) or bench/results/gpu.
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    || echo "wheel install failed"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, timm, onnxruntime as o, os
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0), "timm", timm.__version__,
      "onnxruntime", o.__version__, o.get_available_providers(), "cores", os.cpu_count())
PY
timeout 75 python3 -m pytest -q -rs -s -p no:cacheprovider -p no:warnings tests/test_tag_gpu.py \
  tests/test_tag_gpu_decode.py tests/test_tag_backends.py 2>&1 | grep -v "^$" > "$OUT/tag_gpu_tests.txt"
tail -12 "$OUT/tag_gpu_tests.txt"
BENCH_ARGS=${BENCH_ARGS:---v3 vit swinv2 --images 3000 --baseline-images 16 --v3-batches 128 --v3-repeats 2 --v3-dtypes auto --v3-e2e auto:auto}
# shellcheck disable=SC2086
timeout 160 python3 bench/tagger_speed.py $BENCH_ARGS --skip-tagger --blip none --out "$OUT/tag_gpu_h200.jsonl" 2>&1 \
  | grep -E '^\{|Error|error' | tail -30
