#!/usr/bin/env python3
"""The environment of a benchmark or verdict run, in one screen: Python, torch
(and its CUDA and cuDNN), Triton, the GPU (name, compute capability, SMs,
memory, L2), the driver and nvcc, the optional packages the benchmarks use, and
what :func:`olmo2_kernels.backend_info` says about each backend.

    python benchmarks/gpu_env.py [--json env.json]

Works without a GPU (it says so); exits non-zero only when torch or
olmo2_kernels cannot be imported.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a file, this script has its own folder first on sys.path: the benchmarks
# package, whose kernels.py, model.py and report.py would shadow top-level modules
# of those names (transformers probes for a ``kernels`` package). Import from the
# repository root instead, which also finds olmo2_kernels when it is not installed.
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "benchmarks":
    sys.path[0] = str(ROOT)
OPTIONAL = ("triton", "transformers", "liger-kernel", "flash-attn", "pytest-xdist", "matplotlib",
            "scikit-build-core", "pybind11")


def _command(args: list[str]) -> str | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"failed: {exc}"
    return (out.stdout or out.stderr).strip()


def collect() -> dict:
    import torch

    env: dict = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "packages": {},
    }
    for name in OPTIONAL:
        try:
            env["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_GiB": round(props.total_memory / 2**30, 1),
            "l2_MiB": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        }
    else:
        env["gpu"] = None
    smi = _command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                    "--format=csv,noheader"])
    env["nvidia_smi"] = smi
    nvcc = _command(["nvcc", "--version"])
    env["nvcc"] = nvcc.splitlines()[-2].strip() if nvcc and len(nvcc.splitlines()) >= 2 else nvcc
    import olmo2_kernels

    env["backend_info"] = olmo2_kernels.backend_info()
    return env


def describe(env: dict) -> str:
    gpu = env["gpu"]
    lines = [
        f"python {env['python']} | torch {env['torch']} (CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}) "
        f"| {env['platform']}",
        ("GPU: none visible to torch" if gpu is None else
         f"GPU: {gpu['name']} x{gpu['count']} | sm_{gpu['capability'].replace('.', '')} | {gpu['sm_count']} SMs | "
         f"{gpu['memory_GiB']} GiB | L2 {gpu['l2_MiB']} MiB"),
        f"nvidia-smi: {env['nvidia_smi'] or 'not found'}",
        f"nvcc: {env['nvcc'] or 'not found'}",
        "packages: " + ", ".join(f"{k} {v or '-'}" for k, v in env["packages"].items()),
    ]
    info = env["backend_info"]
    ext = info.get("extension", {})
    caps = ext.get("capabilities") or {}
    lines.append(f"extension: {'loaded' if ext.get('loaded') else 'not loaded: ' + str(ext.get('error'))}"
                 + (f" | cuda kernels {caps.get('cuda')} archs {caps.get('cuda_archs') or '-'}"
                    f" | ops cuda {caps.get('ops', {}).get('cuda')}" if caps else ""))
    lines.append(f"auto backend per device: {info.get('auto')}")
    for name, b in info.get("backends", {}).items():
        why = "; ".join(f"{d}: {r}" for d, r in b.get("unavailable_reason", {}).items())
        lines.append(f"backend {name:<6} available on {b.get('available') or 'nothing'}" + (f" | not: {why}" if why else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None, help="also write everything here")
    args = p.parse_args(argv)
    env = collect()
    print(describe(env))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(env, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
