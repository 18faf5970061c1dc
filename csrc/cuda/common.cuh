// Device helpers shared by the CUDA kernels: storage types and conversions,
// packs (one 16-byte access when aligned), warp and block reductions, dtype
// dispatch and launch checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/dtype.h"

#ifdef OLMO2_CUDA_EMULATION
// Host build for tests: kernels run on CPU threads emulated by cuda/emulation.h.
#include "cuda/emulation.h"
#define OLMO2_LAUNCH(kernel, grid, block, stream) ::olmo2::emulation::launch(kernel, grid, block, stream)
#else
// kernel<<<grid, block, 0, stream>>>(args...) as OLMO2_LAUNCH(kernel, grid, block, stream)(args...).
#define OLMO2_LAUNCH(kernel, grid, block, stream) kernel<<<grid, block, 0, stream>>>
#endif

namespace olmo2::cuda {

using bf16 = __nv_bfloat16;
using f16 = __half;

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- conversions ---------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(f16 v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ f16 from_float<f16>(float v) { return __float2half_rn(v); }

// ---- packs -----------------------------------------------------------------------------
// N consecutive elements moved as one access. The launcher checks that every
// pointer it offsets by multiples of N is aligned to sizeof(Pack) (else it uses N = 1).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[N]) {
#ifdef OLMO2_CUDA_EMULATION
  // A GPU faults on a misaligned vector access: record it (the launch then
  // fails) and load without the alignment assumption so the host does not crash.
  Pack<T, N> pack;
  ::olmo2::emulation::check_aligned(p, sizeof(pack));
  std::memcpy(&pack, p, sizeof(pack));
#else
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#endif
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_float(pack.v[k]);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int k = 0; k < N; ++k) pack.v[k] = from_float<T>(in[k]);
#ifdef OLMO2_CUDA_EMULATION
  ::olmo2::emulation::check_aligned(p, sizeof(pack));
  std::memcpy(p, &pack, sizeof(pack));
#else
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
#endif
}

// Elements per 16-byte access.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

inline bool aligned(const void* p, int bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

// Whether a (rows, cols) operand allows packs of `vec` elements of `elem_bytes` each.
inline bool packable(const void* p, int64_t stride, int64_t rows, int64_t cols, int vec, int elem_bytes) {
  return aligned(p, vec * elem_bytes) && cols % vec == 0 && (rows <= 1 || stride % vec == 0);
}

// ---- reductions -----------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sum over the block, returned to every thread. Requires blockDim.x a multiple
// of 32 (every launcher rounds up) and `smem` of 32 floats. The leading barrier
// lets the block call this repeatedly with the same buffer.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? smem[lane] : 0.0f);
}

// ---- launch helpers ---------------------------------------------------------------------
inline int round_up_warp(int64_t n) {
  const int64_t r = (n + kWarp - 1) / kWarp * kWarp;
  return static_cast<int>(r < kWarp ? kWarp : r);
}

// Threads for a block that walks `packs` packs, about `per_thread` each, within [32, max_threads].
inline int block_threads(int64_t packs, int per_thread, int max_threads) {
  const int64_t want = (packs + per_thread - 1) / per_thread;
  return round_up_warp(want < max_threads ? want : max_threads);
}

inline unsigned grid_for(int64_t blocks) {
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > INT_MAX ? INT_MAX : blocks));
}

inline void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("olmo2_kernels CUDA ") + op + ": " + cudaGetErrorString(err));
}

// ---- vector or scalar launches ---------------------------------------------------------------
// Every kernel is a template over its pack width N (elements per access). The
// launcher instantiates it twice: N = Vec (one 16-byte access) runs when
// `packed` holds, i.e. when every pointer the kernel offsets by packs is
// aligned to a pack and every row length and stride it uses is a multiple of
// Vec (packable(), aligned()); N = 1 otherwise. `launch` does the launch (or
// launches) of one width: it receives std::integral_constant<int, N>, so
// decltype(width)::value instantiates the kernel at N, and the grid may depend
// on N. The emulation still checks every pack access for alignment (load_pack,
// store_pack), so a predicate that admits a misaligned operand fails a test.
template <int Vec, typename Launch>
inline void launch_packed_or_scalar(const char* op, bool packed, Launch&& launch) {
  if (packed) {
    launch(std::integral_constant<int, Vec>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
  check_launch(op);
}

inline void require(bool ok, const char* op, const std::string& msg) {
  if (!ok) throw std::invalid_argument(std::string(op) + ": " + msg);
}

// Column indices within a row are 32-bit (row offsets are 64-bit).
inline void check_width(const char* op, int64_t cols) {
  require(cols <= INT_MAX, op, "rows wider than 2^31 - 1 elements are not supported");
}

// ---- dispatch -----------------------------------------------------------------------------
template <typename Fn>
inline void dispatch_dtype(int code, const char* op, Fn&& fn) {
  switch (code) {
    case static_cast<int>(DType::F32): fn(float{}); return;
    case static_cast<int>(DType::BF16): fn(bf16{}); return;
    case static_cast<int>(DType::F16): fn(f16{}); return;
    default: throw std::invalid_argument(std::string(op) + ": unknown dtype code " + std::to_string(code));
  }
}

// x in float32/bfloat16/float16 with the weight in x's dtype or float32.
template <typename Fn>
inline void dispatch_x_w(int x_code, int w_code, const char* op, Fn&& fn) {
  require(w_code == x_code || w_code == static_cast<int>(DType::F32), op,
          "the CUDA kernels take a weight in x's dtype or float32");
  dispatch_dtype(x_code, op, [&](auto xt) {
    using T = decltype(xt);
    if (w_code == x_code) {
      fn(xt, T{});
    } else {
      fn(xt, float{});
    }
  });
}

}  // namespace olmo2::cuda
