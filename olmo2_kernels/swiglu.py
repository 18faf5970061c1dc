"""SwiGLU activation: ``silu(gate) * up``, the OLMo 2 MLP nonlinearity.

The spec is :func:`olmo2_kernels.reference.swiglu`.
"""
from __future__ import annotations

from torch import Tensor

from . import _backend, _validate, reference

OP = "swiglu"


def _check(gate, up) -> None:
    _validate.tensor(OP, "gate", gate)
    _validate.tensor(OP, "up", up)
    if up.dtype != gate.dtype:
        raise TypeError(f"{OP}: up must have the dtype of gate ({gate.dtype}), got {up.dtype}")
    _validate.shape(OP, "up", up, tuple(gate.shape), "the shape of gate")
    _validate.same_device(OP, gate=gate, up=up)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` elementwise, computed in fp32, output in the inputs' dtype."""
    _check(gate, up)
    backend = _backend.resolve(OP, gate.device, gate.dtype)
    if backend == "torch":
        return reference.swiglu(gate, up)
    raise _backend.BackendUnavailableError(f"{OP}: no {backend} implementation")
