"""The CUDA kernels on CPU, for tests: csrc/cuda/*.cu compiled as C++ against
csrc/cuda/emulation.h (block threads as cooperative contexts, real barriers and
shuffles) into a shared library, and an object that stands in for ``_C.cuda``.

A test monkeypatches ``_compiled._kernels`` to return ``kernels(tmp_dir)``: the
launchers then run the CUDA kernels through the same plumbing (pointers,
strides, alignment choices) as on a GPU. Not covered by emulation: device math
precision, concurrency, timing.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
_RUNTIME = ROOT / "csrc" / "cuda" / "emulation.cpp"

# (name, kind) per field of each parameter struct in csrc/common/params.h, in
# order; the `_C` functions take the same arguments in the same order.
_P, _I, _F, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
PARAMS = {
    "rms_norm_fwd": [_P, _I, _P, _P, _I, _P, _I, _I, _F, _D, _D],
    "rms_norm_bwd": [_P, _I, _P, _I, _P, _P, _P, _I, _P, _P, _I, _I, _I, _D, _D],
    "norm_rope_fwd": [_P, _I, _P, _P, _P, _P, _I, _P, _I, _I, _I, _I, _F, _D, _D],
    "norm_rope_bwd": [_P, _I, _P, _I, _P, _P, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _D, _D],
    "cross_entropy_fwd": [_P, _I, _P, _P, _P, _P, _I, _I, _I, _F, _D],
    "cross_entropy_bwd": [_P, _I, _P, _P, _P, _I, _P, _I, _P, _I, _I, _I, _I, _F, _D, _D],
    "swiglu_fwd": [_P, _I, _P, _I, _P, _I, _I, _I, _D],
    "swiglu_bwd": [_P, _I, _P, _I, _P, _I, _P, _I, _P, _I, _I, _I, _D],
}


def cuda_include_dir() -> Path | None:
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parents[1] / "include")
    candidates += [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include", Path("/usr/local/cuda/include")]
    for path in candidates:
        if (path / "cuda_bf16.h").exists():
            return path
    return None


def unavailable_reason() -> str | None:
    """Why the emulation cannot be built here, or None."""
    if cuda_include_dir() is None or _compiler() is None:
        return "CUDA emulation needs a C++20 compiler and the CUDA headers (cuda_bf16.h)"
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


class EmulatedCudaKernels:
    """Stands in for ``_C.cuda``: same functions, run by the emulation library."""

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib
        lib.olmo2_emu_last_error.restype = ctypes.c_char_p
        for name, kinds in PARAMS.items():
            struct = type(name, (ctypes.Structure,), {"_fields_": [(f"f{i}", k) for i, k in enumerate(kinds)]})
            setattr(self, name, self._make(name, struct, len(kinds)))

    def _make(self, name, struct, n_fields):
        fn = getattr(self._lib, f"olmo2_emu_{name}")

        def call(*args):
            assert len(args) == n_fields + 1, f"{name}: {len(args)} arguments"  # + stream
            if fn(ctypes.byref(struct(*args[:n_fields]))):
                raise RuntimeError(self._lib.olmo2_emu_last_error().decode())

        return call


_built: EmulatedCudaKernels | None = None


def kernels(tmp_dir: Path) -> EmulatedCudaKernels:
    """Builds the emulation library in ``tmp_dir`` (once per process) and loads it.
    Call only where :func:`unavailable_reason` is None."""
    global _built
    if _built is None:
        lib_path = Path(tmp_dir) / "libolmo2_cuda_emulation.so"
        cmd = [_compiler(), "-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-DOLMO2_CUDA_EMULATION",
               "-Wno-attributes", f"-I{ROOT / 'csrc'}", f"-I{cuda_include_dir()}", "-x", "c++"]
        cmd += [str(p) for p in _SOURCES]
        cmd += ["-x", "none", str(_RUNTIME), "-o", str(lib_path)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"emulation build failed:\n{result.stderr[-4000:]}"
        _built = EmulatedCudaKernels(ctypes.CDLL(str(lib_path)))
    return _built
