#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (~5 min on an H100): the `cuda` tests (GPU encodes equal the
# CPU's in fp32, fp16/bf16 close, the CLI on the GPU, per-device caches), then the official-size benchmark
# on the GPU in fp16, bf16 and fp32. Needs torch, transformers, safetensors, sentencepiece, pillow, numpy,
# einops and pytest (no ComfyUI, no diffusers).
# Usage: OUT=results-dir bash scripts/device_checks.sh   (logs and bench JSON go to $OUT)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/device-results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt" 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  >> "$OUT/device.txt" 2>&1 || { cat "$OUT/device.txt"; echo "error: this PyTorch sees no CUDA GPU; run on a GPU machine"; exit 1; }
cat "$OUT/device.txt"
"$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tee "$OUT/cuda-tests.log" || status=1
"$PY" -m kosmosg_core bench --size official --device cuda --dtypes float16,bfloat16,float32 --repeats 10 \
  --json "$OUT/bench-official-cuda.json" 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
