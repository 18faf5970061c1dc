#!/usr/bin/env bash
# Registers, spills and memory of every CUDA kernel instance in csrc/cuda/*.cu,
# as ptxas reports them (-Xptxas -v), for Hopper and Ampere: the compile check of
# scripts/check_cuda_compile.sh (warnings as errors) with ptxas logs kept, then a
# table per kernel and architecture. Exits non-zero when a file does not compile
# or any kernel has a stack frame or spills (local memory in a kernel that should
# live in registers). Compile only: no GPU needed.
#
#   scripts/cuda_resources.sh                         # sm_90a and sm_80
#   CHECK_CUDA_ARCHS=90a scripts/cuda_resources.sh    # one architecture
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT

CHECK_CUDA_ARCHS="${CHECK_CUDA_ARCHS:-90a 80}" CHECK_CUDA_PTXAS_LOG_DIR="$logs" \
  bash "$root/scripts/check_cuda_compile.sh"

# Demangled names: c++filt (binutils) where present, else the mangled ones.
demangle=(cat)
if command -v c++filt >/dev/null 2>&1; then
  demangle=(c++filt)
fi

python3 - "$logs" "${demangle[@]}" <<'PY'
"""Parse ptxas -v logs into one row per (file, kernel, architecture)."""
import re
import subprocess
import sys
from pathlib import Path

log_dir, demangler = Path(sys.argv[1]), sys.argv[2:]
ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")
CMEM = re.compile(r"(\d+) bytes cmem\[0\]")

rows = []
for log in sorted(log_dir.glob("*.log")):
    current = None
    for line in log.read_text().splitlines():
        if m := ENTRY.search(line):
            current = {"file": log.stem + ".cu", "mangled": m.group(1), "sm": m.group(2),
                       "regs": None, "stack": 0, "st": 0, "ld": 0, "smem": 0, "cmem": None}
            rows.append(current)
        elif current is None:
            continue
        elif m := FRAME.search(line):
            current["stack"], current["st"], current["ld"] = map(int, m.groups())
        elif m := USED.search(line):
            current["regs"] = int(m.group(1))
            if s := SMEM.search(line):
                current["smem"] = int(s.group(1))
            if c := CMEM.search(line):
                current["cmem"] = int(c.group(1))
            current = None  # the entry's last line

if not rows:
    sys.exit("cuda_resources: no kernels in the ptxas logs (did -Xptxas -v reach ptxas?)")
names = subprocess.run(demangler, input="\n".join(r["mangled"] for r in rows), capture_output=True,
                       text=True, check=True).stdout.splitlines()


def short(name: str) -> str:
    """'void ns::(anonymous namespace)::k<T, 8>(Params)' -> 'k<T, 8>'."""
    name = name.removeprefix("void ")
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"\b(?:olmo2::cuda::|olmo2::)", "", name)
    depth = 0
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return name[:i]
    return name


for row, name in zip(rows, names):
    row["kernel"] = short(name)
rows.sort(key=lambda r: (r["file"], r["kernel"], r["sm"]))

header = ["file", "kernel", "sm", "regs", "stack", "spill st", "spill ld", "smem", "cmem", ""]
body = []
failed = []
for r in rows:
    bad = r["regs"] is None or r["stack"] or r["st"] or r["ld"]
    if bad:
        failed.append(r)
    body.append([r["file"], r["kernel"], r["sm"], str(r["regs"]), str(r["stack"]), str(r["st"]), str(r["ld"]),
                 str(r["smem"]), "-" if r["cmem"] is None else str(r["cmem"]), "FAIL" if bad else ""])
widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
for n, line in enumerate([header, *body]):
    print("  ".join(c.rjust(w) if 3 <= i <= 8 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip())
    if n == 0:
        print("  ".join("-" * w for w in widths).rstrip())
print("\nstack, spill st/ld, smem (static shared), cmem (constant bank 0) in bytes; "
      "cmem '-': not reported by this ptxas for this architecture")
print(f"cuda_resources: {len(rows)} kernel instances in {len({r['file'] for r in rows})} files")
if failed:
    print(f"cuda_resources: FAILED: {len(failed)} kernel instance(s) with a stack frame or spills "
          "(or no register count)", file=sys.stderr)
    sys.exit(1)
print("cuda_resources: no stack frames, no spills")
PY
