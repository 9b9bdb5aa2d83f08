#!/usr/bin/env bash
# One GPU-machine call for issue 15: the tagging GPU tests, then `curate tag` end to end (bench/tag_cli_speed.py).
# Run from a copy of the repo with the wheels the machine lacks in ../.whl; results land in $OUT.
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site --find-links ../.whl \
  diffusers open_clip_torch ImageHash ftfy PyWavelets wcwidth importlib_metadata zipp faiss-cpu rich typer tomli_w \
  lycoris-lora pydantic pydantic-core annotated-types typing-inspection einops toml || echo "wheel install failed"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, torchvision, timm, onnxruntime as o, os
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0), "torchvision",
      torchvision.__version__, "timm", timm.__version__, "onnxruntime", o.__version__, o.get_available_providers(),
      "cores", os.cpu_count())
PY
{
  echo "## python -m pytest -m gpu tests/test_tag_gpu.py tests/test_tag_gpu_decode.py tests/test_blip.py tests/test_tag_backends.py"
  timeout 110 python3 -m pytest -q -rs -s -p no:cacheprovider -m gpu tests/test_tag_gpu.py tests/test_tag_gpu_decode.py \
    tests/test_blip.py tests/test_tag_backends.py 2>&1 | grep -v -E "^$|Loading weights|Writing model shards|TracerWarning|return self.detach|if not condition"
  echo "## python -m pytest tests/test_tag_decode.py (CPU tests, on the GPU machine)"
  timeout 60 python3 -m pytest -q -rs -p no:cacheprovider tests/test_tag_decode.py 2>&1 | tail -4
} > "$OUT/tag_gpu_tests.txt"
tail -8 "$OUT/tag_gpu_tests.txt"
timeout "${BENCH_TIMEOUT:-320}" python3 bench/tag_cli_speed.py --images 2048 --compile ${BENCH_ARGS:-} \
  --out "$OUT/tag_gpu_h200_stop21.jsonl" > "$OUT/bench_log.txt" 2>&1
echo "bench rc $?"
grep -E '^\{' "$OUT/bench_log.txt" | cut -c1-330
grep -v -E '^\{' "$OUT/bench_log.txt" | tail -15
