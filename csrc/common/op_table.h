// The op table: the one definition of every kernel entry point of the
// extension. Everything else on the C++ side is generated from it:
//
//   common/params.h         the parameter structs (fields in this order)
//   common/param_layout.h   their layout (name, type, offset of each field),
//                           _C.param_layouts() and the CUDA emulation's ctypes mirror
//   bindings/checks.h       check(const Params&) from the rules of each field
//   bindings/ops.h          the pybind11 functions of `_C.cpu` and `_C.cuda`,
//                           keyword-only arguments named after the fields (+ stream)
//   bindings/module.cpp     the CPU and CUDA forwarders, capabilities()["ops"]
//   cpu/isa.h, kernels.h,   the CPU declarations (per ISA and dispatching) and
//   cpu/dispatch.cpp        the forwarders to the active ISA
//   cuda/launchers.h        the CUDA declarations
//   cuda/emulation.cpp      the C interface of the CUDA emulation for tests
//
// A kernel entry point is a row of OLMO2_OPS:
//   X(kernel, Params, FIELDS, doc)
// and FIELDS(F) lists the struct's fields, one per line:
//   F(type, name, rule, ...)
// type: const void* / void* (data in a dtype given by a dtype code), float* /
// const float* / const int64_t* (data of that type), int64_t (sizes, strides
// in elements), float, int (dtype codes). Pointers cross to Python as integer
// addresses (tensor.data_ptr()), floats as Python floats.
// rules: what the bindings check before any kernel runs (bindings/checks.h),
// one or more per field, with `p` the struct:
//   matrix(stride, rows, cols)  a (rows, cols) matrix, unit column stride, row stride `stride`
//   row_stride()                the row stride of a matrix (checked with it)
//   needed_if(cond)             a pointer that must not be null when cond holds
//   count()                     a size or stride >= 0
//   dtype_code()                a dtype code of common/dtype.h
//   any_value()                 nothing to check (eps, ignore_index, ...)
//   rope_head_dim(cols), positive_if_rows(rows), same_layout_if_alias_of(...)
//                               the relations of a few ops (bindings/checks.h)
//
// Layout assumptions: matrices are (rows, cols) with unit stride along cols and
// the given row stride; vectors (weights, rstd, lse, labels) are contiguous.
// Nothing here knows about torch or CUDA.
#pragma once

#include <cstdint>

// ---- rms_norm -----------------------------------------------------------------------------
// y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) per row. y has x's dtype.
#define OLMO2_RMS_NORM_FWD_FIELDS(F)                              \
  F(const void*, x, matrix(p.x_stride, p.rows, p.cols))           \
  F(int64_t, x_stride, row_stride())                              \
  F(const void*, w, needed_if(p.rows > 0 && p.cols > 0))          \
  F(void*, y, matrix(p.y_stride, p.rows, p.cols))                 \
  F(int64_t, y_stride, row_stride())                              \
  F(float*, rstd, needed_if(p.rows > 0))                          \
  F(int64_t, rows, count())                                       \
  F(int64_t, cols, count())                                       \
  F(float, eps, any_value())                                      \
  F(int, x_dtype, dtype_code())                                   \
  F(int, w_dtype, dtype_code())

// dx (x's dtype) and dw (w's dtype, accumulated in fp32); dy has x's dtype. The
// CUDA launcher needs `partial`: an fp32 workspace of n_partials x cols,
// n_partials >= 1 (one row per block); the CPU kernels ignore it.
#define OLMO2_RMS_NORM_BWD_FIELDS(F)                              \
  F(const void*, dy, matrix(p.dy_stride, p.rows, p.cols))         \
  F(int64_t, dy_stride, row_stride())                             \
  F(const void*, x, matrix(p.x_stride, p.rows, p.cols))           \
  F(int64_t, x_stride, row_stride())                              \
  F(const void*, w, needed_if(p.rows > 0 && p.cols > 0))          \
  F(const float*, rstd, needed_if(p.rows > 0))                    \
  F(void*, dx, matrix(p.dx_stride, p.rows, p.cols))               \
  F(int64_t, dx_stride, row_stride())                             \
  F(void*, dw, needed_if(p.cols > 0))                             \
  F(float*, partial, any_value())                                 \
  F(int64_t, n_partials, count())                                 \
  F(int64_t, rows, count())                                       \
  F(int64_t, cols, count())                                       \
  F(int, x_dtype, dtype_code())                                   \
  F(int, w_dtype, dtype_code())

// ---- qk_norm_rope (one projection: q or k) --------------------------------------------------
// RMSNorm over the whole row (cols = heads * head_dim), then rotate_half RoPE
// on each head with cos/sin (seq_len, head_dim) fp32 rows at position row % seq_len.
#define OLMO2_NORM_ROPE_FWD_FIELDS(F)                             \
  F(const void*, x, matrix(p.x_stride, p.rows, p.cols))           \
  F(int64_t, x_stride, row_stride())                              \
  F(const void*, w, needed_if(p.rows > 0 && p.cols > 0))          \
  F(const float*, cos, needed_if(p.rows > 0 && p.cols > 0))       \
  F(const float*, sin, needed_if(p.rows > 0 && p.cols > 0))       \
  F(void*, y, matrix(p.y_stride, p.rows, p.cols))                 \
  F(int64_t, y_stride, row_stride())                              \
  F(float*, rstd, needed_if(p.rows > 0))                          \
  F(int64_t, rows, count())                                       \
  F(int64_t, cols, count())                                       \
  F(int64_t, seq_len, count(), positive_if_rows(p.rows))          \
  F(int64_t, head_dim, rope_head_dim(p.cols))                     \
  F(float, eps, any_value())                                      \
  F(int, x_dtype, dtype_code())                                   \
  F(int, w_dtype, dtype_code())

#define OLMO2_NORM_ROPE_BWD_FIELDS(F)                             \
  F(const void*, dy, matrix(p.dy_stride, p.rows, p.cols))         \
  F(int64_t, dy_stride, row_stride())                             \
  F(const void*, x, matrix(p.x_stride, p.rows, p.cols))           \
  F(int64_t, x_stride, row_stride())                              \
  F(const void*, w, needed_if(p.rows > 0 && p.cols > 0))          \
  F(const float*, rstd, needed_if(p.rows > 0))                    \
  F(const float*, cos, needed_if(p.rows > 0 && p.cols > 0))       \
  F(const float*, sin, needed_if(p.rows > 0 && p.cols > 0))       \
  F(void*, dx, matrix(p.dx_stride, p.rows, p.cols))               \
  F(int64_t, dx_stride, row_stride())                             \
  F(void*, dw, needed_if(p.cols > 0))                             \
  F(float*, partial, any_value())                                 \
  F(int64_t, n_partials, count())                                 \
  F(int64_t, rows, count())                                       \
  F(int64_t, cols, count())                                       \
  F(int64_t, seq_len, count(), positive_if_rows(p.rows))          \
  F(int64_t, head_dim, rope_head_dim(p.cols))                     \
  F(int, x_dtype, dtype_code())                                   \
  F(int, w_dtype, dtype_code())

// ---- cross_entropy (also the row kernels of linear_cross_entropy) ---------------------------
// What each row's ce, z, lse and gradient are (ignored rows, out-of-range
// labels, infinite and NaN logits, z_coef = 0) is the "Row contract" of
// cross_entropy in olmo2_kernels/reference.py, which the CPU, CUDA and Triton
// kernels all follow. dtype: the logits'.
#define OLMO2_CROSS_ENTROPY_FWD_FIELDS(F)                          \
  F(const void*, logits, matrix(p.logits_stride, p.rows, p.vocab)) \
  F(int64_t, logits_stride, row_stride())                          \
  F(const int64_t*, labels, needed_if(p.rows > 0))                 \
  F(float*, ce, needed_if(p.rows > 0))                             \
  F(float*, z, needed_if(p.rows > 0))                              \
  F(float*, lse, needed_if(p.rows > 0))                            \
  F(int64_t, rows, count())                                        \
  F(int64_t, vocab, count())                                       \
  F(int64_t, ignore_index, any_value())                            \
  F(float, z_coef, any_value())                                    \
  F(int, dtype, dtype_code())

// The logits' gradient under the same contract. `out` has its own dtype
// (out_dtype: each element rounded once from fp32) and may be `logits` itself
// when dtype and row stride are equal. grad strides may be 0 (a broadcast scalar).
#define OLMO2_CROSS_ENTROPY_BWD_FIELDS(F)                                                         \
  F(const void*, logits, matrix(p.logits_stride, p.rows, p.vocab))                                \
  F(int64_t, logits_stride, row_stride())                                                         \
  F(const int64_t*, labels, needed_if(p.rows > 0))                                                \
  F(const float*, lse, needed_if(p.rows > 0))                                                     \
  F(const float*, grad_ce, needed_if(p.rows > 0))                                                 \
  F(int64_t, grad_ce_stride, count())                                                             \
  F(const float*, grad_z, needed_if(p.rows > 0))                                                  \
  F(int64_t, grad_z_stride, count())                                                              \
  F(void*, out, matrix(p.out_stride, p.rows, p.vocab),                                            \
    same_layout_if_alias_of("logits", p.logits, p.logits_stride, p.dtype, p.out_stride, p.out_dtype)) \
  F(int64_t, out_stride, row_stride())                                                            \
  F(int64_t, rows, count())                                                                       \
  F(int64_t, vocab, count())                                                                      \
  F(int64_t, ignore_index, any_value())                                                           \
  F(float, z_coef, any_value())                                                                   \
  F(int, dtype, dtype_code())                                                                     \
  F(int, out_dtype, dtype_code())

// ---- swiglu -------------------------------------------------------------------------------
// y = silu(gate) * up; every operand in `dtype`.
#define OLMO2_SWIGLU_FWD_FIELDS(F)                                \
  F(const void*, gate, matrix(p.gate_stride, p.rows, p.cols))     \
  F(int64_t, gate_stride, row_stride())                           \
  F(const void*, up, matrix(p.up_stride, p.rows, p.cols))         \
  F(int64_t, up_stride, row_stride())                             \
  F(void*, y, matrix(p.y_stride, p.rows, p.cols))                 \
  F(int64_t, y_stride, row_stride())                              \
  F(int64_t, rows, count())                                       \
  F(int64_t, cols, count())                                       \
  F(int, dtype, dtype_code())

// dgate = dy * up * silu'(gate), dup = dy * silu(gate).
#define OLMO2_SWIGLU_BWD_FIELDS(F)                                \
  F(const void*, dy, matrix(p.dy_stride, p.rows, p.cols))         \
  F(int64_t, dy_stride, row_stride())                             \
  F(const void*, gate, matrix(p.gate_stride, p.rows, p.cols))     \
  F(int64_t, gate_stride, row_stride())                           \
  F(const void*, up, matrix(p.up_stride, p.rows, p.cols))         \
  F(int64_t, up_stride, row_stride())                             \
  F(void*, dgate, matrix(p.dgate_stride, p.rows, p.cols))         \
  F(int64_t, dgate_stride, row_stride())                          \
  F(void*, dup, matrix(p.dup_stride, p.rows, p.cols))             \
  F(int64_t, dup_stride, row_stride())                            \
  F(int64_t, rows, count())                                       \
  F(int64_t, cols, count())                                       \
  F(int, dtype, dtype_code())

// ---- the entry points ---------------------------------------------------------------------
// X(kernel, Params, FIELDS, doc): `kernel` names the function in olmo2::cpu,
// olmo2::cuda and the `_C.cpu`/`_C.cuda` submodules; doc is its Python docstring.
#define OLMO2_OPS(X)                                                                                     \
  X(rms_norm_fwd, RmsNormFwdParams, OLMO2_RMS_NORM_FWD_FIELDS, "RMSNorm forward: y and the per-row fp32 rstd") \
  X(rms_norm_bwd, RmsNormBwdParams, OLMO2_RMS_NORM_BWD_FIELDS,                                           \
    "RMSNorm backward: dx and dweight (partial: fp32 n_partials x cols workspace, CUDA only)")           \
  X(norm_rope_fwd, NormRopeFwdParams, OLMO2_NORM_ROPE_FWD_FIELDS,                                        \
    "RMSNorm over each row, then rotate_half RoPE per head (cos/sin fp32 (seq_len, head_dim))")         \
  X(norm_rope_bwd, NormRopeBwdParams, OLMO2_NORM_ROPE_BWD_FIELDS, "Backward of norm_rope_fwd: dx and dweight") \
  X(cross_entropy_fwd, CrossEntropyFwdParams, OLMO2_CROSS_ENTROPY_FWD_FIELDS,                            \
    "Per-row cross-entropy, z-loss and log-sum-exp (fp32); labels int64")                               \
  X(cross_entropy_bwd, CrossEntropyBwdParams, OLMO2_CROSS_ENTROPY_BWD_FIELDS,                            \
    "Gradient of the logits into out of any float dtype (out may be the logits buffer when dtype and "  \
    "stride match)")                                                                                     \
  X(swiglu_fwd, SwigluFwdParams, OLMO2_SWIGLU_FWD_FIELDS, "y = silu(gate) * up")                         \
  X(swiglu_bwd, SwigluBwdParams, OLMO2_SWIGLU_BWD_FIELDS, "dgate and dup of swiglu_fwd")

// The public ops (olmo2_kernels op modules) that these kernels back, listed in
// capabilities()["ops"]. linear_cross_entropy runs on the cross-entropy row
// kernels plus torch matmuls.
#define OLMO2_PUBLIC_OPS(X) X(rms_norm) X(qk_norm_rope) X(cross_entropy) X(linear_cross_entropy) X(swiglu)
