// Cross-entropy with z-loss and ignore_index on CUDA, following the row
// contract of cross_entropy in olmo2_kernels/reference.py: one block per row
// (grid-stride over rows); logits are read in their dtype and never upcast
// whole. Forward: each thread keeps an online (max, sum of exp) over its packs,
// merged across the block with shuffles. Backward: softmax from the saved lse in
// fp32, one rounding per element, to out's dtype (any of the three, whatever
// the logits'); the target entry uses expm1 so that p - 1 keeps its precision
// when p is close to 1.
#include <cmath>

#include "common/params.h"
#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace olmo2::cuda {
namespace {

constexpr int kThreads = 1024;

// exp(v - m) for the running max m; exact 1 / 0 when m is infinite (where v - m
// would be inf - inf), NaN for a NaN v.
__device__ __forceinline__ float exp_shifted(float v, float m) {
  if (isfinite(m)) return exp2f((v - m) * kLog2e);
  if (v != v) return v;
  return (m > 0.0f && v == m) ? 1.0f : 0.0f;
}

// Merges (m2, s2) into (m, s): the log-sum-exp state is m + log(s).
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  const float a = m == mn ? s : s * exp2f((m - mn) * kLog2e);
  const float b = m2 == mn ? s2 : s2 * exp2f((m2 - mn) * kLog2e);
  m = mn;
  s = a + b;
}

// log-sum-exp of the block's (m, s) states, returned to every thread.
__device__ __forceinline__ float block_lse(float m, float s, float* sm_m, float* sm_s) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    lse_merge(m, s, __shfl_xor_sync(kFullMask, m, offset), __shfl_xor_sync(kFullMask, s, offset));
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  __syncthreads();
  if (lane == 0) {
    sm_m[warp] = m;
    sm_s[warp] = s;
  }
  __syncthreads();
  const bool has = lane < static_cast<int>(blockDim.x / kWarp);
  m = has ? sm_m[lane] : -INFINITY;
  s = has ? sm_s[lane] : 0.0f;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    lse_merge(m, s, __shfl_xor_sync(kFullMask, m, offset), __shfl_xor_sync(kFullMask, s, offset));
  return m + logf(s);  // -inf for an empty or all -inf row, NaN if any logit is NaN
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) ce_fwd_kernel(CrossEntropyFwdParams p) {
  __shared__ float sm_m[kWarp], sm_s[kWarp];
  const T* logits = static_cast<const T*>(p.logits);
  const int packs = static_cast<int>(p.vocab) / VEC;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* xr = logits + row * p.logits_stride;
    float m = -INFINITY, s = 0.0f;
#pragma unroll 4
    for (int i = threadIdx.x; i < packs; i += blockDim.x) {
      float v[VEC];
      load_pack<T, VEC>(xr + i * VEC, v);
      float pack_max = v[0];
#pragma unroll
      for (int k = 1; k < VEC; ++k) pack_max = fmaxf(pack_max, v[k]);
      if (pack_max > m) {
        s *= exp2f((m - pack_max) * kLog2e);  // 0 while m = -inf
        m = pack_max;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) s += exp_shifted(v[k], m);
    }
    const float lse = block_lse(m, s, sm_m, sm_s);
    if (threadIdx.x == 0) {
      const int64_t label = p.labels[row];
      p.lse[row] = lse;
      if (label == p.ignore_index) {
        p.ce[row] = 0.0f;
        p.z[row] = 0.0f;
      } else {
        const bool in_range = label >= 0 && label < p.vocab;
        p.ce[row] = in_range ? lse - to_float(xr[label]) : NAN;
        p.z[row] = p.z_coef != 0.0f ? p.z_coef * lse * lse : 0.0f;
      }
    }
  }
}

// T: the logits' storage type, O: out's. A pack is VEC elements of each.
template <typename T, typename O, int VEC>
__global__ void __launch_bounds__(kThreads) ce_bwd_kernel(CrossEntropyBwdParams p) {
  const T* logits = static_cast<const T*>(p.logits);
  O* out = static_cast<O*>(p.out);
  const int packs = static_cast<int>(p.vocab) / VEC;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* xr = logits + row * p.logits_stride;
    O* outr = out + row * p.out_stride;
    const int64_t label = p.labels[row];
    if (label == p.ignore_index || label < 0 || label >= p.vocab) {
      float fill[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) fill[k] = label == p.ignore_index ? 0.0f : NAN;
      for (int i = threadIdx.x; i < packs; i += blockDim.x) store_pack<O, VEC>(outr + i * VEC, fill);
      continue;
    }
    const float lse = p.lse[row];
    const float g_ce = p.grad_ce[row * p.grad_ce_stride];
    const float g_z = p.grad_z[row * p.grad_z_stride];
    // z = coef * lse^2 gives 2 coef lse softmax; a zero coef adds exactly nothing.
    const float z_scale = p.z_coef != 0.0f ? 2.0f * p.z_coef * lse * g_z : 0.0f;
    const float scale = g_ce + z_scale;
    const int target = static_cast<int>(label);
    // Each thread reads a pack before writing the same pack: `out` may be the logits buffer.
#pragma unroll 4
    for (int i = threadIdx.x; i < packs; i += blockDim.x) {
      float v[VEC], g[VEC];
      load_pack<T, VEC>(xr + i * VEC, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float shifted = v[k] - lse;
        const float prob = exp2f(shifted * kLog2e);
        g[k] = i * VEC + k == target ? g_ce * expm1f(shifted) + z_scale * prob : scale * prob;
      }
      store_pack<O, VEC>(outr + i * VEC, g);
    }
  }
}

}  // namespace

void cross_entropy_fwd(const CrossEntropyFwdParams& p, void* stream_ptr) {
  const char* op = "cross_entropy_fwd";
  check_width(op, p.vocab);
  if (p.rows == 0) return;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_dtype(p.dtype, op, [&](auto t) {
    using T = decltype(t);
    constexpr int V = kVec<T>;
    const bool packed = packable(p.logits, p.logits_stride, p.rows, p.vocab, V, sizeof(T));
    launch_packed_or_scalar<V>(op, packed, [&](auto width) {
      constexpr int N = decltype(width)::value;
      const int threads = block_threads(p.vocab / N, 4, kThreads);
      OLMO2_LAUNCH((ce_fwd_kernel<T, N>), grid_for(p.rows), threads, stream)(p);
    });
  });
}

void cross_entropy_bwd(const CrossEntropyBwdParams& p, void* stream_ptr) {
  const char* op = "cross_entropy_bwd";
  check_width(op, p.vocab);
  if (p.rows == 0) return;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_dtype(p.dtype, op, [&](auto t) {
    dispatch_dtype(p.out_dtype, op, [&](auto o) {
      using T = decltype(t);
      using O = decltype(o);
      // Packs of 16 bytes of the wider type (8 of the narrower when the dtypes differ).
      constexpr int V = kVec<T> < kVec<O> ? kVec<T> : kVec<O>;
      const bool packed = packable(p.logits, p.logits_stride, p.rows, p.vocab, V, sizeof(T)) &&
                          packable(p.out, p.out_stride, p.rows, p.vocab, V, sizeof(O));
      launch_packed_or_scalar<V>(op, packed, [&](auto width) {
        constexpr int N = decltype(width)::value;
        const int threads = block_threads(p.vocab / N, 4, kThreads);
        OLMO2_LAUNCH((ce_bwd_kernel<T, O, N>), grid_for(p.rows), threads, stream)(p);
      });
    });
  });
}

}  // namespace olmo2::cuda
