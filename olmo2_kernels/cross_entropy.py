"""Cross-entropy with z-loss and ignore_index, row-blocked: logits are never
upcast whole to fp32.

Returns ``(ce_loss, z_loss)``: per token ``lse - logit[label]`` and
``z_loss_coef * lse^2``, reduced by ``reduction``. The spec is
:func:`olmo2_kernels.reference.cross_entropy`.

Layers, top to bottom: the tiling table; Triton row kernels; launchers; the
``torch.library`` custom ops (forward and backward, with fake implementations)
and their autograd registration; the functional API.

The contract the row kernels follow, per row (the same for every backend):

* forward: ``lse`` = log-sum-exp in fp32, written for every row (NaN if a
  logit is NaN, else +inf if one is +inf, -inf if all are -inf). Ignored
  label: ``ce = z = 0``. Label outside [0, V): ``ce = NaN`` (the label is never
  read), ``z`` as for a valid row. Otherwise ``ce = lse - x[label]`` and
  ``z = coef * lse^2``, exactly 0 when ``coef == 0`` (even for lse = +-inf/NaN).
* backward, from the saved ``lse`` and fp32 ``g_ce``, ``g_z``: ignored row:
  zeros. Label outside [0, V): a row of NaN. Otherwise with ``t = x - lse``,
  ``p = exp(t)``, ``zs = 2 * coef * lse * g_z`` (exactly 0 when ``coef == 0``):
  ``d_j = (g_ce + zs) * p_j`` and ``d_label = g_ce * expm1(t_label) + zs *
  p_label``. ``expm1``, not ``p - 1``: near p = 1 an fp32 ``p - 1`` is a
  multiple of 2^-24 (6% off at p = 1 - 1e-6), ``expm1(t)`` is within an ulp
  or two of its own value (the saved lse is still rounded to an ulp of lse,
  which bounds how well t itself is known). The gradient is rounded once, to
  ``out``'s dtype (any float dtype, independent of the logits'; ``out`` may be
  the logits themselves).

Tiling: a program holds ``ROWS x BLOCK`` logits at once (``tile_for``): one row
and BLOCK = 4096 columns at the vocabulary of OLMo 2 (100352), up to 16 rows of
a narrow vocabulary. The same tiling runs everywhere, the Triton interpreter
included; the tests use small inputs, not other tiles.

Filling the GPU: with one program per row, a chunk of the fused linear
cross-entropy (256 rows at OLMo 2 1B and 8192 tokens) launches 256 programs
of 100352 logits each: a quarter of one wave (a wave: 132 SMs x 8 resident
programs of 8 warps, the forward's 32 registers, ``scripts/aot_check.py``).
An SM then runs one or two programs (16 of its 64 warps at most), each with
one 4096-logit tile (16 kB in fp32) in flight at a time and 25 such tiles in
sequence: the pass costs 25 memory round trips plus the exp work of two
programs. When the row programs number fewer than ``TARGET_PROGRAMS_PER_SM``
(32: four such waves) per SM (``_triton.sm_count``), each row's vocabulary is
split across ``S`` programs (``vocab_split``), in whole blocks, so that every
SM holds 8 programs (8 tiles in flight) and the last wave's tail is at most a
quarter of the work:

* forward: program (row, s) streams its slice once with the online
  log-sum-exp and writes an fp32 partial (max, sum of exp) into an (N, S)
  workspace; ``_cross_entropy_fwd_combine_kernel`` merges the S partials of
  each row into lse, ce and z (8*S bytes per row written and read again,
  200 bytes at S = 25, against 200 kB (bf16) to 400 kB (fp32) of logits per
  row). Each logit is still read once; with S = 1 the row kernel writes lse,
  ce and z itself (no workspace, one launch).
* backward: no reduction, so a (rows, S) grid: each program writes the
  gradient of its slice. Each logit is read once and written once (the
  target logit, read a second time by its slice's program, excepted).

Programs and waves (H100: 132 SMs; V = 100352; the same grid forward and
backward; waves at the forward's 8 resident programs per SM; the backward
holds 4-8 (30-64 registers by GPU and Triton version), hence up to twice as
many of its own waves; the last slice of a row is the shorter one):

==================================  ========================  =================================
case                                before: programs (waves)  after: S, programs (waves)
==================================  ========================  =================================
linear CE 1B, N 8192 (chunk 256)    256 (0.24)                25 x 1 block: 6400 (6.06)
linear CE 1B, N 16384 (chunk 512)   512 (0.48)                9 x 3 blocks: 4608 (4.36)
linear CE 7B, N 8192 (chunk 512)    512 (0.48)                9 x 3 blocks: 4608 (4.36)
linear CE 7B, N 16384 (chunk 1024)  1024 (0.97)               5 x 5 blocks: 5120 (4.85)
cross_entropy, N 8192               8192 (7.76)               1: 8192 (7.76), unchanged
==================================  ========================  =================================

Traffic: forward reads N*V logits once; backward reads them once and writes
N*V gradients. The reduction (``mean``/``sum``/``none``) is applied outside the
custom op in plain torch, so the backward always receives per-token upstream
gradients, whatever the reduction and whatever the caller backpropagates.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _compiled, _validate, reference
from ._triton import as_rows, next_power_of_2, sm_count, tl, triton

OP = "cross_entropy"

# --------------------------------------------------------------------------- tiling
# Columns a program holds at once. The vocabulary (100352 for OLMo 2) is
# streamed through blocks of this size, never held whole.
MAX_BLOCK = 4096
# Elements (rows x columns) a program holds at once, and the most rows: a row
# of MAX_BLOCK or more columns gets a program of its own; narrower ones share.
TILE_ELEMENTS = 4096
MAX_ROWS = 16
# Warps per tile (elements, at least): untuned, kept from the first version. At
# 4096 elements and 8 warps a thread holds 16 logits. scripts/aot_check.py at
# OLMo 2 1B/7B sizes: forward 32-48 registers (5-8 resident programs per SM),
# backward 30-64 (4-8), no spills, sm_90 and sm_80, Triton 3.6 and 3.9.
WARPS = ((4096, 8), (1024, 4), (0, 2))
# Programs per SM the row kernels aim for before splitting the vocabulary:
# four waves of 8 resident programs (8 warps each fill an SM's 64 warps).
TARGET_PROGRAMS_PER_SM = 32
# The most vocabulary slices of a row (the combine kernel holds a row's
# partials at once: up to 256 x 4096 = 1M columns per row in single blocks).
MAX_SLICES = 256
# Elements of the partials the combine kernel holds at once.
COMBINE_TILE = 1024


def warps_for(elements: int) -> int:
    return next(warps for limit, warps in WARPS if elements >= limit)


def tile_for(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(rows, columns) of the tile a program holds at once.

    Columns: the vocabulary rounded up to a power of two, at most MAX_BLOCK (a
    longer row is streamed through). Rows: as many as fit TILE_ELEMENTS, at
    most MAX_ROWS and no more than the rows there are: one row per program
    once V >= MAX_BLOCK.
    """
    block = min(next_power_of_2(n_cols), MAX_BLOCK)
    rows = min(MAX_ROWS, TILE_ELEMENTS // block, next_power_of_2(n_rows))
    return max(rows, 1), block


def vocab_split(row_programs: int, n_cols: int, block: int, device: torch.device) -> tuple[int, int]:
    """(slices, columns per slice) of each row's vocabulary: one program per
    (row tile, slice).

    One slice when the row programs alone reach TARGET_PROGRAMS_PER_SM per SM
    (or a row is one block). Otherwise slices of whole blocks, the widest that
    still give the target: ``blocks_per_slice = floor(row_programs * blocks /
    target)`` (at least 1), so ``programs >= target`` whenever there are that
    many blocks in all.
    """
    blocks = -(-n_cols // block)
    target = TARGET_PROGRAMS_PER_SM * sm_count(device)
    if blocks == 1 or row_programs >= target:
        return 1, blocks * block
    per_slice = max(1, row_programs * blocks // target, -(-blocks // MAX_SLICES))
    return -(-blocks // per_slice), per_slice * block


def combine_tile(n_rows: int, slices: int) -> tuple[int, int]:
    """(rows, padded slices) the combine kernel holds at once."""
    width = next_power_of_2(slices)
    return max(1, min(COMBINE_TILE // width, next_power_of_2(n_rows))), width


# --------------------------------------------------------------------------- kernels
if triton is not None:

    # Kernel style: helpers that run per program or per block are written
    # inline (the online log-sum-exp's reference below appears three times):
    # under the interpreter every call of a jit function costs a few ms, about
    # ten operations' worth. Row values are (ROWS,) blocks even at ROWS = 1:
    # Triton 3.9's interpreter cannot combine a scalar comparison with a block
    # mask ("mask has unsupported dtype").

    @triton.jit
    def _expm1(t):
        """exp(t) - 1 in fp32 for t <= ln 2 (the kernels' t = x - lse <= 0):
        within 1.6 ulp of float64 under the interpreter (numpy's exp); on a GPU
        the exp branch inherits the error of its exp (ex2.approx).

        |t| < ln 2: the Taylor series to t^9 / 9! (Horner; the first term left
        out is below ln(2)^9 / 10! = 1.0e-8 of the result, a sixth of an ulp).
        Elsewhere exp(t) - 1 loses nothing to cancellation: for t <= -ln 2,
        exp(t) <= 1/2 and |exp(t) - 1| >= 1/2 has an ulp at least as large as
        exp(t)'s. Kahan's (u - 1) * t / log(u), u = exp(t), was measured at up
        to 5 ulp here (four roundings; on a GPU Triton's fp32 division is
        div.full, itself up to 2 ulp), and the series needs neither log nor
        division.
        """
        s = tl.minimum(tl.maximum(t, -0.6931471805599453), 0.6931471805599453)
        poly = 2.755731922398589e-06  # 1/9!
        poly = poly * s + 2.48015873015873e-05  # 1/8!
        poly = poly * s + 1.984126984126984e-04  # 1/7!
        poly = poly * s + 1.3888888888888889e-03  # 1/6!
        poly = poly * s + 8.333333333333333e-03  # 1/5!
        poly = poly * s + 4.1666666666666664e-02  # 1/4!
        poly = poly * s + 1.6666666666666666e-01  # 1/3!
        poly = poly * s + 0.5
        # t + t^2 * (1/2 + t/6 + ...): the leading term exact, the rounding
        # errors of the sum confined to the smaller rest.
        return tl.where(tl.abs(t) < 0.6931471805599453, s + s * (s * poly), tl.exp(t) - 1.0)

    @triton.jit
    def _finish_forward(
        LOGITS, LABELS, CE, Z, LSE, rows, src, row_mask, ref, s,
        stride_row, n_cols, ignore_index, z_loss_coef, HAS_Z: tl.constexpr,
    ):
        """lse, ce and z of rows ``rows`` from the sum ``s`` of exp(x - ref)."""
        lse = ref + tl.log(s)
        label = tl.load(LABELS + src)
        valid = label != ignore_index
        in_range = (label >= 0) & (label < n_cols)
        # Masked: an out-of-range label is never read; its token gets NaN.
        target = tl.load(LOGITS + src * stride_row + label, mask=valid & in_range, other=0.0).to(tl.float32)
        ce = tl.where(in_range, lse - target, float("nan"))
        tl.store(CE + rows, tl.where(valid, ce, 0.0), mask=row_mask)
        if HAS_Z:
            z = tl.where(valid, z_loss_coef * lse * lse, 0.0)
        else:
            z = tl.full(lse.shape, 0.0, tl.float32)  # not 0 * lse^2: NaN at lse = +-inf
        tl.store(Z + rows, z, mask=row_mask)
        tl.store(LSE + rows, lse, mask=row_mask)

    @triton.jit
    def _cross_entropy_fwd_kernel(
        LOGITS, LABELS, CE, Z, LSE, PART_M, PART_S,
        stride_row, n_rows, n_cols, slice_cols, ignore_index, z_loss_coef,
        ROWS: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr, HAS_Z: tl.constexpr,
    ):
        """Program (i, s): rows [i*ROWS, (i+1)*ROWS), columns of slice s. With
        SPLIT, writes the slice's partial (max, sum of exp) per row; else (one
        slice) lse, ce and z."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        # Rows past the end (last program) recompute the last row; nothing of
        # theirs is stored. Loads stay in bounds and values finite.
        src = tl.minimum(rows, n_rows - 1)
        base = LOGITS + src[:, None] * stride_row
        col_start = tl.program_id(1) * slice_cols
        col_stop = tl.minimum(col_start + slice_cols, n_cols)
        cols = tl.arange(0, BLOCK)
        # Online log-sum-exp per row: running max m and sum s of exp(x - ref),
        # ref the running max, or 0 where it is +-inf, so that exp never sees
        # inf - inf. All -inf: s = 0 and lse = 0 + log(0) = -inf; a +inf: s and
        # lse are +inf; a NaN makes s NaN.
        m = tl.full((ROWS,), float("-inf"), tl.float32)
        ref = tl.full((ROWS,), 0.0, tl.float32)
        s = tl.full((ROWS,), 0.0, tl.float32)
        for start in range(col_start, col_stop, BLOCK):
            offs = start + cols
            x = tl.load(base + offs[None, :], mask=offs[None, :] < col_stop, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            ref = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)
            s = s * tl.exp(m - ref) + tl.sum(tl.exp(x - ref[:, None]), axis=1)
            m = m_new
        if SPLIT:
            part = rows * tl.num_programs(1) + tl.program_id(1)
            tl.store(PART_M + part, m, mask=row_mask)
            tl.store(PART_S + part, s, mask=row_mask)
        else:
            _finish_forward(
                LOGITS, LABELS, CE, Z, LSE, rows, src, row_mask, ref, s,
                stride_row, n_cols, ignore_index, z_loss_coef, HAS_Z,
            )

    @triton.jit
    def _cross_entropy_fwd_combine_kernel(
        LOGITS, LABELS, CE, Z, LSE, PART_M, PART_S,
        stride_row, n_rows, n_cols, n_slices, ignore_index, z_loss_coef,
        ROWS: tl.constexpr, SLICES: tl.constexpr, HAS_Z: tl.constexpr,
    ):
        """Merges the (max, sum) partials of each row's slices: the same update
        as one step of the online log-sum-exp, so every case of +-inf and NaN
        comes out as with one slice."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        src = tl.minimum(rows, n_rows - 1)
        slices = tl.arange(0, SLICES)
        part = src[:, None] * n_slices + slices[None, :]
        part_mask = slices[None, :] < n_slices
        m_part = tl.load(PART_M + part, mask=part_mask, other=float("-inf"))
        s_part = tl.load(PART_S + part, mask=part_mask, other=0.0)
        m = tl.max(m_part, axis=1)
        ref = tl.where(tl.abs(m) == float("inf"), 0.0, m)
        s = tl.sum(s_part * tl.exp(m_part - ref[:, None]), axis=1)
        _finish_forward(
            LOGITS, LABELS, CE, Z, LSE, rows, src, row_mask, ref, s,
            stride_row, n_cols, ignore_index, z_loss_coef, HAS_Z,
        )

    @triton.jit
    def _cross_entropy_bwd_kernel(
        LOGITS, LABELS, LSE, GRAD_CE, GRAD_Z, DLOGITS,
        stride_row, stride_out, n_rows, n_cols, slice_cols, ignore_index, z_loss_coef,
        ROWS: tl.constexpr, BLOCK: tl.constexpr, HAS_Z: tl.constexpr,
    ):
        """Program (i, s): the gradient of rows [i*ROWS, (i+1)*ROWS), columns of slice s."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        src = tl.minimum(rows, n_rows - 1)  # as in the forward: nothing stored for rows past the end
        base = LOGITS + src[:, None] * stride_row
        out = DLOGITS + rows[:, None] * stride_out
        col_start = tl.program_id(1) * slice_cols
        col_stop = tl.minimum(col_start + slice_cols, n_cols)
        cols = tl.arange(0, BLOCK)
        label = tl.load(LABELS + src)
        valid = label != ignore_index
        in_range = (label >= 0) & (label < n_cols)
        computed = valid & in_range
        lse = tl.load(LSE + src)
        g_ce = tl.load(GRAD_CE + src)
        # The target entry, from the one program whose slice holds it (which
        # reads it before overwriting it when DLOGITS is LOGITS).
        owns_label = computed & (label >= col_start) & (label < col_stop)
        x_label = tl.load(LOGITS + src * stride_row + label, mask=owns_label, other=0.0).to(tl.float32)
        t_label = tl.where(owns_label, x_label - lse, 0.0)
        if HAS_Z:
            # d(coef * lse^2)/dx = 2 * coef * lse * softmax
            z_scale = 2.0 * z_loss_coef * lse * tl.load(GRAD_Z + src)
            g_p = g_ce + z_scale
            d_label = g_ce * _expm1(t_label) + z_scale * tl.exp(t_label)
        else:
            g_p = g_ce
            d_label = g_ce * _expm1(t_label)
        # Rows without the formula read nothing and get fill * exp(0 - 0): zeros
        # when ignored, NaN for an out-of-range label. One select per element.
        fill = tl.where(valid, float("nan"), 0.0)
        g_p = tl.where(computed, g_p, fill)
        d_label = tl.where(computed, d_label, fill)
        lse = tl.where(computed, lse, 0.0)
        for start in range(col_start, col_stop, BLOCK):
            offs = start + cols
            col_mask = offs[None, :] < col_stop
            x = tl.load(base + offs[None, :], mask=col_mask & computed[:, None], other=0.0).to(tl.float32)
            p = tl.exp(x - lse[:, None])
            d = tl.where(offs[None, :] == label[:, None], d_label[:, None], g_p[:, None] * p)
            # In place (DLOGITS == LOGITS) is safe: each tile is read before it is written.
            tl.store(out + offs[None, :], d.to(DLOGITS.dtype.element_ty), mask=row_mask[:, None] & col_mask)

    _backend.register_triton(OP)


# --------------------------------------------------------------------------- launchers
def _fwd_triton(logits: Tensor, labels: Tensor, ignore_index: int, z_loss_coef: float) -> tuple[Tensor, Tensor, Tensor]:
    """logits (N, V) with unit column stride; labels (N,) int64 contiguous.

    Returns per-token fp32 ``ce``, ``z`` and ``lse`` (the contract in the
    module docstring).
    """
    n_rows, n_cols = logits.shape
    ce, z, lse = (torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(3))
    if n_rows == 0:
        return ce, z, lse
    rows, block = tile_for(n_rows, n_cols)
    row_programs = triton.cdiv(n_rows, rows)
    slices, slice_cols = vocab_split(row_programs, n_cols, block, logits.device)
    has_z = z_loss_coef != 0.0
    # Partial (max, sum) per row and slice; unused (never read) with one slice.
    part = torch.empty((2, n_rows, slices), dtype=torch.float32, device=logits.device) if slices > 1 else None
    part_m, part_s = (part[0], part[1]) if part is not None else (lse, lse)
    _cross_entropy_fwd_kernel[(row_programs, slices)](
        logits, labels, ce, z, lse, part_m, part_s,
        logits.stride(0), n_rows, n_cols, slice_cols, ignore_index, z_loss_coef,
        ROWS=rows, BLOCK=block, SPLIT=slices > 1, HAS_Z=has_z, num_warps=warps_for(rows * block),
    )
    if slices > 1:
        combine_rows, width = combine_tile(n_rows, slices)
        _cross_entropy_fwd_combine_kernel[(triton.cdiv(n_rows, combine_rows),)](
            logits, labels, ce, z, lse, part_m, part_s,
            logits.stride(0), n_rows, n_cols, slices, ignore_index, z_loss_coef,
            ROWS=combine_rows, SLICES=width, HAS_Z=has_z, num_warps=warps_for(combine_rows * width),
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
    """dlogits (N, V) (the contract in the module docstring).

    grad_ce/grad_z/lse are (N,) fp32 contiguous. Written into ``out`` when given
    (which may be ``logits`` itself; unit column stride), else into a new
    contiguous tensor of logits' dtype. ``out`` may have another float dtype
    than ``logits`` (e.g. fp32 logits, bf16 gradient): rounded once, to
    ``out``'s dtype.
    """
    n_rows, n_cols = logits.shape
    if out is None:
        out = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return out
    rows, block = tile_for(n_rows, n_cols)
    row_programs = triton.cdiv(n_rows, rows)
    slices, slice_cols = vocab_split(row_programs, n_cols, block, logits.device)
    _cross_entropy_bwd_kernel[(row_programs, slices)](
        logits, labels, lse, grad_ce, grad_z, out,
        logits.stride(0), out.stride(0), n_rows, n_cols, slice_cols, ignore_index, z_loss_coef,
        ROWS=rows, BLOCK=block, HAS_Z=z_loss_coef != 0.0, num_warps=warps_for(rows * block),
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
