#!/usr/bin/env bash
# One GPU-machine run for tagging/captioning: tests (gpu ones included) and bench/tagger_speed.py.
# Prepare here first, from the project root:  ../shared/gpu/fetch-wheels typer rich shellingham click
# and carry .whl. Results land in $OUT (the device tool's output folder) or bench/results.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  # package=module pairs; install only what the machine's python3 lacks
  for pair in ImageHash=imagehash PyWavelets=pywt open_clip_torch=open_clip ftfy=ftfy wcwidth=wcwidth \
              typer=typer rich=rich shellingham=shellingham click=click; do
    pkg=${pair%%=*}; mod=${pair##*=}
    PYTHONPATH=$PWD/.site python3 -c "import $mod" 2>/dev/null || python3 -m pip install -q --no-index --no-deps \
      --no-compile --no-cache-dir --target .site --find-links .whl "$pkg" || echo "could not install $pkg"
  done
  export PYTHONPATH=$PWD/.site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'ort', o.__version__, o.get_available_providers())" | tee "$OUT/tag_env.txt"
timeout 170 python3 -m pytest tests/test_tag.py tests/test_captions.py tests/test_blip.py tests/test_tag_gpu.py -q -rs -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/tag_tests.txt"
BENCH_ARGS=${BENCH_ARGS:---arch convnext_base --images 128 --batch 32 --blip large --blip-images 64 --blip-batch 16 32 --beams 3 --tokens 30}
# shellcheck disable=SC2086
timeout 400 python3 bench/tagger_speed.py $BENCH_ARGS --out "$OUT/tagger_speed_gpu.jsonl" 2>&1 | grep -E '^\{|Error' | tail -20
