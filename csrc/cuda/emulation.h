// Host emulation of the part of the CUDA kernel language that csrc/cuda uses,
// for tests on machines without a GPU: the .cu files compile as C++ with
// -DOLMO2_CUDA_EMULATION (see emulation.cpp) and every launch runs on the
// calling CPU thread.
//
// Each CUDA thread of a block is a cooperative context (ucontext) with its own
// stack; __syncthreads() yields to a scheduler that resumes the next thread, so
// a barrier releases only once every thread of the block has reached it. A
// block whose threads do not all reach the same barriers (divergent
// __syncthreads) is reported as an error. __shfl_xor_sync exchanges values
// through a block-wide buffer between two barriers, which is exact for the
// kernels here (every thread of the block shuffles at the same points).
// Blocks run one after another; __shared__ variables become function statics.
//
// Vector (Pack) accesses are checked for the alignment the GPU requires.
// Not emulated: timing, concurrency between blocks, memory-model subtleties,
// device math precision (host libm is used), launch limits beyond block size.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <tuple>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

using std::isfinite;

namespace olmo2::emulation {

inline uint3 thread_idx;
inline uint3 block_idx;
inline dim3 block_dim;
inline dim3 grid_dim;

void syncthreads();
float shfl_xor(unsigned mask, float value, int lane_mask);
// Records a vector access at an address a GPU would reject; the launch then fails.
void check_aligned(const void* ptr, size_t bytes);

// Runs body() once per thread of every block of `grid`, with the indices set.
void run_grid(dim3 grid, dim3 block, const std::function<void()>& body);

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  template <typename... Args>
  void operator()(Args&&... args) const {
    std::tuple<Params...> bound(std::forward<Args>(args)...);
    auto fn = kernel;
    run_grid(grid, block, [&] { std::apply(fn, bound); });
  }
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t) {
  return Launch<Params...>{kernel, grid, block};
}

}  // namespace olmo2::emulation

#define threadIdx (::olmo2::emulation::thread_idx)
#define blockIdx (::olmo2::emulation::block_idx)
#define blockDim (::olmo2::emulation::block_dim)
#define gridDim (::olmo2::emulation::grid_dim)
#define __syncthreads() ::olmo2::emulation::syncthreads()
#define __shfl_xor_sync(mask, value, lane_mask) ::olmo2::emulation::shfl_xor(mask, value, lane_mask)
