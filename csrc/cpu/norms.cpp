// RMSNorm and the fused QK-norm + rotary embedding on CPU.
//
// One thread owns a contiguous block of rows. The weight gradient is summed per
// thread into an fp32 partial row, then the partial rows are added in thread
// order (deterministic for a given thread count, no atomics).
#include <cmath>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/numeric.h"
#include "cpu/parallel.h"

namespace olmo2::cpu::OLMO2_CPU_ISA {
namespace {

template <typename T>
inline float sum_squares(const T* x, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    const float v = to_float(x[j]);
    acc += v * v;
  }
  return acc;
}

inline float rstd_of(float sum_sq, int64_t cols, float eps) {
  return 1.0f / std::sqrt(sum_sq / static_cast<float>(cols) + eps);
}

// dx = rstd * (g*w - xhat * mean(g*w*xhat)) and dw_partial += g * xhat, where g
// is the gradient w.r.t. the normalized-and-weighted row (dy for RMSNorm).
template <typename T, typename W, typename G>
inline void rms_row_backward(const G* g, const T* x, const W* w, float rstd, int64_t cols, T* dx,
                             float* dw_partial) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < cols; ++j) {
    dot += to_float(g[j]) * to_float(w[j]) * (to_float(x[j]) * rstd);
  }
  const float mean = dot / static_cast<float>(cols);
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) {
    const float gj = to_float(g[j]);
    const float xhat = to_float(x[j]) * rstd;
    dx[j] = from_float<T>((gj * to_float(w[j]) - xhat * mean) * rstd);
    dw_partial[j] += gj * xhat;
  }
}

// dw[j] = sum over threads of partial[t][j], in thread order.
template <typename W>
void reduce_partials(const std::vector<float>& partial, int threads, int64_t cols, W* dw) {
  const int reduce_threads = threads_for(cols, threads);
  parallel_ranges(cols, reduce_threads, [&](int64_t c0, int64_t c1, int) {
    for (int64_t j = c0; j < c1; ++j) {
      float acc = 0.0f;
      for (int t = 0; t < threads; ++t) acc += partial[static_cast<size_t>(t) * cols + j];
      dw[j] = from_float<W>(acc);
    }
  });
}

// ---- RMSNorm ------------------------------------------------------------------------
template <typename T, typename W>
void rms_fwd(const RmsNormFwdParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const W* w = static_cast<const W*>(p.w);
  T* y = static_cast<T*>(p.y);
  const int64_t cols = p.cols;
  parallel_ranges(p.rows, threads_for(p.rows, cols), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * p.x_stride;
      T* yr = y + r * p.y_stride;
      const float rstd = rstd_of(sum_squares(xr, cols), cols, p.eps);
      p.rstd[r] = rstd;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) yr[j] = from_float<T>(to_float(xr[j]) * rstd * to_float(w[j]));
    }
  });
}

template <typename T, typename W>
void rms_bwd(const RmsNormBwdParams& p) {
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const W* w = static_cast<const W*>(p.w);
  T* dx = static_cast<T*>(p.dx);
  const int64_t cols = p.cols;
  const int threads = threads_for(p.rows, cols);
  std::vector<float> partial(static_cast<size_t>(threads) * cols, 0.0f);
  parallel_ranges(p.rows, threads, [&](int64_t r0, int64_t r1, int t) {
    float* mine = partial.data() + static_cast<size_t>(t) * cols;
    for (int64_t r = r0; r < r1; ++r) {
      rms_row_backward(dy + r * p.dy_stride, x + r * p.x_stride, w, p.rstd[r], cols, dx + r * p.dx_stride, mine);
    }
  });
  reduce_partials(partial, threads, cols, static_cast<W*>(p.dw));
}

// ---- QK-norm + RoPE -----------------------------------------------------------------
// y = n * cos + rotate_half(n) * sin per head, rotate_half(n) = cat(-n2, n1).
template <typename T>
inline void rotate_heads(const float* n, const float* cos, const float* sin, int64_t cols, int64_t head_dim, T* y) {
  const int64_t half = head_dim / 2;
  for (int64_t base = 0; base < cols; base += head_dim) {
    const float* n1 = n + base;
    const float* n2 = n1 + half;
    T* y1 = y + base;
    T* y2 = y1 + half;
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      y1[j] = from_float<T>(n1[j] * cos[j] - n2[j] * sin[j]);
      y2[j] = from_float<T>(n2[j] * cos[half + j] + n1[j] * sin[half + j]);
    }
  }
}

// The transpose: g = dy * cos + rotate_half^T(dy * sin), rotate_half^T(v) = cat(v2, -v1).
template <typename T>
inline void unrotate_heads(const T* dy, const float* cos, const float* sin, int64_t cols, int64_t head_dim, float* g) {
  const int64_t half = head_dim / 2;
  for (int64_t base = 0; base < cols; base += head_dim) {
    const T* d1 = dy + base;
    const T* d2 = d1 + half;
    float* g1 = g + base;
    float* g2 = g1 + half;
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      const float a = to_float(d1[j]);
      const float b = to_float(d2[j]);
      g1[j] = a * cos[j] + b * sin[half + j];
      g2[j] = b * cos[half + j] - a * sin[j];
    }
  }
}

template <typename T, typename W>
void norm_rope_fwd_impl(const NormRopeFwdParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const W* w = static_cast<const W*>(p.w);
  T* y = static_cast<T*>(p.y);
  const int64_t cols = p.cols;
  const int threads = threads_for(p.rows, cols);
  std::vector<float> scratch(static_cast<size_t>(threads) * cols);
  parallel_ranges(p.rows, threads, [&](int64_t r0, int64_t r1, int t) {
    float* normed = scratch.data() + static_cast<size_t>(t) * cols;
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * p.x_stride;
      const float rstd = rstd_of(sum_squares(xr, cols), cols, p.eps);
      p.rstd[r] = rstd;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) normed[j] = to_float(xr[j]) * rstd * to_float(w[j]);
      const int64_t pos = r % p.seq_len;
      rotate_heads(normed, p.cos + pos * p.head_dim, p.sin + pos * p.head_dim, cols, p.head_dim, y + r * p.y_stride);
    }
  });
}

template <typename T, typename W>
void norm_rope_bwd_impl(const NormRopeBwdParams& p) {
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const W* w = static_cast<const W*>(p.w);
  T* dx = static_cast<T*>(p.dx);
  const int64_t cols = p.cols;
  const int threads = threads_for(p.rows, cols);
  std::vector<float> partial(static_cast<size_t>(threads) * cols, 0.0f);
  std::vector<float> scratch(static_cast<size_t>(threads) * cols);
  parallel_ranges(p.rows, threads, [&](int64_t r0, int64_t r1, int t) {
    float* mine = partial.data() + static_cast<size_t>(t) * cols;
    float* g = scratch.data() + static_cast<size_t>(t) * cols;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t pos = r % p.seq_len;
      unrotate_heads(dy + r * p.dy_stride, p.cos + pos * p.head_dim, p.sin + pos * p.head_dim, cols, p.head_dim, g);
      rms_row_backward(g, x + r * p.x_stride, w, p.rstd[r], cols, dx + r * p.dx_stride, mine);
    }
  });
  reduce_partials(partial, threads, cols, static_cast<W*>(p.dw));
}

template <typename Fn>
void dispatch_x_w(int x_dtype, int w_dtype, const char* op, Fn&& fn) {
  const std::string name(op);
  dispatch_dtype(x_dtype, (name + ": x").c_str(), [&](auto xt) {
    dispatch_dtype(w_dtype, (name + ": weight").c_str(), [&](auto wt) { fn(xt, wt); });
  });
}

}  // namespace

void rms_norm_fwd(const RmsNormFwdParams& p) {
  dispatch_x_w(p.x_dtype, p.w_dtype, "rms_norm_fwd", [&](auto xt, auto wt) {
    rms_fwd<decltype(xt), decltype(wt)>(p);
  });
}

void rms_norm_bwd(const RmsNormBwdParams& p) {
  dispatch_x_w(p.x_dtype, p.w_dtype, "rms_norm_bwd", [&](auto xt, auto wt) {
    rms_bwd<decltype(xt), decltype(wt)>(p);
  });
}

void norm_rope_fwd(const NormRopeFwdParams& p) {
  dispatch_x_w(p.x_dtype, p.w_dtype, "norm_rope_fwd", [&](auto xt, auto wt) {
    norm_rope_fwd_impl<decltype(xt), decltype(wt)>(p);
  });
}

void norm_rope_bwd(const NormRopeBwdParams& p) {
  dispatch_x_w(p.x_dtype, p.w_dtype, "norm_rope_bwd", [&](auto xt, auto wt) {
    norm_rope_bwd_impl<decltype(xt), decltype(wt)>(p);
  });
}

}  // namespace olmo2::cpu::OLMO2_CPU_ISA
