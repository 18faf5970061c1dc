"""Backend selection: which implementation runs an op.

Backends:

* ``torch``: the spec in :mod:`olmo2_kernels.reference`, differentiated by
  autograd. Always available.
* ``triton``: the Triton kernels. On CUDA tensors when a GPU is present; on CPU
  tensors only under the Triton interpreter (``TRITON_INTERPRET=1`` set before
  ``olmo2_kernels`` is imported), which is how the test suite checks them
  without a GPU.
* ``cuda``: the compiled extension's CUDA kernels, for CUDA tensors.
* ``cpu``: the compiled extension's C++ kernels, for CPU tensors.

The requested backend comes from, in order: the innermost
:func:`use_backend` context, the ``OLMO2_KERNELS_BACKEND`` environment
variable, else ``auto``. ``auto`` takes the first available backend of
``AUTO_PREFERENCE`` for the tensor's device. Asking for an unavailable backend
raises :class:`BackendUnavailableError`; nothing falls back silently.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

import torch

from . import _extension

BACKENDS = ("torch", "triton", "cuda", "cpu")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "OLMO2_KERNELS_BACKEND"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OPS = ("rms_norm", "qk_norm_rope", "swiglu", "cross_entropy", "linear_cross_entropy")  # each module's OP

# Order in which ``auto`` tries backends per device type. On CPU the Triton
# interpreter is far slower than eager PyTorch, so it is never chosen
# automatically. On CUDA, Triton leads: it covers every op and is the most
# tuned; the compiled CUDA kernels are picked by name (see the benchmarks).
AUTO_PREFERENCE = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}

# Fixed when the Triton kernels are defined: ``triton.jit`` reads the variable
# at decoration time, so setting it later has no effect on this process.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The stack of ``use_backend`` selections, one per thread (empty: the
# environment variable decides). Thread-local rather than a ContextVar: Dynamo
# (torch 2.13) traces a thread-local read and guards on it, so a function
# compiled with fullgraph=True sees the selection and recompiles when it
# changes, while it cannot trace ContextVar.get at all. asyncio tasks of one
# thread therefore share the selection: select inside a task around code that
# does not await.
_local = threading.local()


def _selection_stack() -> list[str]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack

# Ops whose Triton kernels are defined, filled by the op modules at import.
_TRITON_OPS: set[str] = set()


def register_triton(op: str) -> None:
    """Declare that ``op`` has Triton kernels (called by its module)."""
    _TRITON_OPS.add(op)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run the op on the given device."""


def _check_choice(name: str, source: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"{source} must be one of {CHOICES}, got {name!r}")
    return name


def requested() -> str:
    """The backend currently requested (possibly ``auto``)."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _check_choice(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name``.

    >>> with olmo2_kernels.use_backend("triton"):
    ...     y = olmo2_kernels.rms_norm(x, w)
    """
    stack = _selection_stack()
    stack.append(_check_choice(name, "use_backend(name)"))
    try:
        yield
    finally:
        stack.pop()


_triton_import_error: str | None = None
try:
    import triton  # noqa: F401
except Exception as exc:  # noqa: BLE001
    _triton_import_error = f"triton not importable ({type(exc).__name__}: {exc})"


def unavailable_reason(backend: str, device_type: str, op: str | None = None) -> str | None:
    """None when ``backend`` can run ``op`` (any op when None) on ``device_type``
    tensors, else why not."""
    if backend == "torch":
        return None
    if backend == "triton":
        if _triton_import_error:
            return _triton_import_error
        if op is not None and op not in _TRITON_OPS:
            return f"no Triton kernel for {op}"
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device"
        if device_type == "cpu":
            if TRITON_INTERPRET:
                return None
            return "Triton runs CPU tensors only under its interpreter (set TRITON_INTERPRET=1 before import)"
        return f"Triton does not support {device_type} tensors"
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs CUDA tensors, not {device_type} tensors"
        if not torch.cuda.is_available():
            return "no CUDA device"
        if _extension.load_error():
            return _extension.load_error()
        if not _extension.has_cuda_kernels():
            return "extension built without CUDA kernels"
        if op is not None and not _extension.has_op("cuda", op):
            return f"extension has no cuda kernel for {op}"
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs CPU tensors, not {device_type} tensors"
        if _extension.load_error():
            return _extension.load_error()
        if not _extension.has_cpu_kernels():
            return "extension built without CPU kernels"
        if op is not None and not _extension.has_op("cpu", op):
            return f"extension has no cpu kernel for {op}"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def backend_unavailable_reason(backend: str, device: torch.device | str, op: str | None = None,
                               dtype: torch.dtype | None = None) -> str | None:
    """None when ``backend`` can run ``op`` (any op when None) on ``device``'s tensors
    of ``dtype`` (any kernel dtype when None), else the reason in one line.

    >>> backend_unavailable_reason("cuda", "cpu")
    'the cuda backend runs CUDA tensors, not cpu tensors'
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if dtype is not None and backend != "torch" and dtype not in KERNEL_DTYPES:
        return f"the kernels take {[str(d) for d in KERNEL_DTYPES]}, not {dtype} (float64 runs on 'torch')"
    return unavailable_reason(backend, torch.device(device).type, op)


def selected_backend(op: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """The backend a call of ``op`` on ``device``/``dtype`` tensors runs now, under the
    current :func:`use_backend` / ``OLMO2_KERNELS_BACKEND`` choice (``auto`` resolved).
    Raises :class:`BackendUnavailableError` exactly when such a call would."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return resolve(op, torch.device(device), dtype)


def resolve(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend that runs ``op`` on tensors of ``device``/``dtype``.

    The kernels take fp32, bf16 and fp16; float64 runs on the ``torch`` backend
    under ``auto`` and is refused by name otherwise.
    """
    choice = requested()
    device_type = device.type
    if choice == "auto":
        if dtype not in KERNEL_DTYPES:
            return "torch"
        return resolve_auto_name(device_type, op)
    if choice != "torch" and dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{op}: backend {choice!r} supports dtypes {KERNEL_DTYPES}, got {dtype} "
            "(float64 runs on the 'torch' backend)"
        )
    reason = unavailable_reason(choice, device_type, op)
    if reason is not None:
        raise BackendUnavailableError(
            f"{op}: backend {choice!r} is unavailable for {device_type} tensors: {reason}"
        )
    return choice


def backend_info() -> dict:
    """What is available, for which device, and why not.

    Returns a dict with the requested backend, the extension's state and, per
    backend, ``{"cpu": reason-or-None, "cuda": reason-or-None}`` plus an
    ``available`` list of device types it can run on.
    """
    devices = ["cpu", "cuda"]
    backends = {}
    for name in BACKENDS:
        reasons = {d: unavailable_reason(name, d) for d in devices}
        backends[name] = {
            "available": [d for d in devices if reasons[d] is None],
            "unavailable_reason": {d: r for d, r in reasons.items() if r is not None},
        }
    return {
        "requested": requested(),
        "auto": {d: resolve_auto_name(d) for d in devices},
        "backends": backends,
        "extension": {
            "loaded": _extension.module() is not None,
            "error": _extension.load_error(),
            "capabilities": _extension.capabilities(),
        },
        "triton_interpret": TRITON_INTERPRET,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def resolve_auto_name(device_type: str, op: str | None = None) -> str:
    """The backend ``auto`` picks for ``op`` on ``device_type`` tensors."""
    for candidate in AUTO_PREFERENCE.get(device_type, ("torch",)):
        if unavailable_reason(candidate, device_type, op) is None:
            return candidate
    return "torch"
