#!/usr/bin/env bash
# All GPU measurements in one go (about 5 minutes on an H100). Needs python3 with torch (CUDA), transformers,
# safetensors and diffusers 0.42.1; wheels in .whl/ (diffusers, importlib_metadata) are installed when present.
# Writes gpu.json, gpu.md and gpu.log to $OUT (default bench-results/gpu). Usage: bench/gpu.sh [--tiny] [--no-compile]
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PYTHON:-python3}
$PY -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
PYTHONUNBUFFERED=1 $PY bench/gpu.py --out "$OUT" --budget-s "${BUDGET_S:-330}" "$@" 2>&1 \
  | grep --line-buffered -v "truncated because CLIP\|Token indices sequence length\|should be kept in float32" \
  | tee "$OUT/gpu.log"
