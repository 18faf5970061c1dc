// SwiGLU on CUDA: y = silu(gate) * up and its gradients, elementwise in fp32.
// A 2-D grid: y walks rows, x walks packs within a row (grid-stride in both,
// 64-bit indices). When every operand is dense the matrix is one long row.
#include <initializer_list>

#include "common/params.h"
#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace olmo2::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridX = 1 << 16;
constexpr int64_t kMaxGridY = 65535;

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) swiglu_fwd_kernel(SwigluFwdParams p) {
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* y = static_cast<T*>(p.y);
  const int64_t packs = p.cols / VEC;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = blockIdx.y; row < p.rows; row += gridDim.y) {
    const T* gr = gate + row * p.gate_stride;
    const T* ur = up + row * p.up_stride;
    T* yr = y + row * p.y_stride;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < packs; i += step) {
      float g[VEC], u[VEC], out[VEC];
      load_pack<T, VEC>(gr + i * VEC, g);
      load_pack<T, VEC>(ur + i * VEC, u);
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = g[k] * sigmoid(g[k]) * u[k];
      store_pack<T, VEC>(yr + i * VEC, out);
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) swiglu_bwd_kernel(SwigluBwdParams p) {
  const T* dy = static_cast<const T*>(p.dy);
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* dgate = static_cast<T*>(p.dgate);
  T* dup = static_cast<T*>(p.dup);
  const int64_t packs = p.cols / VEC;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = blockIdx.y; row < p.rows; row += gridDim.y) {
    const T* dyr = dy + row * p.dy_stride;
    const T* gr = gate + row * p.gate_stride;
    const T* ur = up + row * p.up_stride;
    T* dgr = dgate + row * p.dgate_stride;
    T* dur = dup + row * p.dup_stride;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < packs; i += step) {
      float d[VEC], g[VEC], u[VEC], out_g[VEC], out_u[VEC];
      load_pack<T, VEC>(dyr + i * VEC, d);
      load_pack<T, VEC>(gr + i * VEC, g);
      load_pack<T, VEC>(ur + i * VEC, u);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float s = sigmoid(g[k]);
        out_g[k] = d[k] * u[k] * (s * (1.0f + g[k] * (1.0f - s)));  // silu'(g) = s (1 + g (1 - s))
        out_u[k] = d[k] * (g[k] * s);
      }
      store_pack<T, VEC>(dgr + i * VEC, out_g);
      store_pack<T, VEC>(dur + i * VEC, out_u);
    }
  }
}

// Rows and cols after folding a dense matrix into one row.
struct Shape {
  int64_t rows, cols;
};

inline Shape fold(int64_t rows, int64_t cols, std::initializer_list<int64_t> strides) {
  if (rows <= 1) return {rows, cols};
  for (int64_t s : strides)
    if (s != cols) return {rows, cols};
  return {1, rows * cols};
}

inline dim3 grid_2d(Shape s, int vec) {
  const int64_t packs = s.cols / vec;
  const int64_t x = (packs + kThreads - 1) / kThreads;
  return dim3(static_cast<unsigned>(x < 1 ? 1 : (x > kMaxGridX ? kMaxGridX : x)),
              static_cast<unsigned>(s.rows > kMaxGridY ? kMaxGridY : s.rows));
}

}  // namespace

void swiglu_fwd(const SwigluFwdParams& params, void* stream_ptr) {
  const char* op = "swiglu_fwd";
  const Shape shape = fold(params.rows, params.cols, {params.gate_stride, params.up_stride, params.y_stride});
  if (shape.rows == 0 || shape.cols == 0) return;
  SwigluFwdParams p = params;
  p.rows = shape.rows;
  p.cols = shape.cols;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_dtype(p.dtype, op, [&](auto t) {
    using T = decltype(t);
    constexpr int V = kVec<T>;
    const bool packed = packable(p.gate, p.gate_stride, p.rows, p.cols, V, sizeof(T)) &&
                        packable(p.up, p.up_stride, p.rows, p.cols, V, sizeof(T)) &&
                        packable(p.y, p.y_stride, p.rows, p.cols, V, sizeof(T));
    launch_packed_or_scalar<V>(op, packed, [&](auto width) {
      constexpr int N = decltype(width)::value;
      OLMO2_LAUNCH((swiglu_fwd_kernel<T, N>), grid_2d(shape, N), kThreads, stream)(p);
    });
  });
}

void swiglu_bwd(const SwigluBwdParams& params, void* stream_ptr) {
  const char* op = "swiglu_bwd";
  const Shape shape = fold(params.rows, params.cols,
                           {params.dy_stride, params.gate_stride, params.up_stride, params.dgate_stride,
                            params.dup_stride});
  if (shape.rows == 0 || shape.cols == 0) return;
  SwigluBwdParams p = params;
  p.rows = shape.rows;
  p.cols = shape.cols;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_dtype(p.dtype, op, [&](auto t) {
    using T = decltype(t);
    constexpr int V = kVec<T>;
    const bool packed = packable(p.dy, p.dy_stride, p.rows, p.cols, V, sizeof(T)) &&
                        packable(p.gate, p.gate_stride, p.rows, p.cols, V, sizeof(T)) &&
                        packable(p.up, p.up_stride, p.rows, p.cols, V, sizeof(T)) &&
                        packable(p.dgate, p.dgate_stride, p.rows, p.cols, V, sizeof(T)) &&
                        packable(p.dup, p.dup_stride, p.rows, p.cols, V, sizeof(T));
    launch_packed_or_scalar<V>(op, packed, [&](auto width) {
      constexpr int N = decltype(width)::value;
      OLMO2_LAUNCH((swiglu_bwd_kernel<T, N>), grid_2d(shape, N), kThreads, stream)(p);
    });
  });
}

}  // namespace olmo2::cuda
