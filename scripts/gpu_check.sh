#!/usr/bin/env bash
# CUDA checks on a machine with a GPU: train, resume across devices, eval, fp32-vs-bf16, the demo.
#
#   bash scripts/gpu_check.sh [OUTPUT_DIR]
#
# Uses $PYTHON (default: .venv/bin/python if present, else python3) with this checkout on the path,
# so an image that already has CUDA torch + transformers needs no install; peftkit's other
# dependencies must be importable (pydantic, rich, PyYAML, safetensors, matplotlib, jsonschema).
# The demo runs on SmolLM2 when it is in the model cache, else on a tiny random model.
# A few minutes in all. Prints one PASS/FAIL line per check; exits 1 if any fails, 2 without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
out="${1:-${OUT:-$(mktemp -d)}}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
exec "$PYTHON" scripts/gpu_check.py --out "$out" "${@:2}"
