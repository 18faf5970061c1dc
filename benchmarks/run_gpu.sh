#!/usr/bin/env bash
# The one script a GPU session runs: build the extension with nvcc, run the
# whole test suite natively, run the kernel and model benchmarks at full size.
#
#   bash benchmarks/run_gpu.sh STEP [STEP ...]
#
# Steps (each sized for one 10-minute command; pass several to chain them):
#   env            versions, GPU, what the package sees
#   build          pip install --no-build-isolation --no-deps --no-index -e .  (CUDA kernels for
#                  $OLMO2_KERNELS_CUDA_ARCHS, default 90a), and liger-kernel from .whl/ when present
#   test           python -m pytest -q (the whole suite, on the GPU; pytest-xdist with
#                  $OLMO2_TEST_WORKERS workers, default 8, when installed; $OLMO2_PYTEST_ARGS appended)
#   kernels-norms  olmo2-bench kernels: rms_norm, qk_norm_rope, swiglu
#   kernels-ce     olmo2-bench kernels: cross_entropy
#   kernels-lce    olmo2-bench kernels: linear_cross_entropy
#   kernels        the three above
#   model          olmo2-bench model: kernels, eager, transformers (1B, 4 x 4096)
#   model-compile  olmo2-bench model: compile, kernels+compile
#   pytest-bench   pytest benchmarks/ --benchmark-only (host-clock timings; the CLI's are the reference)
#   all            everything above, in order (longer than one command: for a session without limits)
#
# Every step builds first if the extension is not importable (a fresh machine
# keeps nothing). Results go to benchmarks/results/<device>/ (JSON, logs, PNGs)
# and, when $OUT is set, to $OUT/<device>/: this run's logs and JSON, plus
# results.tar.gz holding the whole results folder (the device tool returns at
# most 8 files). The benchmarked commit: $OLMO2_BENCH_GIT_COMMIT, else git.
# $OLMO2_BENCH_ARGS is appended to every olmo2-bench call (e.g. "--quick
# --threads 1" for a smoke run of this script on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
PY=${PYTHON:-python3}
STATUS=0

if [ $# -eq 0 ]; then
  sed -n '2,25p' "$0"
  exit 2
fi

run() { echo "+ $*"; "$@"; }

device_slug() {
  "$PY" - <<'PYEOF' 2>/dev/null || echo unknown-device
import torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print("".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-"))
PYEOF
}

SLUG=$(device_slug)
RESULTS=benchmarks/results/$SLUG
mkdir -p "$RESULTS"
LOGS=()
JSONS=()

# Log a step to RESULTS/<name>.log and remember it for $OUT.
logged() {
  local name=$1; shift
  local log=$RESULTS/$name.log
  LOGS+=("$log")
  { echo "+ $*"; "$@"; } 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  echo "[run_gpu] $name exit $rc" | tee -a "$log"
  [ "$rc" -eq 0 ] || STATUS=$rc
  sync_out
  return "$rc"
}

# Copy what this run produced into $OUT (within the tool's 8-file limit).
sync_out() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT/$SLUG"
  tar -czf "$OUT/$SLUG/results.tar.gz" -C benchmarks/results "$SLUG"
  # The newest 4 logs and 3 JSON files (with the tarball: 8 files).
  local f i
  for ((i = ${#LOGS[@]} > 4 ? ${#LOGS[@]} - 4 : 0; i < ${#LOGS[@]}; i++)); do
    f=${LOGS[$i]}; [ -f "$f" ] && cp "$f" "$OUT/$SLUG/"
  done
  for ((i = ${#JSONS[@]} > 3 ? ${#JSONS[@]} - 3 : 0; i < ${#JSONS[@]}; i++)); do
    f=${JSONS[$i]}; [ -f "$f" ] && cp "$f" "$OUT/$SLUG/"
  done
  return 0
}

ensure_built() {
  if "$PY" -c "import olmo2_kernels, olmo2_kernels._C" 2>/dev/null; then
    return 0
  fi
  step_build
}

step_env() {
  logged env bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")'; nvcc --version | tail -2; $PY -m pip list 2>/dev/null | grep -i -E '^(torch|triton|transformers|liger|matplotlib|pytest|scikit-build|pybind11) '"
}

step_build() {
  export OLMO2_KERNELS_CUDA=${OLMO2_KERNELS_CUDA:-ON}
  export OLMO2_KERNELS_CUDA_ARCHS=${OLMO2_KERNELS_CUDA_ARCHS:-90a}
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
  logged build bash -c "
    set -e
    echo OLMO2_KERNELS_CUDA=\$OLMO2_KERNELS_CUDA OLMO2_KERNELS_CUDA_ARCHS=\$OLMO2_KERNELS_CUDA_ARCHS
    $PY -m pip install --no-build-isolation --no-deps --no-index -e .
    if ls .whl/*.whl >/dev/null 2>&1; then
      $PY -m pip install --no-deps --no-index .whl/*.whl
    else
      echo 'no .whl/ folder: liger-kernel baselines will be skipped unless it is installed'
    fi
    $PY -c 'import json, olmo2_kernels; print(json.dumps(olmo2_kernels.backend_info(), indent=1, default=str))'
  "
}

step_test() {
  ensure_built || return
  local xdist=()
  if "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n "${OLMO2_TEST_WORKERS:-8}"); fi
  # shellcheck disable=SC2086
  logged test timeout "${OLMO2_TEST_TIMEOUT:-560}" "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" \
    -rfE --durations=15 --junitxml "$RESULTS/test_junit.xml" ${OLMO2_PYTEST_ARGS:-}
}

bench_kernels() {
  local name=$1; shift
  ensure_built || return
  JSONS+=("$RESULTS/$name.json")
  # shellcheck disable=SC2086
  logged "$name" "$PY" -m olmo2_kernels.bench kernels --out "$RESULTS" --name "$name" "$@" ${OLMO2_BENCH_ARGS:-}
}

step_model() {
  local name=$1; shift
  ensure_built || return
  JSONS+=("$RESULTS/$name.json")
  # shellcheck disable=SC2086
  logged "$name" "$PY" -m olmo2_kernels.bench model --out "$RESULTS" --name "$name" "$@" ${OLMO2_BENCH_ARGS:-}
}

for step in "$@"; do
  case "$step" in
    env) step_env ;;
    build) step_build ;;
    test) step_test ;;
    kernels-norms) bench_kernels kernels_norms --ops rms_norm,qk_norm_rope,swiglu ;;
    kernels-ce) bench_kernels kernels_ce --ops cross_entropy ;;
    kernels-lce) bench_kernels kernels_lce --ops linear_cross_entropy ;;
    kernels)
      bench_kernels kernels_norms --ops rms_norm,qk_norm_rope,swiglu
      bench_kernels kernels_ce --ops cross_entropy
      bench_kernels kernels_lce --ops linear_cross_entropy ;;
    model) step_model model --impls kernels,eager,transformers ;;
    model-compile) step_model model_compile --impls compile,kernels+compile ;;
    pytest-bench)
      ensure_built || continue
      JSONS+=("$RESULTS/pytest_benchmark.json")
      logged pytest_bench timeout "${OLMO2_TEST_TIMEOUT:-560}" "$PY" -m pytest benchmarks/ --benchmark-only -q \
        -p no:cacheprovider --benchmark-json "$RESULTS/pytest_benchmark.json" ;;
    all)
      step_env; step_build; step_test
      bench_kernels kernels_norms --ops rms_norm,qk_norm_rope,swiglu
      bench_kernels kernels_ce --ops cross_entropy
      bench_kernels kernels_lce --ops linear_cross_entropy
      step_model model --impls kernels,eager,transformers
      step_model model_compile --impls compile,kernels+compile ;;
    *) echo "run_gpu.sh: unknown step '$step' (see the header of $0)" >&2; exit 2 ;;
  esac
done
sync_out
echo "[run_gpu] results in $RESULTS${OUT:+ and $OUT/$SLUG} (exit $STATUS)"
exit "$STATUS"
