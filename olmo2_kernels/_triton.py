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

# Row kernels hold a whole row in registers up to these widths (power-of-two
# blocks): the widest that compile without spills for sm_90 and sm_80 at the
# warps below (ptxas -v, Triton 3.6 and 3.9: `python scripts/aot_check.py`).
# The forward keeps x and w live; the backward also dy and the fp32 weight-
# gradient accumulator, hence half the width. Wider rows take streaming paths
# (rms_norm) or are refused with an error naming the limit (qk_norm_rope).
RESIDENT_FWD_WIDTH = 16384
RESIDENT_BWD_WIDTH = 8192


def next_power_of_2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def row_block(op: str, name: str, width: int, limit: int = RESIDENT_FWD_WIDTH) -> int:
    """The power-of-two block that holds a row of ``width`` elements in registers."""
    if width > limit:
        raise ValueError(
            f"{op}: the last dim of {name} is {width}; the fused row kernel holds rows of at most {limit} "
            "elements in registers (wider rows would spill)"
        )
    return next_power_of_2(width)


def warps_for(block: int, per_thread: int) -> int:
    """Warps (1..32, a power of two) that give each thread about ``per_thread``
    elements of a ``block``-element tile.

    Row kernels use 8 per thread forward and 4 backward (which keeps four row-
    sized values live): the register counts that leave room for at least two
    blocks per SM up to 4096 columns, and no spills up to the resident widths.
    """
    return max(1, min(32, next_power_of_2(max(block // (32 * per_thread), 1))))


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
