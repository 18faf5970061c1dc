// SwiGLU on CPU: y = silu(gate) * up, and its two gradients, elementwise in fp32.
//
// Work is split into chunks of one row segment each; when every operand is
// contiguous the matrix is treated as one long row so that short rows still
// split evenly over threads.
#include <initializer_list>

#include "cpu/kernels.h"
#include "cpu/numeric.h"
#include "cpu/parallel.h"

namespace olmo2::cpu::OLMO2_CPU_ISA {
namespace {

constexpr int64_t kSegment = 1 << 14;

inline float sigmoid(float g) { return 1.0f / (1.0f + exp_f32(-g)); }

// Calls fn(row, col_begin, col_end) over all (row, segment) pairs in parallel.
template <typename Fn>
void for_segments(int64_t rows, int64_t cols, Fn&& fn) {
  if (rows <= 0 || cols <= 0) return;
  const int64_t per_row = (cols + kSegment - 1) / kSegment;
  const int64_t tasks = rows * per_row;
  const int64_t work_per_task = cols < kSegment ? cols : kSegment;
  parallel_ranges(tasks, threads_for(tasks, work_per_task), [&](int64_t t0, int64_t t1, int) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = t / per_row;
      const int64_t c0 = (t % per_row) * kSegment;
      fn(row, c0, std::min(cols, c0 + kSegment));
    }
  });
}

inline bool dense(int64_t rows, int64_t cols, std::initializer_list<int64_t> strides) {
  if (rows <= 1) return true;
  for (int64_t s : strides)
    if (s != cols) return false;
  return true;
}

template <typename T>
void fwd(const SwigluFwdParams& p) {
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* y = static_cast<T*>(p.y);
  int64_t rows = p.rows, cols = p.cols;
  if (dense(rows, cols, {p.gate_stride, p.up_stride, p.y_stride})) {
    cols *= rows;
    rows = rows > 0 ? 1 : 0;
  }
  for_segments(rows, cols, [&](int64_t r, int64_t c0, int64_t c1) {
    const T* gr = gate + r * p.gate_stride;
    const T* ur = up + r * p.up_stride;
    T* yr = y + r * p.y_stride;
#pragma omp simd
    for (int64_t j = c0; j < c1; ++j) {
      const float g = to_float(gr[j]);
      yr[j] = from_float<T>(g * sigmoid(g) * to_float(ur[j]));
    }
  });
}

template <typename T>
void bwd(const SwigluBwdParams& p) {
  const T* dy = static_cast<const T*>(p.dy);
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* dgate = static_cast<T*>(p.dgate);
  T* dup = static_cast<T*>(p.dup);
  int64_t rows = p.rows, cols = p.cols;
  if (dense(rows, cols, {p.dy_stride, p.gate_stride, p.up_stride, p.dgate_stride, p.dup_stride})) {
    cols *= rows;
    rows = rows > 0 ? 1 : 0;
  }
  for_segments(rows, cols, [&](int64_t r, int64_t c0, int64_t c1) {
    const T* dyr = dy + r * p.dy_stride;
    const T* gr = gate + r * p.gate_stride;
    const T* ur = up + r * p.up_stride;
    T* dgr = dgate + r * p.dgate_stride;
    T* dur = dup + r * p.dup_stride;
#pragma omp simd
    for (int64_t j = c0; j < c1; ++j) {
      const float d = to_float(dyr[j]);
      const float g = to_float(gr[j]);
      const float u = to_float(ur[j]);
      const float s = sigmoid(g);
      // silu'(g) = s * (1 + g * (1 - s))
      dgr[j] = from_float<T>(d * u * (s * (1.0f + g * (1.0f - s))));
      dur[j] = from_float<T>(d * (g * s));
    }
  });
}

}  // namespace

void swiglu_fwd(const SwigluFwdParams& p) {
  dispatch_dtype(p.dtype, "swiglu_fwd", [&](auto t) { fwd<decltype(t)>(p); });
}

void swiglu_bwd(const SwigluBwdParams& p) {
  dispatch_dtype(p.dtype, "swiglu_bwd", [&](auto t) { bwd<decltype(t)>(p); });
}

void cast(const void* src, int src_dtype, void* dst, int dst_dtype, int64_t n) {
  dispatch_dtype(src_dtype, "cast: src", [&](auto st) {
    dispatch_dtype(dst_dtype, "cast: dst", [&](auto dt) {
      using S = decltype(st);
      using D = decltype(dt);
      const S* s = static_cast<const S*>(src);
      D* d = static_cast<D*>(dst);
      parallel_ranges(n, threads_for(n, 1), [&](int64_t i0, int64_t i1, int) {
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) d[i] = from_float<D>(to_float(s[i]));
      });
    });
  });
}

}  // namespace olmo2::cpu::OLMO2_CPU_ISA
