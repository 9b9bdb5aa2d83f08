#!/usr/bin/env bash
# One GPU-machine call for the curation benchmarks: CLIP embedding speed + gpu tests, tagger/BLIP speed + tests.
# Prepare here: ../shared/gpu/fetch-wheels typer rich shellingham click markdown-it-py mdurl pygments tomli-w
# then run on the device with carry [".whl"]. Results are appended to $OUT as they are measured.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site --find-links .whl \
  open_clip_torch ImageHash ftfy PyWavelets wcwidth faiss-cpu typer rich shellingham click markdown-it-py mdurl \
  pygments tomli-w annotated-doc 2>&1 | tail -3
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'ort', o.__version__, o.get_available_providers())" | tee "$OUT/env.txt"
echo "== clip gpu tests"
timeout 120 python3 -m pytest tests/test_clip_gpu.py -q -m gpu -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/clip_tests.txt"
echo "== clip speed"
timeout 240 python3 bench/clip_speed.py --n ${CLIP_N:-10000} --workers 16 --batch-size 512 --dir /tmp/clipspeed \
  --out "$OUT/clip_speed.jsonl" 2>&1 | grep -E '^\{|Error|error' | tail -12
echo "== tag tests"
timeout 100 python3 -m pytest tests/test_tag.py tests/test_captions.py tests/test_blip.py tests/test_tag_gpu.py -q -rs \
  -p no:cacheprovider 2>&1 | tail -8 | tee "$OUT/tag_tests.txt"
echo "== tagger speed"
timeout 200 python3 bench/tagger_speed.py --arch convnext_base --images 64 --batch 32 --blip large --blip-images 32 \
  --blip-batch 16 --beams 3 --tokens 30 --out "$OUT/tagger_speed_gpu.jsonl" 2>&1 | grep -E '^\{|Error' | tail -12
