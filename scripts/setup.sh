#!/usr/bin/env bash
# Set up a development environment in .venv: torch (the CPU build from the
# local wheel when no torch is importable yet), then this package in editable
# mode with its compiled extension and the test dependencies.
#
#   bash scripts/setup.sh            # create/refresh .venv
#   PYTHON=python3.12 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" 2>/dev/null; then
  # Pinned so pip takes the CPU build from local disk instead of a multi-GB CUDA build.
  pip install -q torch==2.13.0
fi
if ! python -c "import triton" 2>/dev/null; then
  # The Triton that the GPU machines run (torch 2.11's): without a GPU the tests
  # run these kernels under its interpreter, so they check the same Triton.
  pip install -q triton==3.6.0
fi
pip install -q -e ".[test]"
python - <<'PY'
import olmo2_kernels
info = olmo2_kernels.backend_info()
ext = info["extension"]
print("olmo2_kernels installed; extension:", "loaded" if ext["loaded"] else ext["error"])
print("auto backend per device:", info["auto"])
PY
