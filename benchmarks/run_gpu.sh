#!/usr/bin/env bash
# The one script a GPU session runs: build the extension with nvcc, run the
# whole test suite natively, run the kernel and model benchmarks at full size.
#
#   bash benchmarks/run_gpu.sh STEP [STEP ...]
#   bash benchmarks/run_gpu.sh quick [--dry-run]
#
# Steps (each sized for one 10-minute command; pass several to chain them):
#   quick          the whole first contact in one command: parts within $OLMO2_QUICK_BUDGET seconds
#                  (default 430) and a summary (at most 30 s more): env; the build in the background
#                  while the Triton verdict runs; the CUDA-extension verdict; kernel timings; the 1B
#                  model step; the 1B DPO step and RL sampling tokens/s; torch.compile baselines
#                  last. Each part has its own time limit; a
#                  failure is recorded and the rest still runs; quick_summary.txt says what passed.
#                  --dry-run: the same parts on a CPU machine with tiny shapes (Triton interpreted,
#                  the cpu backend for the extension), results under build/run_gpu_dry_run/; no build.
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
#   dpo            olmo2-bench dpo: a DPO step, fused log-probs vs materialized logits (1B, 4 pairs x 2048)
#   pytest-bench   pytest benchmarks/ --benchmark-only (host-clock timings; the CLI's are the reference)
#   all            everything above but quick, in order (longer than one command: for a session without limits)
#
# Every step but quick builds first if the extension is not importable (a fresh
# machine keeps nothing). Results go to benchmarks/results/<device>/ (JSON, logs, PNGs)
# and, when $OUT is set, to $OUT/<device>/: results.tar.gz holding the whole
# results folder and at most 7 key files (the device tool returns at most 8).
# The benchmarked commit: $OLMO2_BENCH_GIT_COMMIT, else git. $OLMO2_BENCH_ARGS is
# appended to every olmo2-bench call of the steps but quick. Python: $PYTHON, else python3.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
PY=${PYTHON:-python3}
STATUS=0
STEP_NAMES=" quick env build test kernels-norms kernels-ce kernels-lce kernels model model-compile dpo pytest-bench all "

usage() { sed -n '2,36p' "$0"; }

DRY_RUN=0
STEPS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *)
      if [[ "$STEP_NAMES" != *" $arg "* ]]; then
        echo "run_gpu.sh: unknown step '$arg' (see the header of $0)" >&2
        exit 2
      fi
      STEPS+=("$arg") ;;
  esac
done
if [ ${#STEPS[@]} -eq 0 ]; then
  usage
  exit 2
fi
if [ "$DRY_RUN" = 1 ] && [ "${STEPS[*]}" != quick ]; then
  echo "run_gpu.sh: --dry-run goes with the quick step alone: bash $0 quick --dry-run" >&2
  exit 2
fi
run() { echo "+ $*"; "$@"; }

device_slug() {
  "$PY" - <<'PYEOF' 2>/dev/null
import torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print("".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-"))
PYEOF
}

if ! SLUG=$(device_slug); then
  echo "run_gpu.sh: $PY cannot import torch (set PYTHON to the interpreter that has it)" >&2
  exit 2
fi
if [ "$DRY_RUN" = 1 ]; then
  # never next to the committed results (benchmarks/results/cpu holds real CPU numbers)
  RESULTS_ROOT=build/run_gpu_dry_run
  rm -rf "${RESULTS_ROOT:?}/$SLUG"
else
  RESULTS_ROOT=benchmarks/results
fi
RESULTS=$RESULTS_ROOT/$SLUG
mkdir -p "$RESULTS"
LOGS=()
JSONS=()
KEEP_FILES=()  # when set (quick), exactly these files go to $OUT beside the tarball

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

# Copy what this run produced into $OUT/<device>/: the tarball of the results
# folder and at most 7 more files (the device tool returns at most 8 files);
# copies of earlier calls that are no longer among them are removed.
sync_out() {
  [ -n "${OUT:-}" ] || return 0
  local dest=$OUT/$SLUG f i keep=()
  mkdir -p "$dest"
  tar -czf "$dest/results.tar.gz.part" -C "$RESULTS_ROOT" "$SLUG" 2>/dev/null
  mv -f "$dest/results.tar.gz.part" "$dest/results.tar.gz"
  if [ ${#KEEP_FILES[@]} -gt 0 ]; then
    for f in "${KEEP_FILES[@]}"; do [ -f "$f" ] && keep+=("$f"); done
  else
    # the newest 4 logs and 3 JSON files
    for ((i = ${#LOGS[@]} > 4 ? ${#LOGS[@]} - 4 : 0; i < ${#LOGS[@]}; i++)); do
      f=${LOGS[$i]}; [ -f "$f" ] && keep+=("$f")
    done
    for ((i = ${#JSONS[@]} > 3 ? ${#JSONS[@]} - 3 : 0; i < ${#JSONS[@]}; i++)); do
      f=${JSONS[$i]}; [ -f "$f" ] && keep+=("$f")
    done
  fi
  keep=("${keep[@]:0:7}")
  for f in "$dest"/*; do
    [ -f "$f" ] || continue
    case " ${keep[*]+${keep[*]}} " in
      *"/$(basename "$f") "*) ;;
      *) [ "$(basename "$f")" = results.tar.gz ] || rm -f "$f" ;;
    esac
  done
  for f in ${keep[@]+"${keep[@]}"}; do cp "$f" "$dest/"; done
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

# The build as one bash script (run by step_build, and in the background by quick).
build_script() {
  cat <<EOF
set -e
echo OLMO2_KERNELS_CUDA=\$OLMO2_KERNELS_CUDA OLMO2_KERNELS_CUDA_ARCHS=\$OLMO2_KERNELS_CUDA_ARCHS CMAKE_BUILD_PARALLEL_LEVEL=\$CMAKE_BUILD_PARALLEL_LEVEL
$PY -m pip install --no-build-isolation --no-deps --no-index -e .
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install --no-deps --no-index .whl/*.whl
else
  echo 'no .whl/ folder: liger-kernel baselines will be skipped unless it is installed'
fi
$PY -c 'import json, olmo2_kernels; print(json.dumps(olmo2_kernels.backend_info(), indent=1, default=str))'
EOF
}

# What the dry run does instead of building: check that the build's tools are there.
build_check_script() {
  cat <<EOF
echo "dry run: no build. On the GPU machine: OLMO2_KERNELS_CUDA=\$OLMO2_KERNELS_CUDA OLMO2_KERNELS_CUDA_ARCHS=\$OLMO2_KERNELS_CUDA_ARCHS CMAKE_BUILD_PARALLEL_LEVEL=\$CMAKE_BUILD_PARALLEL_LEVEL $PY -m pip install --no-build-isolation --no-deps --no-index -e ."
set -e
$PY -m pip --version
test -f pyproject.toml && test -f CMakeLists.txt
for tool in cmake nvcc; do command -v \$tool || echo "warning: \$tool not found here (the GPU machine needs it)"; done
$PY -c 'import scikit_build_core, pybind11' 2>/dev/null || echo 'warning: scikit-build-core / pybind11 not importable here (--no-build-isolation needs them on the GPU machine; its image has them)'
EOF
}

build_env() {
  export OLMO2_KERNELS_CUDA=${OLMO2_KERNELS_CUDA:-ON}
  export OLMO2_KERNELS_CUDA_ARCHS=${OLMO2_KERNELS_CUDA_ARCHS:-90a}
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$1}
}

step_build() {
  build_env 16
  logged build bash -c "$(build_script)"
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
  logged "$name" "$PY" -m benchmarks kernels --out "$RESULTS" --name "$name" "$@" ${OLMO2_BENCH_ARGS:-}
}

step_model() {
  local name=$1; shift
  ensure_built || return
  JSONS+=("$RESULTS/$name.json")
  # shellcheck disable=SC2086
  logged "$name" "$PY" -m benchmarks model --out "$RESULTS" --name "$name" "$@" ${OLMO2_BENCH_ARGS:-}
}

step_dpo() {
  ensure_built || return
  JSONS+=("$RESULTS/dpo.json")
  # shellcheck disable=SC2086
  logged dpo "$PY" -m benchmarks dpo --out "$RESULTS" --name dpo ${OLMO2_BENCH_ARGS:-}
}

# --------------------------------------------------------------------------- quick
# Sub-steps record (name, exit, seconds, note) for the summary.
Q_NAMES=(); Q_RCS=(); Q_SECS=(); Q_NOTES=()
q_record() { Q_NAMES+=("$1"); Q_RCS+=("$2"); Q_SECS+=("$3"); Q_NOTES+=("$4"); }

# A sub-step's time limit: its own, cut to what the budget leaves once
# `reserve` seconds are kept for the more valuable sub-steps after it.
q_limit() {
  local limit=$1 reserve=$2
  [ "$DRY_RUN" = 1 ] && reserve=0
  local left=$((QUICK_DEADLINE - SECONDS - reserve))
  [ "$left" -lt "$limit" ] && limit=$left
  echo "$limit"
}

# q_exec NAME LIMIT CMD...: run under `timeout`, logged; skipped when under 15 s are left.
q_exec() {
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 15 ]; then
    echo "[run_gpu] $name: not run, no time left in the ${QUICK_BUDGET}s budget"
    q_record "$name" skip 0 "not run: no time left in the ${QUICK_BUDGET}s budget"
    return 0
  fi
  local t0=$SECONDS rc note=""
  logged "$name" timeout -k 10 "$limit" "$@"
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note="stopped at its ${limit}s limit"; fi
  q_record "$name" "$rc" $((SECONDS - t0)) "$note"
  return "$rc"
}

q_env() {
  local c missing=0
  for c in timeout tar git "$PY"; do
    command -v "$c" >/dev/null || { echo "missing command: $c"; [ "$c" = git ] || missing=1; }
  done
  for c in nvidia-smi nvcc; do
    if ! command -v "$c" >/dev/null; then
      if [ "$DRY_RUN" = 1 ]; then echo "$c: not found (expected without a GPU; the GPU machine has it)"
      else echo "missing command: $c"; missing=1; fi
    fi
  done
  if command -v nvidia-smi >/dev/null; then timeout 30 nvidia-smi; fi
  timeout 60 "$PY" benchmarks/gpu_env.py --json "$RESULTS/env.json" || missing=1
  return "$missing"
}

q_build_start() {
  local limit; limit=$(q_limit 240 0)
  BUILD_LOG=$RESULTS/build.log
  LOGS+=("$BUILD_LOG")
  BUILD_T0=$(date +%s)
  local script
  if [ "$DRY_RUN" = 1 ]; then script=$(build_check_script); else script=$(build_script); fi
  echo "[run_gpu] build: started in the background (limit ${limit}s), log $BUILD_LOG"
  (
    { echo "+ build (limit ${limit}s, CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL)"
      timeout -k 10 "$limit" bash -c "$script"; } >"$BUILD_LOG" 2>&1
    echo "$? $(date +%s)" >"$RESULTS/build.rc"
  ) &
  BUILD_PID=$!
  BUILD_LIMIT=$limit
}

q_build_wait() {
  wait "$BUILD_PID"
  local rc end note=""
  read -r rc end <"$RESULTS/build.rc" 2>/dev/null || { rc=1; end=$(date +%s); }
  rm -f "$RESULTS/build.rc"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note="stopped at its ${BUILD_LIMIT}s limit"; fi
  note="${note:+$note; }ran beside verdict_triton"
  echo "[run_gpu] build exit $rc after $((end - BUILD_T0)) s; the end of $BUILD_LOG:"
  tail -n 15 "$BUILD_LOG" | sed 's/^/    /'
  echo "[run_gpu] build exit $rc" >>"$BUILD_LOG"
  [ "$rc" -eq 0 ] || STATUS=$rc
  q_record build "$rc" $((end - BUILD_T0)) "$note"
  sync_out
}

# The summary: timing tables first, then the verdicts and the table of
# sub-steps, so the end of the console output holds what matters most.
q_summary() {
  local out=$RESULTS/quick_summary.txt i failed=() files=() f
  for f in kernels_quick model_quick model_quick_flash_attn kernels_quick_compile; do
    [ -f "$RESULTS/$f.json" ] && files+=("$RESULTS/$f.json")
  done
  {
    if [ ${#files[@]} -gt 0 ]; then
      echo "== timings (olmo2-bench report; partial when a sub-step was stopped)"
      timeout 30 "$PY" -m benchmarks report "${files[@]}" --no-plots 2>&1 || echo "(report failed)"
    fi
    for f in verdict_triton verdict_ext; do
      [ -f "$RESULTS/$f.log" ] || continue
      echo "== $f: failures, then the summary ($RESULTS/$f.log has every line)"
      grep -E '^(FAIL|ERROR) ' "$RESULTS/$f.log" | head -40
      sed -n '/^== verdict/,/^VERDICT/p' "$RESULTS/$f.log" | tail -n +2
      grep -E '^(Traceback|\[verdict\] .*(unavailable|no CUDA))' "$RESULTS/$f.log" | head -5
    done
    echo
    echo "== run_gpu.sh quick$([ "$DRY_RUN" = 1 ] && echo ' --dry-run') on $SLUG | commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo '+dirty') | $(date -u +%Y-%m-%dT%H:%M:%SZ) | $((SECONDS - QUICK_T0)) s of the ${QUICK_BUDGET}s budget"
    printf '%-24s %-5s %7s  %s\n' step exit seconds note
    for ((i = 0; i < ${#Q_NAMES[@]}; i++)); do
      printf '%-24s %-5s %7s  %s\n' "${Q_NAMES[$i]}" "${Q_RCS[$i]}" "${Q_SECS[$i]}" "${Q_NOTES[$i]}"
      case "${Q_RCS[$i]}" in 0|skip) ;; *) failed+=("${Q_NAMES[$i]}") ;; esac
    done
    if [ ${#failed[@]} -gt 0 ]; then
      echo "QUICK: FAIL (${failed[*]}); logs in $RESULTS/"
    else
      echo "QUICK: PASS; results in $RESULTS/"
    fi
  } >"$out" 2>&1
  cat "$out"
}

step_quick() {
  QUICK_BUDGET=${OLMO2_QUICK_BUDGET:-430}
  # The dry run is CI's, on a CPU machine that may be slow or loaded: it took 111-182 s here (load 2-8). Short
  # of budget, a part cut below its need exits 124 and fails CI with nothing broken, and the parts left with
  # under 15 s are skipped, so CI passes without running their commands. Its budget leaves each part its
  # own limit (3x or more its time here), which still holds.
  [ "$DRY_RUN" = 1 ] && QUICK_BUDGET=${OLMO2_QUICK_BUDGET:-600}
  QUICK_T0=$SECONDS
  QUICK_DEADLINE=$((SECONDS + QUICK_BUDGET))
  # Seven, the most that sync_out copies beside the tarball; build.log, env.json and every
  # log are in results.tar.gz.
  KEEP_FILES=("$RESULTS/quick_summary.txt" "$RESULTS/verdict_triton.json" "$RESULTS/verdict_ext.json"
              "$RESULTS/kernels_quick.json" "$RESULTS/model_quick.json" "$RESULTS/dpo_quick.json"
              "$RESULTS/generate_quick.json")
  local verdict_args bench_extra=() kernels_extra=() tokens=16384 budget=0.1 jobs=5 ext=cuda lim flash=0
  if [ "$DRY_RUN" = 1 ]; then
    # CPU: tiny shapes; Triton under its interpreter; the extension's C++ kernels stand in for its CUDA
    # ones; two ops in the kernel timings (CI's olmo2-bench --quick runs them all)
    verdict_args=(--device cpu --size tiny)
    bench_extra=(--quick --device cpu --threads 1)
    kernels_extra=(--ops rms_norm,linear_cross_entropy)
    tokens=256 budget=0.01 jobs=2 ext=cpu
  else
    verdict_args=(--device cuda --size gpu)
  fi

  # 1. environment (seconds; each command in it has its own timeout)
  local t0=$SECONDS
  logged env q_env
  q_record env $? $((SECONDS - t0)) ""

  # 2. the build, in the background: nvcc keeps at most 8 cores while Triton compiles beside it
  build_env 8
  q_build_start

  # 3a. the Triton verdict (needs no build)
  lim=$(q_limit 180 200)
  q_exec verdict_triton "$lim" "$PY" benchmarks/gpu_verdict.py "${verdict_args[@]}" --backends triton \
    --jobs "$jobs" --deadline $((lim - 15)) --json "$RESULTS/verdict_triton.json"
  q_build_wait

  # 3b. the compiled extension's verdict (cuda on GPU; cpu in the dry run)
  lim=$(q_limit 120 150)
  # (one process in the dry run: the Triton verdict above already ran the parallel workers)
  [ "$DRY_RUN" = 1 ] && jobs=1
  q_exec verdict_ext "$lim" "$PY" benchmarks/gpu_verdict.py "${verdict_args[@]}" --backends "$ext" \
    --jobs "$jobs" --deadline $((lim - 15)) --json "$RESULTS/verdict_ext.json"

  # 4. kernel timings at 1B/7B widths, one token count: ours vs eager, Liger, unfused
  JSONS+=("$RESULTS/kernels_quick.json")
  lim=$(q_limit 150 75)
  q_exec kernels_quick "$lim" "$PY" -m benchmarks kernels --presets 1b,7b --tokens "$tokens" \
    --budget "$budget" --backends torch,triton,cuda,liger,unfused --no-plots --out "$RESULTS" --name kernels_quick \
    ${bench_extra[@]+"${bench_extra[@]}"} ${kernels_extra[@]+"${kernels_extra[@]}"}

  # 5. the 1B training step: kernels vs eager vs transformers, SDPA's flash kernel; flash-attn when importable
  JSONS+=("$RESULTS/model_quick.json")
  lim=$(q_limit 150 0)
  q_exec model_quick "$lim" "$PY" -m benchmarks model --impls kernels,eager,transformers \
    --attn-backend sdpa-flash --no-plots --out "$RESULTS" --name model_quick ${bench_extra[@]+"${bench_extra[@]}"}
  if "$PY" -c "import flash_attn" 2>/dev/null; then flash=1; fi
  if [ "$flash" = 1 ] || [ "$DRY_RUN" = 1 ]; then
    # (the dry run runs it without flash-attn too: every row is skipped with the reason)
    lim=$(q_limit 90 0)
    q_exec model_quick_flash_attn "$lim" "$PY" -m benchmarks model --impls kernels,transformers \
      --attn-backend flash_attn --no-plots --out "$RESULTS" --name model_quick_flash_attn \
      ${bench_extra[@]+"${bench_extra[@]}"}
  else
    q_record model_quick_flash_attn skip 0 "not run: flash_attn not importable"
  fi

  # 6. post-training: the 1B DPO step (fused log-probs vs materialized logits) and RL sampling tokens/s
  JSONS+=("$RESULTS/dpo_quick.json" "$RESULTS/generate_quick.json")
  lim=$(q_limit 75 0)
  q_exec dpo_quick "$lim" "$PY" -m benchmarks dpo --no-plots --out "$RESULTS" --name dpo_quick \
    ${bench_extra[@]+"${bench_extra[@]}"}
  lim=$(q_limit 60 0)
  local gen_batches=(--batch-sizes 1,32,128)
  [ "$DRY_RUN" = 1 ] && gen_batches=()
  q_exec generate_quick "$lim" "$PY" -m benchmarks generate ${gen_batches[@]+"${gen_batches[@]}"} --no-plots \
    --out "$RESULTS" --name generate_quick ${bench_extra[@]+"${bench_extra[@]}"}

  # 4b. torch.compile baselines last: they compile per shape and take the longest for the least news
  lim=$(q_limit 150 0)
  q_exec kernels_quick_compile "$lim" "$PY" -m benchmarks kernels --presets 1b,7b --tokens "$tokens" \
    --budget "$budget" --backends torch,compile --no-plots --out "$RESULTS" --name kernels_quick_compile \
    ${bench_extra[@]+"${bench_extra[@]}"} ${kernels_extra[@]+"${kernels_extra[@]}"}

  q_summary
  sync_out
}

for step in "${STEPS[@]}"; do
  case "$step" in
    quick) step_quick ;;
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
    dpo) step_dpo ;;
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
      step_model model_compile --impls compile,kernels+compile
      step_dpo ;;
  esac
done
sync_out
echo "[run_gpu] results in $RESULTS${OUT:+ and $OUT/$SLUG} (exit $STATUS)"
exit "$STATUS"
