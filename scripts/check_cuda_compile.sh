#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu for Hopper (sm_90a) with this machine's nvcc,
# compile only, warnings as errors, so that a CUDA syntax or template error
# fails CI even where no GPU (and no CUDA build of torch) is present. Runs the
# files in parallel (CHECK_CUDA_JOBS, default 2) and exits non-zero on any failure.
#
#   scripts/check_cuda_compile.sh            # sm_90a
#   CHECK_CUDA_ARCHS="80 90a" scripts/check_cuda_compile.sh
#
# CHECK_CUDA_PTXAS_LOG_DIR=dir adds -Xptxas -v and keeps each file's log there as
# <name>.log (scripts/cuda_resources.sh reads registers and spills from them).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc_bin="${NVCC:-}"
if [[ -z "$nvcc_bin" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    nvcc_bin="$(command -v nvcc)"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    nvcc_bin=/usr/local/cuda/bin/nvcc
  else
    echo "check_cuda_compile: nvcc not found (PATH, /usr/local/cuda/bin; or set NVCC)" >&2
    exit 2
  fi
fi

archs="${CHECK_CUDA_ARCHS:-90a}"
jobs="${CHECK_CUDA_JOBS:-2}"
shopt -s nullglob
sources=("$root"/csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_cuda_compile: no .cu files under $root/csrc/cuda" >&2
  exit 2
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

ptxas_log_dir="${CHECK_CUDA_PTXAS_LOG_DIR:-}"
ptxas_flags=()
if [[ -n "$ptxas_log_dir" ]]; then
  mkdir -p "$ptxas_log_dir"
  ptxas_flags=(-Xptxas -v)
fi

gencode=()
for arch in $archs; do
  gencode+=("-gencode=arch=compute_${arch},code=sm_${arch}")
done

echo "check_cuda_compile: $("$nvcc_bin" --version | tail -n 1) for ${archs}: ${#sources[@]} file(s)"

compile() {
  local src="$1" name
  name="$(basename "$src" .cu)"
  if "$nvcc_bin" -std=c++17 -O3 "${gencode[@]}" -I"$root/csrc" ${ptxas_flags[@]+"${ptxas_flags[@]}"} \
      -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
      -c "$src" -o "$out/$name.o" >"$out/$name.log" 2>&1; then
    echo "  ok     ${src#"$root"/}"
    if [[ -n "$ptxas_log_dir" ]]; then
      cp "$out/$name.log" "$ptxas_log_dir/$name.log"
    fi
  else
    echo "  FAILED ${src#"$root"/}"
    sed 's/^/    /' "$out/$name.log"
    return 1
  fi
}

failed=0
pids=()
for src in "${sources[@]}"; do
  compile "$src" &
  pids+=($!)
  if [[ ${#pids[@]} -ge $jobs ]]; then
    wait "${pids[0]}" || failed=1
    pids=("${pids[@]:1}")
  fi
done
for pid in "${pids[@]}"; do
  wait "$pid" || failed=1
done

if [[ $failed -ne 0 ]]; then
  echo "check_cuda_compile: FAILED" >&2
  exit 1
fi
echo "check_cuda_compile: all CUDA sources compile"
