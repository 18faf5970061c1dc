// Cross-entropy with z-loss and ignore_index on CPU, one row per iteration,
// following the row contract of cross_entropy in olmo2_kernels/reference.py.
//
// Forward: an online log-sum-exp over chunks that stay in L1 (the chunk's max,
// then one exp per element), so each row is read from memory once. Backward:
// softmax from the saved lse in fp32, one rounding per element, to out's dtype
// (any of the three, whatever the logits'); the target entry uses expm1 so that
// p - 1 keeps its precision when p is close to 1.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "cpu/kernels.h"
#include "cpu/numeric.h"
#include "cpu/parallel.h"

namespace olmo2::cpu::OLMO2_CPU_ISA {
namespace {

constexpr int64_t kChunk = 2048;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNegInf = -kInf;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

template <typename T>
float row_logsumexp(const T* x, int64_t vocab) {
  alignas(64) float buf[kChunk];
  float running_max = kNegInf;
  float running_sum = 0.0f;
  for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
    const int64_t n = std::min(kChunk, vocab - c0);
    // fp32 rows are read in place; others are widened once into the L1-resident buffer.
    const float* chunk = buf;
    if constexpr (std::is_same_v<T, float>) {
      chunk = x + c0;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) buf[j] = to_float(x[c0 + j]);
    }
    float chunk_max = kNegInf;
    float nan_seen = 0.0f;  // NaN logits must give a NaN lse, not be skipped by max()
#pragma omp simd reduction(max : chunk_max) reduction(+ : nan_seen)
    for (int64_t j = 0; j < n; ++j) {
      const float v = chunk[j];
      chunk_max = v > chunk_max ? v : chunk_max;
      nan_seen += v != v ? 1.0f : 0.0f;
    }
    if (nan_seen != 0.0f) return kNaN;
    if (chunk_max > running_max) {
      running_sum *= exp_f32(running_max - chunk_max);  // exp(-inf) = 0 on the first chunk
      running_max = chunk_max;
    }
    // Nothing to add while every logit so far is -inf; nothing matters once one is +inf.
    if (running_max == kNegInf || running_max == kInf) continue;
    const float m = running_max;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += exp_f32(chunk[j] - m);
    running_sum += s;
  }
  if (running_max == kInf) return kInf;
  return running_max + std::log(running_sum);  // -inf for an empty or all -inf row
}

template <typename T>
void ce_fwd(const CrossEntropyFwdParams& p) {
  const T* logits = static_cast<const T*>(p.logits);
  const int64_t vocab = p.vocab;
  parallel_ranges(p.rows, threads_for(p.rows, vocab), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = logits + r * p.logits_stride;
      const float lse = row_logsumexp(xr, vocab);
      const int64_t label = p.labels[r];
      p.lse[r] = lse;
      if (label == p.ignore_index) {
        p.ce[r] = 0.0f;
        p.z[r] = 0.0f;
      } else {
        const bool in_range = label >= 0 && label < vocab;
        p.ce[r] = in_range ? lse - to_float(xr[label]) : kNaN;
        p.z[r] = p.z_coef != 0.0f ? p.z_coef * lse * lse : 0.0f;
      }
    }
  });
}

// out[j] = scale * exp(x[j] - lse) for j in [begin, end).
template <typename T, typename O>
inline void softmax_grad(const T* x, float lse, float scale, int64_t begin, int64_t end, O* out) {
#pragma omp simd
  for (int64_t j = begin; j < end; ++j) out[j] = from_float<O>(scale * exp_f32(to_float(x[j]) - lse));
}

// T: the logits' storage type, O: out's.
template <typename T, typename O>
void ce_bwd(const CrossEntropyBwdParams& p) {
  const T* logits = static_cast<const T*>(p.logits);
  O* out = static_cast<O*>(p.out);
  const int64_t vocab = p.vocab;
  parallel_ranges(p.rows, threads_for(p.rows, vocab), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = logits + r * p.logits_stride;
      O* outr = out + r * p.out_stride;
      const int64_t label = p.labels[r];
      if (label == p.ignore_index || label < 0 || label >= vocab) {
        const O fill = from_float<O>(label == p.ignore_index ? 0.0f : kNaN);
        for (int64_t j = 0; j < vocab; ++j) outr[j] = fill;
        continue;
      }
      const float lse = p.lse[r];
      const float g_ce = p.grad_ce[r * p.grad_ce_stride];
      const float g_z = p.grad_z[r * p.grad_z_stride];
      // z = coef * lse^2 gives 2 coef lse softmax; a zero coef adds exactly nothing.
      const float z_scale = p.z_coef != 0.0f ? 2.0f * p.z_coef * lse * g_z : 0.0f;
      const float scale = g_ce + z_scale;
      // Read before the loop: `out` may be the logits buffer.
      const float shifted_target = to_float(xr[label]) - lse;
      const float target = g_ce * std::expm1(shifted_target) + z_scale * std::exp(shifted_target);
      softmax_grad(xr, lse, scale, 0, label, outr);
      outr[label] = from_float<O>(target);
      softmax_grad(xr, lse, scale, label + 1, vocab, outr);
    }
  });
}

}  // namespace

void cross_entropy_fwd(const CrossEntropyFwdParams& p) {
  dispatch_dtype(p.dtype, "cross_entropy_fwd: logits", [&](auto t) { ce_fwd<decltype(t)>(p); });
}

void cross_entropy_bwd(const CrossEntropyBwdParams& p) {
  dispatch_dtype(p.dtype, "cross_entropy_bwd: logits", [&](auto t) {
    dispatch_dtype(p.out_dtype, "cross_entropy_bwd: out", [&](auto o) { ce_bwd<decltype(t), decltype(o)>(p); });
  });
}

}  // namespace olmo2::cpu::OLMO2_CPU_ISA
