"""RMSNorm: ``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim.

Layers, top to bottom: Triton kernels; launchers; the ``torch.library`` custom
ops (forward and backward, with fake implementations) and their autograd
registration; the functional API; the ``nn.Module`` drop-in. The spec is
:func:`olmo2_kernels.reference.rms_norm`.

Forward saves the per-row ``rstd`` (fp32) for the backward. The backward
computes ``dx`` row by row and the weight gradient as fp32 partial sums, one per
program over a contiguous block of rows, summed in a second pass: no atomics,
no bf16 accumulation.

Tiling (bf16, 8192 tokens, registers per thread from ptxas with the
specializations of a real launch: `python scripts/aot_check.py`): the forward
gives each thread 8 elements of the row, the backward 4, up to 32 warps. The
backward at 4096 columns (7B) takes 32 warps and 50 registers on sm_90 (50%
occupancy; 32 and 100% on sm_80) where 8 warps took 126 (25%); at 5120 (13B/
32B, an 8192 block) 32 warps and 55 registers (50%) where 8 warps took 214-226
(12.5%, one block per SM).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _backend, _compiled, _validate, reference
from ._triton import (
    RESIDENT_BWD_WIDTH,
    RESIDENT_FWD_WIDTH,
    as_rows,
    reduction_programs,
    row_block,
    tl,
    triton,
    warps_for,
)

OP = "rms_norm"

# --------------------------------------------------------------------------- kernels
# Rows up to RESIDENT_FWD_WIDTH (forward) / RESIDENT_BWD_WIDTH (backward)
# columns are held in registers, one pass over memory. Wider rows stream
# through blocks of STREAM_BLOCK columns: two passes per row (the second reads
# the row again, mostly from L2), the weight-gradient partial accumulated in its
# own fp32 row of the workspace instead of registers.
STREAM_BLOCK = 4096

if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(
        X, W, Y, RSTD,
        stride_x, stride_y, n_cols, eps,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_fwd_stream_kernel(
        X, W, Y, RSTD,
        stride_x, stride_y, n_cols, eps,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_x
        y_row = Y + row * stride_y
        cols = tl.arange(0, BLOCK)
        sum_sq = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            sum_sq += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + start + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY, X, W, RSTD, DX, DW_PARTIAL,
        stride_dy, stride_x, stride_dx, n_rows, n_cols, rows_per_program,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
        row_start = pid.to(tl.int64) * rows_per_program
        row_stop = tl.minimum(row_start + rows_per_program, n_rows)
        for row in range(row_start, row_stop):
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            # w is re-read per row (an L1 hit) rather than held across the loop: fewer live registers.
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = x * rstd
            wdy = w * dy
            c = tl.sum(xhat * wdy, axis=0) / n_cols
            dx = (wdy - xhat * c) * rstd
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=mask)

    @triton.jit
    def _rms_norm_bwd_stream_kernel(
        DY, X, W, RSTD, DX, DW_PARTIAL,
        stride_dy, stride_x, stride_dx, n_rows, n_cols, rows_per_program,
        BLOCK: tl.constexpr,
    ):
        # DW_PARTIAL's row of this program is zero on entry and owned by it alone.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        partial = DW_PARTIAL + pid.to(tl.int64) * n_cols
        row_start = pid.to(tl.int64) * rows_per_program
        row_stop = tl.minimum(row_start + rows_per_program, n_rows)
        for row in range(row_start, row_stop):
            dy_row = DY + row * stride_dy
            x_row = X + row * stride_x
            rstd = tl.load(RSTD + row)
            dot = tl.zeros((BLOCK,), dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                mask = start + cols < n_cols
                dy = tl.load(dy_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                dot += x * w * dy
            c = tl.sum(dot, axis=0) * rstd / n_cols
            for start in range(0, n_cols, BLOCK):
                mask = start + cols < n_cols
                dy = tl.load(dy_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = x * rstd
                dx = (w * dy - xhat * c) * rstd
                tl.store(DX + row * stride_dx + start + cols, dx.to(DX.dtype.element_ty), mask=mask)
                dw = tl.load(partial + start + cols, mask=mask, other=0.0)
                tl.store(partial + start + cols, dw + dy * xhat, mask=mask)

    _backend.register_triton(OP)


# --------------------------------------------------------------------------- launchers
def _fwd_triton(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0 or n_cols == 0:
        return y, rstd.fill_(eps**-0.5)
    if n_cols <= RESIDENT_FWD_WIDTH:
        kernel, block = _rms_norm_fwd_kernel, row_block(OP, "x", n_cols, RESIDENT_FWD_WIDTH)
    else:
        kernel, block = _rms_norm_fwd_stream_kernel, STREAM_BLOCK
    kernel[(n_rows,)](
        x, weight, y, rstd, x.stride(0), y.stride(0), n_cols, eps,
        BLOCK=block, num_warps=warps_for(block, 8),
    )
    return y, rstd


def _bwd_triton(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    n_rows, n_cols = x.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0 or n_cols == 0:
        return dx, torch.zeros_like(weight)
    programs = reduction_programs(n_rows, x.device)
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    if n_cols <= RESIDENT_BWD_WIDTH:
        kernel, block = _rms_norm_bwd_kernel, row_block(OP, "x", n_cols, RESIDENT_BWD_WIDTH)
        partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    else:
        kernel, block = _rms_norm_bwd_stream_kernel, STREAM_BLOCK
        partial = torch.zeros((programs, n_cols), dtype=torch.float32, device=x.device)
    kernel[(programs,)](
        dy, x, weight, rstd, dx, partial,
        dy.stride(0), x.stride(0), dx.stride(0), n_rows, n_cols, rows_per_program,
        BLOCK=block, num_warps=warps_for(block, 4),
    )
    return dx, partial.sum(0).to(weight.dtype)


_FWD = {"triton": _fwd_triton, "cpu": _compiled.rms_norm_fwd, "cuda": _compiled.rms_norm_fwd}
_BWD = {"triton": _bwd_triton, "cpu": _compiled.rms_norm_bwd, "cuda": _compiled.rms_norm_bwd}


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("olmo2_kernels::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    """Returns ``y`` (shape and dtype of x) and the per-row fp32 ``rstd``."""
    rows = as_rows(x)
    y, rstd = _FWD[backend](rows, weight.contiguous(), eps)
    return y.view(x.shape), rstd


@rms_norm_fwd.register_fake
def _(x: Tensor, weight: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(n_rows, dtype=torch.float32)


@torch.library.custom_op("olmo2_kernels::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """Returns ``dx`` (shape and dtype of x) and ``dweight`` (dtype of weight)."""
    dx, dw = _BWD[backend](as_rows(dy), as_rows(x), weight.contiguous(), rstd)
    return dx.view(x.shape), dw


@rms_norm_bwd.register_fake
def _(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _eps, backend = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.backend = backend


def _backward(ctx, dy: Tensor, _drstd: Tensor | None):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd(dy, x, weight, rstd, ctx.backend)
    return dx, dw, None, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- functional API
def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim of ``x`` (any leading dims), output in x's dtype.

    Statistics are computed in fp32. ``weight`` has shape ``(x.shape[-1],)`` and
    may have another float dtype than ``x`` (e.g. fp32 weights, bf16 inputs).
    """
    _validate.tensor(OP, "x", x)
    _validate.tensor(OP, "weight", weight)
    _validate.shape(OP, "weight", weight, (x.shape[-1],), "the last dim of x")
    _validate.same_device(OP, x=x, weight=weight)
    eps = _validate.positive_float(OP, "eps", eps)
    backend = _backend.resolve(OP, x.device, x.dtype)
    if backend == "torch":
        return reference.rms_norm(x, weight, eps)
    y, _ = rms_norm_fwd(x, weight, eps, backend)
    return y


class RMSNorm(nn.Module):
    """Drop-in RMSNorm module (no bias, weight initialized to ones)."""

    def __init__(self, size: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
