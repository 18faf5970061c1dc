"""Cross-entropy with z-loss and ignore_index, row-blocked: logits are never
upcast whole to fp32.

Returns ``(ce_loss, z_loss)``: per token ``lse - logit[label]`` and
``z_loss_coef * lse^2``, reduced by ``reduction``. The spec is
:func:`olmo2_kernels.reference.cross_entropy`.

Layers, top to bottom: Triton row kernels; launchers; the ``torch.library``
custom ops (forward and backward, with fake implementations) and their autograd
registration; the functional API.

Forward: one program per row (per few rows when the vocabulary is narrow)
streams the vocabulary in blocks of at most ``MAX_BLOCK`` columns with an
online log-sum-exp (fp32), reading each logit once, and writes per-token fp32
``ce``, ``z`` and ``lse``. Backward: the same tiling writes
``grad_ce * (softmax - onehot) + grad_z * 2 * coef * lse * softmax`` from the
saved ``lse``, in fp32 until the final store (the target term ``softmax - 1``
never goes through the logits' dtype), in the logits' dtype. The reduction (``mean``/``sum``/``none``) is applied outside the custom
op in plain torch, so the backward always receives per-token upstream
gradients, whatever the reduction and whatever the caller backpropagates.

Traffic: forward reads N*V logits once; backward reads them once and writes
N*V gradients.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _compiled, _validate, reference
from ._triton import as_rows, next_power_of_2, num_warps_for, tl, triton

OP = "cross_entropy"

# Columns a program holds at once. The vocabulary (100352 for OLMo 2) is
# streamed through blocks of this size, never held whole.
MAX_BLOCK = 4096
# Elements (rows x columns) a program holds at once, and the most rows: a row
# of MAX_BLOCK or more columns gets a program of its own; narrower ones share.
# Under the Triton interpreter, whose cost is per program rather than per
# element, programs take more rows (same kernels, other constexprs).
TILE_ELEMENTS = MAX_BLOCK * (16 if _backend.TRITON_INTERPRET else 1)
MAX_ROWS = 16

# --------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _cross_entropy_fwd_kernel(
        LOGITS, LABELS, CE, Z, LSE,
        stride_row, n_rows, n_cols, ignore_index, z_loss_coef,
        ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        # Rows past the end (last program) recompute the last row; nothing of
        # theirs is stored. Loads stay in bounds and values finite.
        src = tl.minimum(rows, n_rows - 1)
        base = LOGITS + src[:, None] * stride_row
        cols = tl.arange(0, BLOCK)
        # Online log-sum-exp per row: running max m and sum s of exp(x - m).
        m = tl.full((ROWS,), float("-inf"), tl.float32)
        s = tl.zeros((ROWS,), tl.float32)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            x = tl.load(base + offs[None, :], mask=offs[None, :] < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            # A row that is -inf so far must give s = 0, not exp(-inf + inf) = NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[:, None]), axis=1)
            m = m_new
        lse = m + tl.log(s)

        label = tl.load(LABELS + src)
        valid = label != ignore_index
        in_range = (label >= 0) & (label < n_cols)
        # Masked: an out-of-range label is never read; its token gets NaN.
        target = tl.load(LOGITS + src * stride_row + label, mask=valid & in_range, other=0.0)
        ce = tl.where(in_range, lse - target.to(tl.float32), float("nan"))
        tl.store(CE + rows, tl.where(valid, ce, 0.0), mask=row_mask)
        tl.store(Z + rows, tl.where(valid, z_loss_coef * lse * lse, 0.0), mask=row_mask)
        tl.store(LSE + rows, lse, mask=row_mask)

    @triton.jit
    def _cross_entropy_bwd_kernel(
        LOGITS, LABELS, LSE, GRAD_CE, GRAD_Z, DLOGITS,
        stride_row, stride_out, n_rows, n_cols, ignore_index, z_loss_coef,
        ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        src = tl.minimum(rows, n_rows - 1)  # as in the forward: nothing stored for rows past the end
        base = LOGITS + src[:, None] * stride_row
        out = DLOGITS + rows[:, None] * stride_out
        cols = tl.arange(0, BLOCK)
        label = tl.load(LABELS + src)
        valid = label != ignore_index
        lse = tl.load(LSE + src)
        g_ce = tl.where(valid, tl.load(GRAD_CE + src), 0.0)
        # d(coef * lse^2)/dx = 2 * coef * lse * softmax
        g_softmax_z = tl.where(valid, tl.load(GRAD_Z + src) * 2.0 * z_loss_coef * lse, 0.0)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = row_mask[:, None] & (offs[None, :] < n_cols)
            # Ignored rows read nothing and write zeros.
            x = tl.load(base + offs[None, :], mask=(offs[None, :] < n_cols) & valid[:, None], other=0.0)
            x = x.to(tl.float32)
            p = tl.exp(x - lse[:, None])
            onehot = tl.where(offs[None, :] == label[:, None], 1.0, 0.0)
            # The target term p - 1 is taken in fp32: no cancellation for confident rows.
            d = g_ce[:, None] * (p - onehot) + g_softmax_z[:, None] * p
            d = tl.where(valid[:, None], d, 0.0)
            # In place (DLOGITS == LOGITS) is safe: each tile is read before it is written.
            tl.store(out + offs[None, :], d.to(DLOGITS.dtype.element_ty), mask=mask)

    _backend.register_triton(OP)


# --------------------------------------------------------------------------- launchers
def tile_for(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(rows, columns) of the tile a program holds at once.

    Columns: the vocabulary rounded up to a power of two, at most MAX_BLOCK (a
    longer row is streamed through). Rows: as many as fit TILE_ELEMENTS, at
    most MAX_ROWS (on GPU, one row per program once V >= MAX_BLOCK).
    """
    block = min(next_power_of_2(n_cols), MAX_BLOCK)
    rows = min(MAX_ROWS, TILE_ELEMENTS // block, next_power_of_2(n_rows))
    return max(rows, 1), block


def _fwd_triton(logits: Tensor, labels: Tensor, ignore_index: int, z_loss_coef: float) -> tuple[Tensor, Tensor, Tensor]:
    """logits (N, V) with unit column stride; labels (N,) int64 contiguous.

    Returns per-token fp32 ``ce``, ``z`` (0 at ignored rows; ``ce`` NaN for a
    label outside [0, V)) and ``lse``.
    """
    n_rows, n_cols = logits.shape
    ce, z, lse = (torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(3))
    if n_rows == 0:
        return ce, z, lse
    rows, block = tile_for(n_rows, n_cols)
    _cross_entropy_fwd_kernel[(triton.cdiv(n_rows, rows),)](
        logits, labels, ce, z, lse,
        logits.stride(0), n_rows, n_cols, ignore_index, z_loss_coef,
        ROWS=rows, BLOCK=block, num_warps=num_warps_for(rows * block),
    )
    return ce, z, lse


def _bwd_triton(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    grad_ce: Tensor,
    grad_z: Tensor,
    ignore_index: int,
    z_loss_coef: float,
    out: Tensor | None = None,
) -> Tensor:
    """dlogits (N, V), zero rows at ignored tokens.

    grad_ce/grad_z/lse are (N,) fp32 contiguous. Written into ``out`` when given
    (which may be ``logits`` itself; unit column stride), else into a new
    contiguous tensor of logits' dtype. ``out`` may have another float dtype
    than ``logits`` (e.g. fp32 logits, bf16 gradient): the Triton launcher
    rounds once, to ``out``'s dtype.
    """
    n_rows, n_cols = logits.shape
    if out is None:
        out = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return out
    rows, block = tile_for(n_rows, n_cols)
    _cross_entropy_bwd_kernel[(triton.cdiv(n_rows, rows),)](
        logits, labels, lse, grad_ce, grad_z, out,
        logits.stride(0), out.stride(0), n_rows, n_cols, ignore_index, z_loss_coef,
        ROWS=rows, BLOCK=block, num_warps=num_warps_for(rows * block),
    )
    return out


_FWD = {"triton": _fwd_triton, "cpu": _compiled.cross_entropy_fwd, "cuda": _compiled.cross_entropy_fwd}
_BWD = {"triton": _bwd_triton, "cpu": _compiled.cross_entropy_bwd, "cuda": _compiled.cross_entropy_bwd}


def kernel_labels(labels: Tensor) -> Tensor:
    """Labels as the row kernels take them: contiguous int64."""
    return labels.to(torch.int64).contiguous()


def per_token_grad(grad: Tensor | None, like: Tensor) -> Tensor:
    """An upstream per-token gradient as the row kernels take it: (N,) fp32
    contiguous; zeros when autograd passes none."""
    if grad is None:
        return torch.zeros(like.shape[0], dtype=torch.float32, device=like.device)
    return grad.to(torch.float32).contiguous()


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("olmo2_kernels::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(
    logits: Tensor, labels: Tensor, ignore_index: int, z_loss_coef: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token fp32 ``(ce, z, lse)`` of logits (N, V); ``lse`` is for the backward."""
    return _FWD[backend](as_rows(logits), kernel_labels(labels), ignore_index, z_loss_coef)


@cross_entropy_fwd.register_fake
def _(logits: Tensor, labels: Tensor, ignore_index: int, z_loss_coef: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    n = logits.shape[0]
    return tuple(logits.new_empty(n, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("olmo2_kernels::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    grad_ce: Tensor,
    grad_z: Tensor,
    ignore_index: int,
    z_loss_coef: float,
    backend: str,
) -> Tensor:
    """``dlogits`` (N, V), contiguous, dtype of logits. Never writes into ``logits``."""
    return _BWD[backend](
        as_rows(logits), kernel_labels(labels), lse.contiguous(),
        grad_ce.to(torch.float32).contiguous(), grad_z.to(torch.float32).contiguous(),
        ignore_index, z_loss_coef,
    )


@cross_entropy_bwd.register_fake
def _(logits, labels, lse, grad_ce, grad_z, ignore_index, z_loss_coef, backend) -> Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    logits, labels, ignore_index, z_loss_coef, backend = inputs
    _ce, _z, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, labels, lse)
    ctx.ignore_index = ignore_index
    ctx.z_loss_coef = z_loss_coef
    ctx.backend = backend


def _backward(ctx, grad_ce: Tensor | None, grad_z: Tensor | None, _grad_lse: Tensor | None):
    logits, labels, lse = ctx.saved_tensors
    dlogits = cross_entropy_bwd(
        logits, labels, lse, per_token_grad(grad_ce, logits), per_token_grad(grad_z, logits),
        ctx.ignore_index, ctx.z_loss_coef, ctx.backend,
    )
    return dlogits, None, None, None, None


cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- functional API
def check_loss_args(op: str, ignore_index, z_loss_coef, reduction) -> tuple[float, str]:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    coef = _validate.nonnegative_float(op, "z_loss_coef", z_loss_coef)
    return coef, _validate.choice(op, "reduction", reduction, reference.REDUCTIONS)


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    z_loss_coef: float = 0.0,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """Cross-entropy and z-loss of ``logits`` (N, V) against ``labels`` (N,).

    ``mean`` divides both by the number of non-ignored tokens (0 losses and
    gradients when every token is ignored), ``sum`` sums them, ``none`` returns
    per-token fp32 tensors, zero at ignored tokens. ``z_loss_coef=0`` gives
    exactly the plain cross-entropy and a zero z-loss.

    ``logits`` may have a row stride (it is copied only when its last dim is
    not unit-stride); it is never written to. ``labels`` is int64 or int32.
    """
    _validate.tensor(OP, "logits", logits, min_ndim=2)
    if logits.dim() != 2:
        raise ValueError(f"{OP}: logits must be 2-D (N, V), got shape {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError(f"{OP}: logits must have at least one class (V >= 1), got shape {tuple(logits.shape)}")
    coef, reduction = check_loss_args(OP, ignore_index, z_loss_coef, reduction)
    _validate.labels(OP, labels, logits.shape[0], logits.shape[1], ignore_index, logits.device)
    backend = _backend.resolve(OP, logits.device, logits.dtype)
    if backend == "torch":
        return reference.cross_entropy(logits, labels, ignore_index, coef, reduction)
    ce, z, _lse = cross_entropy_fwd(logits, labels, ignore_index, coef, backend)
    return reference.reduce_token_losses(ce, z, labels != ignore_index, reduction)
