// Argument checks the bindings run before any kernel: the Python side already
// lays tensors out correctly, so these only catch impossible arguments (an
// unknown dtype code, a negative size, a null pointer with work to do, a row
// stride shorter than a row) with a ValueError instead of a crash in a kernel.
//
// check(const Params&) is generated from the rules that the op table
// (common/op_table.h) gives each field, applied field by field in the table's
// order; an error names the op and the field (the keyword argument).
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
// Negative sizes are left to their own count() rule.
inline void check_matrix(const char* op, const char* name, const void* ptr, int64_t stride, int64_t rows,
                         int64_t cols) {
  if (rows < 0 || cols < 0) return;
  const bool nonempty = rows > 0 && cols > 0;
  check_ptr(op, name, ptr, nonempty);
  if (stride < 0) fail(op, std::string(name) + ": row stride must be >= 0, got " + std::to_string(stride));
  if (rows > 1 && stride < cols)
    fail(op, std::string(name) + ": row stride " + std::to_string(stride) + " is shorter than a row (" +
                 std::to_string(cols) + " elements)");
  if (nonempty && stride > 0 && rows - 1 > (std::numeric_limits<int64_t>::max() - cols) / stride)
    fail(op, std::string(name) + ": rows x row stride overflows int64");
}

// ---- the rules of the op table --------------------------------------------------------------
// Each is a function object called with (op, field name, field value).
namespace rules {

struct AnyValue {
  template <typename V>
  void operator()(const char*, const char*, V) const {}
};
inline AnyValue any_value() { return {}; }
// A row stride is checked by the matrix() rule of its pointer.
inline AnyValue row_stride() { return {}; }

struct Count {
  void operator()(const char* op, const char* name, int64_t v) const { check_size(op, name, v); }
};
inline Count count() { return {}; }

struct DtypeCode {
  void operator()(const char* op, const char* name, int code) const { check_dtype(op, name, code); }
};
inline DtypeCode dtype_code() { return {}; }

struct NeededIf {
  bool needed;
  void operator()(const char* op, const char* name, const void* ptr) const { check_ptr(op, name, ptr, needed); }
};
inline NeededIf needed_if(bool needed) { return {needed}; }

struct Matrix {
  int64_t stride, rows, cols;
  void operator()(const char* op, const char* name, const void* ptr) const {
    check_matrix(op, name, ptr, stride, rows, cols);
  }
};
inline Matrix matrix(int64_t stride, int64_t rows, int64_t cols) { return {stride, rows, cols}; }

// seq_len: each row needs a position.
struct PositiveIfRows {
  int64_t rows;
  void operator()(const char* op, const char* name, int64_t v) const {
    if (rows > 0 && v == 0) fail(op, std::string(name) + " must be > 0 when there are rows");
  }
};
inline PositiveIfRows positive_if_rows(int64_t rows) { return {rows}; }

// head_dim: a positive even number (rotate_half pairs its halves) dividing the row.
struct RopeHeadDim {
  int64_t cols;
  void operator()(const char* op, const char* name, int64_t head_dim) const {
    if (head_dim <= 0 || head_dim % 2)
      fail(op, std::string(name) + " must be a positive even number, got " + std::to_string(head_dim));
    if (cols > 0 && cols % head_dim)
      fail(op, "cols (" + std::to_string(cols) + ") must be a multiple of " + name + " (" +
                   std::to_string(head_dim) + ")");
  }
};
inline RopeHeadDim rope_head_dim(int64_t cols) { return {cols}; }

// An output that may be an input buffer itself, but then with its row stride and dtype.
struct SameLayoutIfAlias {
  const char* other_name;
  const void* other;
  int64_t other_stride;
  int other_dtype;
  int64_t stride;
  int dtype;
  void operator()(const char* op, const char* name, const void* ptr) const {
    if (ptr != other) return;
    if (stride != other_stride)
      fail(op, std::string(name) + " aliases " + other_name + " with a different row stride");
    if (dtype != other_dtype)
      fail(op, std::string(name) + " aliases " + other_name + " with a different dtype (code " +
                   std::to_string(dtype) + " vs " + std::to_string(other_dtype) + ")");
  }
};
inline SameLayoutIfAlias same_layout_if_alias_of(const char* other_name, const void* other, int64_t other_stride,
                                                 int other_dtype, int64_t stride, int dtype) {
  return {other_name, other, other_stride, other_dtype, stride, dtype};
}

}  // namespace rules

template <typename V, typename... Rules>
inline void check_field(const char* op, const char* name, V value, const Rules&... field_rules) {
  (field_rules(op, name, value), ...);
}

// check(const Params& p) per entry point of the table.
#define OLMO2_CHECK_FIELD(type, name, ...) check_field(op, #name, p.name, __VA_ARGS__);
#define OLMO2_DEFINE_CHECK(kernel, Params, FIELDS, doc) \
  inline void check(const Params& p) {                  \
    using namespace rules;                              \
    const char* op = #kernel;                           \
    FIELDS(OLMO2_CHECK_FIELD)                           \
  }
OLMO2_OPS(OLMO2_DEFINE_CHECK)
#undef OLMO2_DEFINE_CHECK
#undef OLMO2_CHECK_FIELD

}  // namespace olmo2::bindings
