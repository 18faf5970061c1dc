"""Loads the compiled extension ``olmo2_kernels._C`` and explains, in one line,
why it is unavailable when it is.

Imported after torch. The package works without the extension (the ``torch``
and ``triton`` backends need nothing compiled).

The CPU kernels are built for the baseline instruction set and, on x86-64, for
AVX2 + FMA; the extension runs the best one the processor supports.
``OLMO2_KERNELS_CPU_ISA`` (auto|baseline|avx2) chooses another; a value this
build or processor cannot honour makes the extension unavailable, with the
reason in ``backend_info()``, rather than running something else.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

_module: Any = None
_error: str | None = None
_capabilities: dict = {}

try:
    _module = importlib.import_module("olmo2_kernels._C")
    _isa = os.environ.get("OLMO2_KERNELS_CPU_ISA", "").strip()
    if _isa:
        try:
            _module.cpu.set_isa(_isa)
        except ValueError as exc:
            _module = None
            _error = f"OLMO2_KERNELS_CPU_ISA={_isa!r} cannot be used: {exc}"
    if _module is not None:
        _capabilities = dict(_module.capabilities())
except ImportError as exc:  # not built, or built for another Python
    _error = f"extension not built or not importable ({exc})"
except Exception as exc:  # noqa: BLE001 - any load failure must not break the package
    _error = f"extension failed to load ({type(exc).__name__}: {exc})"


def module() -> Any:
    """The loaded ``_C`` module, or None."""
    return _module


def load_error() -> str | None:
    """Why the extension is unavailable, or None when it loaded."""
    return _error


def capabilities() -> dict:
    """What the loaded build contains (empty when it did not load)."""
    caps = dict(_capabilities)
    if _module is not None and "cpu_isa" in caps:
        caps["cpu_isa"] = _module.cpu.isa()  # may have changed since loading
    return caps


def has_cpu_kernels() -> bool:
    return _module is not None and bool(_capabilities.get("cpu"))


def has_cuda_kernels() -> bool:
    return _module is not None and bool(_capabilities.get("cuda"))


def has_op(device_type: str, op: str) -> bool:
    """Whether the loaded build has ``op`` for ``device_type`` ("cpu"/"cuda").

    The extension lists its kernels in ``capabilities()["ops"]`` as
    ``{"cpu": [...], "cuda": [...]}``.
    """
    ops = _capabilities.get("ops") or {}
    return op in ops.get(device_type, ())
