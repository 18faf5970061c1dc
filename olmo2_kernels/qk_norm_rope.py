"""Fused QK-norm + rotary embedding, as OLMo 2 applies them.

RMSNorm over the whole q projection (width ``Hq * head_dim``) and over the whole
k projection (``Hk * head_dim``; Hk may be smaller: GQA), then the
non-interleaved ("rotate_half") rotary embedding on every head. Inputs keep
their (..., T, H*head_dim) layout; outputs have the input shapes. The spec is
:func:`olmo2_kernels.reference.qk_norm_rope`.

Layers, top to bottom: ``rope_cos_sin``; Triton kernels; launchers; the
``torch.library`` custom ops (forward and backward, with fake implementations)
and their autograd registration; the functional API.

One kernel pass per projection and direction. A program owns one row (one
token of q or of k) and holds it as a (heads, head_dim / 2) tile per half, so
rotate_half pairs element ``j`` of the first half with element ``j`` of the
second half of the same head without reloading anything. The forward saves the
per-row fp32 ``rstd``. The backward applies the transpose of the rotation to
the incoming gradient, then the RMSNorm backward over the whole row; the weight
gradient is summed in fp32, one partial per program over a contiguous block of
rows, and the partials are summed in a second pass: no atomics, no bf16
accumulation. cos and sin are read as fp32 tables (the spec rotates in fp32)
and receive no gradient.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backend, _compiled, _validate, reference
from ._triton import (
    RESIDENT_BWD_WIDTH,
    RESIDENT_FWD_WIDTH,
    as_rows,
    next_power_of_2,
    reduction_programs,
    tl,
    triton,
    warps_for,
)

OP = "qk_norm_rope"


def rope_cos_sin(
    positions: int | Tensor,
    head_dim: int,
    theta: float = 500_000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """cos and sin tables, each (T, head_dim), for the rotary embedding.

    ``positions`` is a sequence length T (positions 0..T-1) or a 1-D tensor of
    positions (e.g. ``arange(past, past + T)`` during generation). Computed in
    fp32 exactly as Hugging Face's ``Olmo2RotaryEmbedding`` does (then cast to
    ``dtype``), so logits match ``transformers`` bit for bit in fp32.
    """
    if isinstance(positions, int):
        positions = torch.arange(positions, device=device)
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope_cos_sin: head_dim must be a positive even int, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    inv_freq = inv_freq.to(positions.device)
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# --------------------------------------------------------------------------- kernels
# A row of H heads is held as two tiles of (heads, head_dim / 2) per half: the
# first BLOCK_H heads (the largest power of two <= H) and the rest, padded to
# BLOCK_H2 (0 when H is a power of two). 40 heads (13B, 32B) are 32 + 8 heads
# with no padding, where one tile of 64 heads would mask 37.5% of its lanes.
if triton is not None:

    @triton.jit
    def _heads(head0, n_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """Offsets of the first halves of heads [head0, head0 + BLOCK_H) in a row, and their mask."""
        head = head0 + tl.arange(0, BLOCK_H)[:, None]
        j = tl.arange(0, BLOCK_HALF)[None, :]
        lo = head * (2 * HALF) + j  # first half of every head; its partner is HALF further
        return lo, (head < n_heads) & (j < HALF)

    @triton.jit
    def _rope_table(COS, SIN, position, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """cos and sin of both halves at ``position``, (1, BLOCK_HALF) each, fp32."""
        j = tl.arange(0, BLOCK_HALF)[None, :]
        table = position * (2 * HALF) + j
        in_half = j < HALF
        c1 = tl.load(COS + table, mask=in_half, other=0.0).to(tl.float32)
        c2 = tl.load(COS + table + HALF, mask=in_half, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + table, mask=in_half, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + table + HALF, mask=in_half, other=0.0).to(tl.float32)
        return c1, c2, s1, s2

    @triton.jit
    def _norm_rope_store(Y_ROW, W, lo, mask, x1, x2, rstd, c1, c2, s1, s2, HALF: tl.constexpr):
        w1 = tl.load(W + lo, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(W + lo + HALF, mask=mask, other=0.0).to(tl.float32)
        n1 = x1 * rstd * w1
        n2 = x2 * rstd * w2
        # out = n * cos + rotate_half(n) * sin with rotate_half(n) = (-n2, n1)
        tl.store(Y_ROW + lo, (n1 * c1 - n2 * s1).to(Y_ROW.dtype.element_ty), mask=mask)
        tl.store(Y_ROW + lo + HALF, (n2 * c2 + n1 * s2).to(Y_ROW.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_rope_fwd_kernel(
        X, W, COS, SIN, Y, RSTD,
        stride_x, stride_y, seq_len, n_heads, eps,
        HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_H2: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        n_cols = n_heads * (2 * HALF)
        x_row = X + row * stride_x
        y_row = Y + row * stride_y
        lo, mask = _heads(0, n_heads, HALF, BLOCK_H, BLOCK_HALF)
        x1 = tl.load(x_row + lo, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + lo + HALF, mask=mask, other=0.0).to(tl.float32)
        sum_sq = tl.sum(x1 * x1 + x2 * x2)
        if BLOCK_H2 > 0:
            lo_b, mask_b = _heads(BLOCK_H, n_heads, HALF, BLOCK_H2, BLOCK_HALF)
            x1_b = tl.load(x_row + lo_b, mask=mask_b, other=0.0).to(tl.float32)
            x2_b = tl.load(x_row + lo_b + HALF, mask=mask_b, other=0.0).to(tl.float32)
            sum_sq += tl.sum(x1_b * x1_b + x2_b * x2_b)
        rstd = 1.0 / tl.sqrt(sum_sq / n_cols + eps)
        c1, c2, s1, s2 = _rope_table(COS, SIN, row % seq_len, HALF, BLOCK_HALF)
        _norm_rope_store(y_row, W, lo, mask, x1, x2, rstd, c1, c2, s1, s2, HALF)
        if BLOCK_H2 > 0:
            _norm_rope_store(y_row, W, lo_b, mask_b, x1_b, x2_b, rstd, c1, c2, s1, s2, HALF)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _norm_rope_bwd_load(DY_ROW, X_ROW, W, lo, mask, rstd, c1, c2, s1, s2, HALF: tl.constexpr):
        """(xhat, g) of both halves of a tile: the normalized input and the gradient
        w.r.t. it before the norm (the rotation transposed, times the weight)."""
        dy1 = tl.load(DY_ROW + lo, mask=mask, other=0.0).to(tl.float32)
        dy2 = tl.load(DY_ROW + lo + HALF, mask=mask, other=0.0).to(tl.float32)
        # gradient w.r.t. the normalized value: the transpose of the rotation
        dn1 = dy1 * c1 + dy2 * s2
        dn2 = dy2 * c2 - dy1 * s1
        xhat1 = tl.load(X_ROW + lo, mask=mask, other=0.0).to(tl.float32) * rstd
        xhat2 = tl.load(X_ROW + lo + HALF, mask=mask, other=0.0).to(tl.float32) * rstd
        # w is re-read per row (an L1 hit) rather than held across the row loop: fewer live registers.
        w1 = tl.load(W + lo, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(W + lo + HALF, mask=mask, other=0.0).to(tl.float32)
        return xhat1, xhat2, dn1, dn2, dn1 * w1, dn2 * w2

    @triton.jit
    def _norm_rope_bwd_kernel(
        DY, X, W, RSTD, COS, SIN, DX, DW_PARTIAL,
        stride_dy, stride_x, stride_dx, n_rows, seq_len, n_heads, rows_per_program,
        HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_H2: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n_cols = n_heads * (2 * HALF)
        lo, mask = _heads(0, n_heads, HALF, BLOCK_H, BLOCK_HALF)
        dw1 = tl.zeros((BLOCK_H, BLOCK_HALF), dtype=tl.float32)
        dw2 = tl.zeros((BLOCK_H, BLOCK_HALF), dtype=tl.float32)
        if BLOCK_H2 > 0:
            lo_b, mask_b = _heads(BLOCK_H, n_heads, HALF, BLOCK_H2, BLOCK_HALF)
            dw1_b = tl.zeros((BLOCK_H2, BLOCK_HALF), dtype=tl.float32)
            dw2_b = tl.zeros((BLOCK_H2, BLOCK_HALF), dtype=tl.float32)
        row_start = pid.to(tl.int64) * rows_per_program
        row_stop = tl.minimum(row_start + rows_per_program, n_rows)
        for row in range(row_start, row_stop):
            dy_row = DY + row * stride_dy
            x_row = X + row * stride_x
            dx_row = DX + row * stride_dx
            rstd = tl.load(RSTD + row)
            c1, c2, s1, s2 = _rope_table(COS, SIN, row % seq_len, HALF, BLOCK_HALF)
            xhat1, xhat2, dn1, dn2, g1, g2 = _norm_rope_bwd_load(
                dy_row, x_row, W, lo, mask, rstd, c1, c2, s1, s2, HALF
            )
            dot = tl.sum(xhat1 * g1 + xhat2 * g2)
            if BLOCK_H2 > 0:
                xhat1_b, xhat2_b, dn1_b, dn2_b, g1_b, g2_b = _norm_rope_bwd_load(
                    dy_row, x_row, W, lo_b, mask_b, rstd, c1, c2, s1, s2, HALF
                )
                dot += tl.sum(xhat1_b * g1_b + xhat2_b * g2_b)
            c = dot / n_cols
            tl.store(dx_row + lo, ((g1 - xhat1 * c) * rstd).to(DX.dtype.element_ty), mask=mask)
            tl.store(dx_row + lo + HALF, ((g2 - xhat2 * c) * rstd).to(DX.dtype.element_ty), mask=mask)
            dw1 += dn1 * xhat1
            dw2 += dn2 * xhat2
            if BLOCK_H2 > 0:
                tl.store(dx_row + lo_b, ((g1_b - xhat1_b * c) * rstd).to(DX.dtype.element_ty), mask=mask_b)
                tl.store(dx_row + lo_b + HALF, ((g2_b - xhat2_b * c) * rstd).to(DX.dtype.element_ty), mask=mask_b)
                dw1_b += dn1_b * xhat1_b
                dw2_b += dn2_b * xhat2_b
        partial = DW_PARTIAL + pid.to(tl.int64) * n_cols
        tl.store(partial + lo, dw1, mask=mask)
        tl.store(partial + lo + HALF, dw2, mask=mask)
        if BLOCK_H2 > 0:
            tl.store(partial + lo_b, dw1_b, mask=mask_b)
            tl.store(partial + lo_b + HALF, dw2_b, mask=mask_b)

    _backend.register_triton(OP)


# --------------------------------------------------------------------------- launchers
def _tile(width: int, head_dim: int, limit: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_H2, BLOCK_HALF): the two per-half tiles of heads x
    head_dim/2 that hold a row, and their total elements within ``limit``."""
    n_heads = width // head_dim
    block_half = next_power_of_2(head_dim // 2)
    block_h = 1 << (n_heads.bit_length() - 1)  # the largest power of two <= n_heads
    block_h2 = next_power_of_2(n_heads - block_h) if n_heads > block_h else 0
    elements = 2 * (block_h + block_h2) * block_half
    if elements > limit:
        raise ValueError(
            f"{OP}: a row of {n_heads} heads of head_dim {head_dim} takes a {elements}-element tile; the "
            f"fused kernel holds at most {limit} in registers (wider would spill): apply rms_norm and RoPE separately"
        )
    return block_h, block_h2, block_half


def _fwd_triton(
    x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, head_dim: int, eps: float
) -> tuple[Tensor, Tensor]:
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, rstd
    block_h, block_h2, block_half = _tile(n_cols, head_dim, RESIDENT_FWD_WIDTH)
    _norm_rope_fwd_kernel[(n_rows,)](
        x, weight, cos, sin, y, rstd,
        x.stride(0), y.stride(0), cos.shape[0], n_cols // head_dim, eps,
        HALF=head_dim // 2, BLOCK_H=block_h, BLOCK_H2=block_h2, BLOCK_HALF=block_half,
        num_warps=warps_for(2 * (block_h + block_h2) * block_half, 8),
    )
    return y, rstd


def _bwd_triton(
    dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, cos: Tensor, sin: Tensor, head_dim: int
) -> tuple[Tensor, Tensor]:
    n_rows, n_cols = x.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return dx, torch.zeros_like(weight)
    block_h, block_h2, block_half = _tile(n_cols, head_dim, RESIDENT_BWD_WIDTH)
    programs = reduction_programs(n_rows, x.device)
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    _norm_rope_bwd_kernel[(programs,)](
        dy, x, weight, rstd, cos, sin, dx, partial,
        dy.stride(0), x.stride(0), dx.stride(0), n_rows, cos.shape[0], n_cols // head_dim, rows_per_program,
        HALF=head_dim // 2, BLOCK_H=block_h, BLOCK_H2=block_h2, BLOCK_HALF=block_half,
        num_warps=warps_for(2 * (block_h + block_h2) * block_half, 4),
    )
    return dx, partial.sum(0).to(weight.dtype)


_FWD = {"triton": _fwd_triton, "cpu": _compiled.norm_rope_fwd, "cuda": _compiled.norm_rope_fwd}
_BWD = {"triton": _bwd_triton, "cpu": _compiled.norm_rope_bwd, "cuda": _compiled.norm_rope_bwd}


# --------------------------------------------------------------------------- custom ops
def _n_rows(x: Tensor) -> int:
    return math.prod(x.shape[:-1])


def _table(t: Tensor) -> Tensor:
    """cos or sin as every backend takes it: fp32 (the spec rotates in fp32), contiguous."""
    return t.to(torch.float32).contiguous()


@torch.library.custom_op("olmo2_kernels::qk_norm_rope_fwd", mutates_args=())
def qk_norm_rope_fwd(
    q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
    head_dim: int, eps: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``q_out``, ``k_out`` (shapes and dtype of q, k) and the per-row fp32 ``rstd`` of each."""
    cos, sin = _table(cos), _table(sin)
    fwd = _FWD[backend]
    q_out, q_rstd = fwd(as_rows(q), q_weight.contiguous(), cos, sin, head_dim, eps)
    k_out, k_rstd = fwd(as_rows(k), k_weight.contiguous(), cos, sin, head_dim, eps)
    return q_out.view(q.shape), k_out.view(k.shape), q_rstd, k_rstd


@qk_norm_rope_fwd.register_fake
def _(q, k, q_weight, k_weight, cos, sin, head_dim, eps, backend):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        q.new_empty(_n_rows(q), dtype=torch.float32),
        k.new_empty(_n_rows(k), dtype=torch.float32),
    )


@torch.library.custom_op("olmo2_kernels::qk_norm_rope_bwd", mutates_args=())
def qk_norm_rope_bwd(
    dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor,
    q_rstd: Tensor, k_rstd: Tensor, cos: Tensor, sin: Tensor, head_dim: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``dq``, ``dk`` (shapes and dtype of q, k) and ``dq_weight``, ``dk_weight`` (dtypes of the weights)."""
    cos, sin = _table(cos), _table(sin)
    bwd = _BWD[backend]
    dq, dqw = bwd(as_rows(dq_out), as_rows(q), q_weight.contiguous(), q_rstd, cos, sin, head_dim)
    dk, dkw = bwd(as_rows(dk_out), as_rows(k), k_weight.contiguous(), k_rstd, cos, sin, head_dim)
    return dq.view(q.shape), dk.view(k.shape), dqw, dkw


@qk_norm_rope_bwd.register_fake
def _(dq_out, dk_out, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, head_dim, backend):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(q_weight, memory_format=torch.contiguous_format),
        torch.empty_like(k_weight, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output) -> None:
    q, k, q_weight, k_weight, cos, sin, head_dim, _eps, backend = inputs
    _q_out, _k_out, q_rstd, k_rstd = output
    ctx.save_for_backward(q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin)
    ctx.head_dim = head_dim
    ctx.backend = backend


def _backward(ctx, dq_out: Tensor, dk_out: Tensor, _dq_rstd, _dk_rstd):
    q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin = ctx.saved_tensors
    if dq_out is None:
        dq_out = torch.zeros_like(q)
    if dk_out is None:
        dk_out = torch.zeros_like(k)
    dq, dk, dqw, dkw = qk_norm_rope_bwd(
        dq_out, dk_out, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, ctx.head_dim, ctx.backend
    )
    return dq, dk, dqw, dkw, None, None, None, None, None


qk_norm_rope_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- functional API
def _check(q, k, q_weight, k_weight, cos, sin, head_dim, eps) -> float:
    _validate.tensor(OP, "q", q, min_ndim=2)
    _validate.tensor(OP, "k", k, min_ndim=2)
    if k.dtype != q.dtype:
        raise TypeError(f"{OP}: k must have the dtype of q ({q.dtype}), got {k.dtype}")
    _validate.tensor(OP, "q_weight", q_weight)
    _validate.tensor(OP, "k_weight", k_weight)
    _validate.tensor(OP, "cos", cos)
    _validate.tensor(OP, "sin", sin)
    _validate.same_device(OP, q=q, k=k, q_weight=q_weight, k_weight=k_weight, cos=cos, sin=sin)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"{OP}: head_dim must be a positive even int, got {head_dim!r}")
    if q.shape[:-1] != k.shape[:-1]:
        raise ValueError(
            f"{OP}: q and k must agree on all dims but the last (..., T); "
            f"got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    for name, t in (("q", q), ("k", k)):
        if t.shape[-1] == 0 or t.shape[-1] % head_dim:
            raise ValueError(
                f"{OP}: the last dim of {name} ({t.shape[-1]}) must be a positive multiple of head_dim ({head_dim})"
            )
    _validate.shape(OP, "q_weight", q_weight, (q.shape[-1],), "the last dim of q")
    _validate.shape(OP, "k_weight", k_weight, (k.shape[-1],), "the last dim of k")
    seq_len = q.shape[-2]
    _validate.shape(OP, "cos", cos, (seq_len, head_dim), "(T, head_dim) with T = q.shape[-2]")
    _validate.shape(OP, "sin", sin, (seq_len, head_dim), "(T, head_dim) with T = q.shape[-2]")
    return _validate.positive_float(OP, "eps", eps)


def qk_norm_rope(
    q: Tensor,
    k: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    cos: Tensor,
    sin: Tensor,
    head_dim: int,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Normalize q and k over their whole last dim, then rotate every head.

    q: (..., T, Hq*head_dim), k: (..., T, Hk*head_dim), weights of the same
    last dims, cos/sin: (T, head_dim) (see :func:`rope_cos_sin`). Returns
    ``(q_out, k_out)`` with the input shapes and dtype. Statistics, the weight
    product and the rotation are computed in fp32 with one rounding at the
    end. q and k may be strided views (e.g. slices of a fused qkv projection).
    cos and sin receive no gradient.
    """
    eps = _check(q, k, q_weight, k_weight, cos, sin, head_dim, eps)
    backend = _backend.resolve(OP, q.device, q.dtype)
    if backend == "torch":
        return reference.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, head_dim, eps)
    q_out, k_out, _, _ = qk_norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, head_dim, eps, backend)
    return q_out, k_out
