"""The CUDA kernels on CPU, for tests: csrc/cuda/*.cu compiled as C++ against
csrc/cuda/emulation.h (block threads as cooperative contexts, real barriers and
shuffles) into a shared library, and an object that stands in for ``_C.cuda``.

A test monkeypatches ``_compiled._kernels`` to return ``kernels(tmp_dir)``: the
launchers then run the CUDA kernels through the same plumbing (pointers,
strides, alignment choices, keyword arguments) as on a GPU. Not covered by
emulation: device math precision, concurrency, timing.

The parameter structs are mirrored in ctypes from the layout the library
itself reports (``olmo2_emu_param_layouts``, generated from the op table
csrc/common/op_table.h): no copy of the structs is kept here.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
_RUNTIME = ROOT / "csrc" / "cuda" / "emulation.cpp"

# Field types of csrc/common/param_layout.h.
_CTYPES = {"pointer": ctypes.c_void_p, "int64": ctypes.c_int64, "float32": ctypes.c_float, "int32": ctypes.c_int}


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


def params_struct(kernel: str, layout: dict) -> type[ctypes.Structure]:
    """The ctypes mirror of one parameter struct from its layout ({"params", "size",
    "fields": [(name, type, offset), ...]}); checks that ctypes lays it out the same."""
    fields = [(name, _CTYPES[kind]) for name, kind, _ in layout["fields"]]
    struct = type(layout["params"], (ctypes.Structure,), {"_fields_": fields})
    for name, _, offset in layout["fields"]:
        assert getattr(struct, name).offset == offset, f"{kernel}.{name}: ctypes offset differs from the C++ one"
    assert ctypes.sizeof(struct) == layout["size"], f"{kernel}: ctypes size differs from the C++ one"
    return struct


class EmulatedCudaKernels:
    """Stands in for ``_C.cuda``: the same functions (keyword arguments named after
    the fields, and ``stream``), run by the emulation library."""

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib
        lib.olmo2_emu_last_error.restype = ctypes.c_char_p
        lib.olmo2_emu_param_layouts.restype = ctypes.c_char_p
        self.layouts = json.loads(lib.olmo2_emu_param_layouts().decode())
        for kernel, layout in self.layouts.items():
            setattr(self, kernel, self._make(kernel, params_struct(kernel, layout)))

    def _make(self, kernel: str, struct: type[ctypes.Structure]):
        fn = getattr(self._lib, f"olmo2_emu_{kernel}")
        names = {name for name, _ in struct._fields_}

        def call(*, stream: int = 0, **fields):
            if set(fields) != names:  # as pybind11 refuses a missing or unknown keyword
                raise TypeError(
                    f"{kernel}: missing {sorted(names - set(fields))}, unexpected {sorted(set(fields) - names)}"
                )
            if fn(ctypes.byref(struct(**fields))):
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
