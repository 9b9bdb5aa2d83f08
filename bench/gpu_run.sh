#!/usr/bin/env bash
# One device call: install diffusers from carried wheels, run the peer and our benchmark (same shapes) and the
# gpu-marked tests. Run from a copy of the repo holding .whl/ (see /work/shared/gpu/README.md); results go to $OUT.
set -u
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, peft; print(torch.__version__, diffusers.__version__, peft.__version__)" | tee -a "$OUT/gpu.txt"
MODE=${1:-all}
if [[ $MODE == all || $MODE == bench ]]; then
  python3 - <<'PY' 2>&1 | grep '^{' | tee -a "$OUT/peer.jsonl"
import json, sys, torch
sys.path.insert(0, "bench/peer")
import lora_step_peer as P
torch.backends.cuda.matmul.allow_tf32 = True
print(json.dumps(dict(impl="peer", gpu=torch.cuda.get_device_name(), torch=torch.__version__)), flush=True)
for b in (1, 8, 16):
    P.run("sd15-512", P.SD15, b)
for b in (1, 4):
    P.run("sdxl-1024", P.SDXL, b)
PY
  python3 bench/train_step.py --out "$OUT/ours.jsonl" 2>&1 | grep '^{'
  [[ ${CL:-1} == 1 ]] && python3 bench/train_step.py --channels-last --out "$OUT/ours_cl.jsonl" 2>&1 | grep '^{'
fi
if [[ $MODE == all || $MODE == tests ]]; then
  # tee, never tail: a command killed at the time limit takes its whole pipeline with it
  timeout 400 python3 -m pytest tests/test_trainer_gpu.py -m gpu -v -W ignore -p no:cacheprovider --durations=10 2>&1 | tee "$OUT/gpu_tests.txt"
fi
