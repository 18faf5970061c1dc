// Arguments of every kernel, as plain structs: raw pointers, int64 sizes and
// row strides (in elements), dtype codes. Shared by the CPU and CUDA launchers
// and filled by the bindings; nothing here knows about torch or CUDA.
//
// Layout assumptions (checked by olmo2_kernels/_compiled.py and the bindings):
// matrices are (rows, cols) with unit stride along cols and the given row
// stride; vectors (weights, rstd, lse, labels) are contiguous.
#pragma once

#include <cstdint>

namespace olmo2 {

// y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) per row.
struct RmsNormFwdParams {
  const void* x;
  int64_t x_stride;
  const void* w;
  void* y;
  int64_t y_stride;
  float* rstd;
  int64_t rows, cols;
  float eps;
  int x_dtype, w_dtype;  // y has x's dtype
};

// dx (x's dtype) and dw (w's dtype, accumulated in fp32). The CUDA launcher
// needs `partial`: an fp32 workspace of n_partials x cols (one row per block).
struct RmsNormBwdParams {
  const void* dy;
  int64_t dy_stride;
  const void* x;
  int64_t x_stride;
  const void* w;
  const float* rstd;
  void* dx;
  int64_t dx_stride;
  void* dw;
  float* partial;
  int64_t n_partials;
  int64_t rows, cols;
  int x_dtype, w_dtype;  // dy and dx have x's dtype
};

// RMSNorm over the whole row (cols = heads * head_dim), then rotate_half RoPE
// on each head with cos/sin (seq_len, head_dim) fp32 rows at position row % seq_len.
struct NormRopeFwdParams {
  const void* x;
  int64_t x_stride;
  const void* w;
  const float* cos;
  const float* sin;
  void* y;
  int64_t y_stride;
  float* rstd;
  int64_t rows, cols, seq_len, head_dim;
  float eps;
  int x_dtype, w_dtype;
};

struct NormRopeBwdParams {
  const void* dy;
  int64_t dy_stride;
  const void* x;
  int64_t x_stride;
  const void* w;
  const float* rstd;
  const float* cos;
  const float* sin;
  void* dx;
  int64_t dx_stride;
  void* dw;
  float* partial;
  int64_t n_partials;
  int64_t rows, cols, seq_len, head_dim;
  int x_dtype, w_dtype;
};

// Cross-entropy rows: what each row's ce, z, lse and gradient are (ignored
// rows, out-of-range labels, infinite and NaN logits, z_coef = 0) is the "Row
// contract" of cross_entropy in olmo2_kernels/reference.py, which the CPU,
// CUDA and Triton kernels all follow.
struct CrossEntropyFwdParams {
  const void* logits;
  int64_t logits_stride;
  const int64_t* labels;
  float* ce;
  float* z;
  float* lse;
  int64_t rows, vocab;
  int64_t ignore_index;
  float z_coef;
  int dtype;
};

// The logits' gradient under the same contract. `out` has its own dtype (each
// element rounded once from fp32) and may be `logits` itself when dtype and
// row stride are equal. grad strides may be 0 (a broadcast scalar).
struct CrossEntropyBwdParams {
  const void* logits;
  int64_t logits_stride;
  const int64_t* labels;
  const float* lse;
  const float* grad_ce;
  int64_t grad_ce_stride;
  const float* grad_z;
  int64_t grad_z_stride;
  void* out;
  int64_t out_stride;
  int64_t rows, vocab;
  int64_t ignore_index;
  float z_coef;
  int dtype;      // of logits
  int out_dtype;  // of out: any float dtype, independent of the logits'
};

// y = silu(gate) * up.
struct SwigluFwdParams {
  const void* gate;
  int64_t gate_stride;
  const void* up;
  int64_t up_stride;
  void* y;
  int64_t y_stride;
  int64_t rows, cols;
  int dtype;
};

// dgate = dy * up * silu'(gate), dup = dy * silu(gate).
struct SwigluBwdParams {
  const void* dy;
  int64_t dy_stride;
  const void* gate;
  int64_t gate_stride;
  const void* up;
  int64_t up_stride;
  void* dgate;
  int64_t dgate_stride;
  void* dup;
  int64_t dup_stride;
  int64_t rows, cols;
  int dtype;
};

}  // namespace olmo2
