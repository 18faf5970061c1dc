"""Triton import guard and launch heuristics shared by the Triton kernels.

``triton`` and ``tl`` are None when Triton cannot be imported; op modules then
skip defining their kernels and the ``triton`` backend reports why it is
unavailable.
"""
from __future__ import annotations

import contextlib
import math

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "no triton backend"
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

# One program per row keeps a whole row in registers up to this width.
MAX_FUSED_WIDTH = 65536


def next_power_of_2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def row_block(op: str, name: str, width: int) -> int:
    """The power-of-two block that holds a row of ``width`` elements."""
    if width > MAX_FUSED_WIDTH:
        raise ValueError(
            f"{op}: the last dim of {name} is {width}; the fused row kernels support up to {MAX_FUSED_WIDTH}"
        )
    return next_power_of_2(width)


def num_warps_for(block: int) -> int:
    if block >= 16384:
        return 16
    if block >= 4096:
        return 8
    if block >= 1024:
        return 4
    return 2


# SMs assumed when a launch is sized for a tensor that is not on a CUDA device
# (CPU tensors under the Triton interpreter, meta tensors in the compile check):
# an H100 SXM's. The interpreter thus runs the partitions an H100 would.
DEFAULT_SM_COUNT = 132
_SM_COUNT_OVERRIDE: list[int] = []


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors that launches on ``device`` are sized for."""
    if _SM_COUNT_OVERRIDE:
        return _SM_COUNT_OVERRIDE[-1]
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


@contextlib.contextmanager
def assume_sm_count(n: int):
    """Size every launch inside the block for a GPU with ``n`` SMs (the AOT
    compile check binds launches for H100, H200 and A100 this way)."""
    if int(n) < 1:
        raise ValueError(f"assume_sm_count: n must be >= 1, got {n}")
    _SM_COUNT_OVERRIDE.append(int(n))
    try:
        yield
    finally:
        _SM_COUNT_OVERRIDE.pop()


def reduction_programs(n_rows: int, device: torch.device) -> int:
    """How many programs share a row-parallel reduction (e.g. a weight gradient).

    Each writes one fp32 partial row; the partials are summed in a second pass,
    so the count trades parallelism against that pass: four programs per SM.
    """
    return max(1, min(n_rows, 4 * sm_count(device)))


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as (rows, last dim) with unit stride along the last dim.

    Copies only when no such view exists; the row stride is passed to kernels.
    """
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if x.dim() != 2 else x
    if rows.shape[-1] > 1 and rows.stride(-1) != 1:
        rows = rows.contiguous()
    if rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]:
        rows = rows.contiguous()
    return rows
