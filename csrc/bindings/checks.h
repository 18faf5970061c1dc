// Argument checks the bindings run before any kernel: the Python side already
// lays tensors out correctly, so these only catch impossible arguments (an
// unknown dtype code, a negative size, a null pointer with work to do, a row
// stride shorter than a row) with a ValueError instead of a crash in a kernel.
#pragma once

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "common/dtype.h"
#include "common/params.h"

namespace olmo2::bindings {

[[noreturn]] inline void fail(const std::string& op, const std::string& msg) {
  throw std::invalid_argument(op + ": " + msg);
}

inline void check_dtype(const char* op, const char* name, int code) {
  if (!valid_dtype_code(code))
    fail(op, std::string(name) + " must be a dtype code 0 (float32), 1 (bfloat16) or 2 (float16), got " +
                 std::to_string(code));
}

inline void check_size(const char* op, const char* name, int64_t v) {
  if (v < 0) fail(op, std::string(name) + " must be >= 0, got " + std::to_string(v));
}

inline void check_ptr(const char* op, const char* name, const void* ptr, bool needed) {
  if (needed && ptr == nullptr) fail(op, std::string(name) + " is a null pointer");
}

// A (rows, cols) matrix with unit column stride and row stride `stride`.
inline void check_matrix(const char* op, const char* name, const void* ptr, int64_t stride, int64_t rows,
                         int64_t cols) {
  const bool nonempty = rows > 0 && cols > 0;
  check_ptr(op, name, ptr, nonempty);
  if (stride < 0) fail(op, std::string(name) + ": row stride must be >= 0, got " + std::to_string(stride));
  if (rows > 1 && stride < cols)
    fail(op, std::string(name) + ": row stride " + std::to_string(stride) + " is shorter than a row (" +
                 std::to_string(cols) + " elements)");
  if (nonempty && stride > 0 && rows - 1 > (std::numeric_limits<int64_t>::max() - cols) / stride)
    fail(op, std::string(name) + ": rows x row stride overflows int64");
}

inline void check_rows_cols(const char* op, int64_t rows, int64_t cols) {
  check_size(op, "rows", rows);
  check_size(op, "cols", cols);
}

inline void check(const RmsNormFwdParams& p) {
  const char* op = "rms_norm_fwd";
  check_dtype(op, "x dtype", p.x_dtype);
  check_dtype(op, "weight dtype", p.w_dtype);
  check_rows_cols(op, p.rows, p.cols);
  check_matrix(op, "x", p.x, p.x_stride, p.rows, p.cols);
  check_matrix(op, "y", p.y, p.y_stride, p.rows, p.cols);
  check_ptr(op, "weight", p.w, p.rows > 0 && p.cols > 0);
  check_ptr(op, "rstd", p.rstd, p.rows > 0);
}

inline void check(const RmsNormBwdParams& p) {
  const char* op = "rms_norm_bwd";
  check_dtype(op, "x dtype", p.x_dtype);
  check_dtype(op, "weight dtype", p.w_dtype);
  check_rows_cols(op, p.rows, p.cols);
  check_matrix(op, "dy", p.dy, p.dy_stride, p.rows, p.cols);
  check_matrix(op, "x", p.x, p.x_stride, p.rows, p.cols);
  check_matrix(op, "dx", p.dx, p.dx_stride, p.rows, p.cols);
  check_ptr(op, "weight", p.w, p.rows > 0 && p.cols > 0);
  check_ptr(op, "rstd", p.rstd, p.rows > 0);
  check_ptr(op, "dweight", p.dw, p.cols > 0);
  check_size(op, "n_partials", p.n_partials);
}

inline void check_heads(const char* op, int64_t rows, int64_t cols, int64_t seq_len, int64_t head_dim) {
  if (head_dim <= 0 || head_dim % 2)
    fail(op, "head_dim must be a positive even number, got " + std::to_string(head_dim));
  if (cols % head_dim)
    fail(op, "cols (" + std::to_string(cols) + ") must be a multiple of head_dim (" + std::to_string(head_dim) + ")");
  check_size(op, "seq_len", seq_len);
  if (rows > 0 && seq_len == 0) fail(op, "seq_len must be > 0 when there are rows");
}

inline void check(const NormRopeFwdParams& p) {
  const char* op = "norm_rope_fwd";
  check_dtype(op, "x dtype", p.x_dtype);
  check_dtype(op, "weight dtype", p.w_dtype);
  check_rows_cols(op, p.rows, p.cols);
  check_heads(op, p.rows, p.cols, p.seq_len, p.head_dim);
  check_matrix(op, "x", p.x, p.x_stride, p.rows, p.cols);
  check_matrix(op, "y", p.y, p.y_stride, p.rows, p.cols);
  const bool work = p.rows > 0 && p.cols > 0;
  check_ptr(op, "weight", p.w, work);
  check_ptr(op, "cos", p.cos, work);
  check_ptr(op, "sin", p.sin, work);
  check_ptr(op, "rstd", p.rstd, p.rows > 0);
}

inline void check(const NormRopeBwdParams& p) {
  const char* op = "norm_rope_bwd";
  check_dtype(op, "x dtype", p.x_dtype);
  check_dtype(op, "weight dtype", p.w_dtype);
  check_rows_cols(op, p.rows, p.cols);
  check_heads(op, p.rows, p.cols, p.seq_len, p.head_dim);
  check_matrix(op, "dy", p.dy, p.dy_stride, p.rows, p.cols);
  check_matrix(op, "x", p.x, p.x_stride, p.rows, p.cols);
  check_matrix(op, "dx", p.dx, p.dx_stride, p.rows, p.cols);
  const bool work = p.rows > 0 && p.cols > 0;
  check_ptr(op, "weight", p.w, work);
  check_ptr(op, "cos", p.cos, work);
  check_ptr(op, "sin", p.sin, work);
  check_ptr(op, "rstd", p.rstd, p.rows > 0);
  check_ptr(op, "dweight", p.dw, p.cols > 0);
  check_size(op, "n_partials", p.n_partials);
}

inline void check(const CrossEntropyFwdParams& p) {
  const char* op = "cross_entropy_fwd";
  check_dtype(op, "logits dtype", p.dtype);
  check_size(op, "rows", p.rows);
  check_size(op, "vocab", p.vocab);
  check_matrix(op, "logits", p.logits, p.logits_stride, p.rows, p.vocab);
  check_ptr(op, "labels", p.labels, p.rows > 0);
  check_ptr(op, "ce", p.ce, p.rows > 0);
  check_ptr(op, "z", p.z, p.rows > 0);
  check_ptr(op, "lse", p.lse, p.rows > 0);
}

inline void check(const CrossEntropyBwdParams& p) {
  const char* op = "cross_entropy_bwd";
  check_dtype(op, "logits dtype", p.dtype);
  check_dtype(op, "out dtype", p.out_dtype);
  check_size(op, "rows", p.rows);
  check_size(op, "vocab", p.vocab);
  check_matrix(op, "logits", p.logits, p.logits_stride, p.rows, p.vocab);
  check_matrix(op, "out", p.out, p.out_stride, p.rows, p.vocab);
  check_ptr(op, "labels", p.labels, p.rows > 0);
  check_ptr(op, "lse", p.lse, p.rows > 0);
  check_ptr(op, "grad_ce", p.grad_ce, p.rows > 0);
  check_ptr(op, "grad_z", p.grad_z, p.rows > 0);
  check_size(op, "grad_ce stride", p.grad_ce_stride);
  check_size(op, "grad_z stride", p.grad_z_stride);
  if (p.out == p.logits && p.out_stride != p.logits_stride)
    fail(op, "out aliases logits with a different row stride");
  if (p.out == p.logits && p.out_dtype != p.dtype)
    fail(op, "out aliases logits with a different dtype (code " + std::to_string(p.out_dtype) + " vs " +
                 std::to_string(p.dtype) + ")");
}

inline void check(const SwigluFwdParams& p) {
  const char* op = "swiglu_fwd";
  check_dtype(op, "dtype", p.dtype);
  check_rows_cols(op, p.rows, p.cols);
  check_matrix(op, "gate", p.gate, p.gate_stride, p.rows, p.cols);
  check_matrix(op, "up", p.up, p.up_stride, p.rows, p.cols);
  check_matrix(op, "y", p.y, p.y_stride, p.rows, p.cols);
}

inline void check(const SwigluBwdParams& p) {
  const char* op = "swiglu_bwd";
  check_dtype(op, "dtype", p.dtype);
  check_rows_cols(op, p.rows, p.cols);
  check_matrix(op, "dy", p.dy, p.dy_stride, p.rows, p.cols);
  check_matrix(op, "gate", p.gate, p.gate_stride, p.rows, p.cols);
  check_matrix(op, "up", p.up, p.up_stride, p.rows, p.cols);
  check_matrix(op, "dgate", p.dgate, p.dgate_stride, p.rows, p.cols);
  check_matrix(op, "dup", p.dup, p.dup_stride, p.rows, p.cols);
}

}  // namespace olmo2::bindings
