"""Torch-side launchers for the compiled extension's kernels (``cpu`` and ``cuda``
backends).

Each function takes tensors already validated and laid out as the op module
prepares them (2-D row views with unit stride along the last dim), allocates
the outputs, picks the CUDA stream, and calls ``_C`` with raw pointers, sizes
and strides. Signatures mirror the Triton launchers of each op module.

A kernel the loaded build lacks is never reached: the backend resolver checks
``capabilities()["ops"]`` first.
"""
from __future__ import annotations

from torch import Tensor

from . import _extension


def _missing(op: str):
    raise RuntimeError(
        f"olmo2_kernels._C has no kernel for {op} "
        f"({_extension.load_error() or 'not in this build'})"
    )


def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _missing("rms_norm")


def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    _missing("rms_norm")
