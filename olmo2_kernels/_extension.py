"""Loads the compiled extension ``olmo2_kernels._C`` and explains, in one line,
why it is unavailable when it is.

Imported after torch. The package works without the extension (the ``torch``
and ``triton`` backends need nothing compiled).
"""
from __future__ import annotations

import importlib
from typing import Any

_module: Any = None
_error: str | None = None
_capabilities: dict = {}

try:
    _module = importlib.import_module("olmo2_kernels._C")
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
    return dict(_capabilities)


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
