"""SwiGLU activation: ``silu(gate) * up``, the OLMo 2 MLP nonlinearity.

Layers, top to bottom: Triton kernels; launchers; the ``torch.library`` custom
ops (forward and backward, with fake implementations) and their autograd
registration; the functional API. The spec is
:func:`olmo2_kernels.reference.swiglu`.

Every backend sees 2-D row views with unit stride along the last dim (the row
strides of ``gate``, ``up`` and ``dy`` may differ), so the two halves of a
fused gate/up projection are read in place, without a copy. The Triton kernels
cover the rows x columns grid with tiles of about ``_TILE`` elements, many
short rows or one strip of a long row per program. Math is fp32; each output
is rounded once. The forward saves ``gate`` and ``up``; the backward recomputes
the sigmoid:

    dgate = dy * up * sig * (1 + gate * (1 - sig)),   dup = dy * gate * sig.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _compiled, _validate, reference
from ._triton import as_rows, next_power_of_2, num_warps_for, tl, triton

OP = "swiglu"

# Elements per program: large enough to keep the loads in flight on a GPU.
_TILE = 4096

# --------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _tile_offsets(pid, n_col_blocks, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Row and column indices (int64) and mask of this program's tile.

        One flat grid: consecutive programs sweep the column blocks of a row
        block, and no grid axis limits the number of rows or columns.
        """
        rows = (pid // n_col_blocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        cols = (pid % n_col_blocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        return rows, cols, (rows < n_rows) & (cols < n_cols)

    @triton.jit
    def _swiglu_fwd_kernel(
        GATE, UP, Y,
        stride_gate, stride_up, stride_y, n_rows, n_cols, n_col_blocks,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows, cols, mask = _tile_offsets(tl.program_id(0), n_col_blocks, n_rows, n_cols, BLOCK_R, BLOCK_C)
        gate = tl.load(GATE + rows * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(UP + rows * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
        y = gate * tl.sigmoid(gate) * up
        tl.store(Y + rows * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(
        DY, GATE, UP, DGATE, DUP,
        stride_dy, stride_gate, stride_up, stride_dgate, stride_dup, n_rows, n_cols, n_col_blocks,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows, cols, mask = _tile_offsets(tl.program_id(0), n_col_blocks, n_rows, n_cols, BLOCK_R, BLOCK_C)
        dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GATE + rows * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(UP + rows * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
        dup = dy * silu
        tl.store(DGATE + rows * stride_dgate + cols, dgate.to(DGATE.dtype.element_ty), mask=mask)
        tl.store(DUP + rows * stride_dup + cols, dup.to(DUP.dtype.element_ty), mask=mask)

    _backend.register_triton(OP)


# --------------------------------------------------------------------------- launchers
def _grid(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, column blocks): a tile of about _TILE elements."""
    block_c = min(next_power_of_2(n_cols), _TILE)
    block_r = _TILE // block_c
    return block_r, block_c, triton.cdiv(n_cols, block_c)


def _fwd_triton(gate: Tensor, up: Tensor) -> Tensor:
    n_rows, n_cols = gate.shape
    y = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    if y.numel() == 0:
        return y
    block_r, block_c, n_col_blocks = _grid(n_rows, n_cols)
    _swiglu_fwd_kernel[(triton.cdiv(n_rows, block_r) * n_col_blocks,)](
        gate, up, y,
        gate.stride(0), up.stride(0), y.stride(0), n_rows, n_cols, n_col_blocks,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps_for(_TILE),
    )
    return y


def _bwd_triton(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    n_rows, n_cols = gate.shape
    dgate = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    dup = torch.empty((n_rows, n_cols), dtype=up.dtype, device=up.device)
    if dgate.numel() == 0:
        return dgate, dup
    block_r, block_c, n_col_blocks = _grid(n_rows, n_cols)
    _swiglu_bwd_kernel[(triton.cdiv(n_rows, block_r) * n_col_blocks,)](
        dy, gate, up, dgate, dup,
        dy.stride(0), gate.stride(0), up.stride(0), dgate.stride(0), dup.stride(0), n_rows, n_cols, n_col_blocks,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps_for(_TILE),
    )
    return dgate, dup


_FWD = {"triton": _fwd_triton, "cpu": _compiled.swiglu_fwd, "cuda": _compiled.swiglu_fwd}
_BWD = {"triton": _bwd_triton, "cpu": _compiled.swiglu_bwd, "cuda": _compiled.swiglu_bwd}


# --------------------------------------------------------------------------- custom ops
def _empty(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.custom_op("olmo2_kernels::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    """Returns ``silu(gate) * up`` (shape and dtype of gate, contiguous)."""
    if gate.numel() == 0:  # no row view of a zero-width tensor; nothing to compute
        return _empty(gate)
    return _FWD[backend](as_rows(gate), as_rows(up)).view(gate.shape)


@swiglu_fwd.register_fake
def _(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    return _empty(gate)


@torch.library.custom_op("olmo2_kernels::swiglu_bwd", mutates_args=())
def swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """Returns ``dgate`` and ``dup`` (shape and dtype of gate, contiguous)."""
    if gate.numel() == 0:
        return _empty(gate), _empty(up)
    dgate, dup = _BWD[backend](as_rows(dy), as_rows(gate), as_rows(up))
    return dgate.view(gate.shape), dup.view(up.shape)


@swiglu_bwd.register_fake
def _(dy: Tensor, gate: Tensor, up: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return _empty(gate), _empty(up)


def _setup_context(ctx, inputs, output) -> None:
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _backward(ctx, dy: Tensor):
    gate, up = ctx.saved_tensors
    dgate, dup = swiglu_bwd(dy, gate, up, ctx.backend)
    return dgate, dup, None


swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- functional API
def _check(gate, up) -> None:
    _validate.tensor(OP, "gate", gate)
    _validate.tensor(OP, "up", up)
    if up.dtype != gate.dtype:
        raise TypeError(f"{OP}: up must have the dtype of gate ({gate.dtype}), got {up.dtype}")
    _validate.shape(OP, "up", up, tuple(gate.shape), "the shape of gate")
    _validate.same_device(OP, gate=gate, up=up)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` elementwise, computed in fp32, output in the inputs' dtype.

    ``gate`` and ``up`` may be strided views, e.g. the two halves of a fused
    gate/up projection output; they are read in place.
    """
    _check(gate, up)
    backend = _backend.resolve(OP, gate.device, gate.dtype)
    if backend == "torch":
        return reference.swiglu(gate, up)
    return swiglu_fwd(gate, up, backend)
