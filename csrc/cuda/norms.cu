// RMSNorm and the fused QK-norm + rotary embedding on CUDA.
//
// One block per row (grid-stride over rows), fp32 statistics, one rounding per
// output. RMSNorm keeps the row in registers when it fits (kFwdItems /
// kBwdItems packs per thread) and re-reads it (from L1/L2) otherwise. The
// rotary kernels read each element's rotation partner (col +- head_dim/2) with
// a second load from cache instead of exchanging registers between threads.
//
// Weight gradients: block b owns the fp32 row partial[b, :] (registers when the
// row fits, else read-modify-write in global memory by the thread that owns
// the column); a second kernel sums the n_partials rows per column in a fixed
// order. No atomics, deterministic.
#include "common/params.h"
#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace olmo2::cuda {
namespace {

constexpr int kFwdItems = 4;  // packs per thread kept in registers (forward)
constexpr int kBwdItems = 2;  // backward keeps three arrays of them
constexpr int kFwdThreads = 1024;
constexpr int kBwdThreads = 512;

__device__ __forceinline__ float rstd_of(float sum_sq, int cols, float eps) {
  return 1.0f / sqrtf(sum_sq / static_cast<float>(cols) + eps);  // IEEE sqrt and divide, as on CPU
}

template <typename T, int VEC>
__device__ __forceinline__ float pack_sum_sq(const T* p) {
  float v[VEC];
  load_pack<T, VEC>(p, v);
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < VEC; ++k) s += v[k] * v[k];
  return s;
}

// ---- RMSNorm forward --------------------------------------------------------------------
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kFwdThreads) rms_norm_fwd_kernel(RmsNormFwdParams p) {
  __shared__ float smem[kWarp];
  const T* x = static_cast<const T*>(p.x);
  const W* w = static_cast<const W*>(p.w);
  T* y = static_cast<T*>(p.y);
  const int cols = static_cast<int>(p.cols);
  const int packs = cols / VEC;
  const int nthreads = blockDim.x;
  const bool cached = packs <= nthreads * kFwdItems;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* xr = x + row * p.x_stride;
    T* yr = y + row * p.y_stride;
    float v[kFwdItems][VEC];
    float sum_sq = 0.0f;
    if (cached) {
#pragma unroll
      for (int it = 0; it < kFwdItems; ++it) {
        const int i = threadIdx.x + it * nthreads;
        if (i < packs) {
          load_pack<T, VEC>(xr + i * VEC, v[it]);
#pragma unroll
          for (int k = 0; k < VEC; ++k) sum_sq += v[it][k] * v[it][k];
        }
      }
    } else {
      for (int i = threadIdx.x; i < packs; i += nthreads) sum_sq += pack_sum_sq<T, VEC>(xr + i * VEC);
    }
    const float rstd = rstd_of(block_sum(sum_sq, smem), cols, p.eps);
    if (threadIdx.x == 0) p.rstd[row] = rstd;

    if (cached) {
#pragma unroll
      for (int it = 0; it < kFwdItems; ++it) {
        const int i = threadIdx.x + it * nthreads;
        if (i < packs) {
          float wv[VEC], out[VEC];
          load_pack<W, VEC>(w + i * VEC, wv);
#pragma unroll
          for (int k = 0; k < VEC; ++k) out[k] = v[it][k] * rstd * wv[k];
          store_pack<T, VEC>(yr + i * VEC, out);
        }
      }
    } else {
      for (int i = threadIdx.x; i < packs; i += nthreads) {
        float xv[VEC], wv[VEC], out[VEC];
        load_pack<T, VEC>(xr + i * VEC, xv);
        load_pack<W, VEC>(w + i * VEC, wv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = xv[k] * rstd * wv[k];
        store_pack<T, VEC>(yr + i * VEC, out);
      }
    }
  }
}

// ---- shared backward --------------------------------------------------------------------
// Given g, the gradient w.r.t. the normalized row before the weight is applied
// elementwise (dy for RMSNorm; dy rotated back for RoPE), per row:
//   xhat = x * rstd, dx = rstd * (g*w - xhat * mean(g*w*xhat)), dw += g * xhat.
// Grad supplies g: Grad::Row r = grad.row(row); r.load(col, g[VEC]).
template <typename T, typename W, int VEC, typename Grad>
__global__ void __launch_bounds__(kBwdThreads) norm_bwd_kernel(const T* __restrict__ x, int64_t x_stride,
                                                               const W* __restrict__ w,
                                                               const float* __restrict__ rstd_in, T* dx,
                                                               int64_t dx_stride, float* partial, int64_t rows,
                                                               int cols, Grad grad) {
  __shared__ float smem[kWarp];
  const int packs = cols / VEC;
  const int nthreads = blockDim.x;
  const bool cached = packs <= nthreads * kBwdItems;
  float* my_partial = partial + static_cast<int64_t>(blockIdx.x) * cols;

  float dw[kBwdItems][VEC];
#pragma unroll
  for (int it = 0; it < kBwdItems; ++it)
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw[it][k] = 0.0f;
  if (!cached) {
    // Each thread owns the same columns in every row: zero them, no barrier needed.
    for (int i = threadIdx.x; i < packs; i += nthreads)
#pragma unroll
      for (int k = 0; k < VEC; ++k) my_partial[i * VEC + k] = 0.0f;
  }

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * x_stride;
    T* dxr = dx + row * dx_stride;
    const float rstd = rstd_in[row];
    const typename Grad::Row gr = grad.row(row);
    float dot = 0.0f;
    if (cached) {
      float xhat[kBwdItems][VEC], gw[kBwdItems][VEC];
#pragma unroll
      for (int it = 0; it < kBwdItems; ++it) {
        const int i = threadIdx.x + it * nthreads;
        if (i < packs) {
          float g[VEC], wv[VEC];
          gr.load(i * VEC, g);
          load_pack<T, VEC>(xr + i * VEC, xhat[it]);
          load_pack<W, VEC>(w + i * VEC, wv);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            xhat[it][k] *= rstd;
            gw[it][k] = g[k] * wv[k];
            dot += gw[it][k] * xhat[it][k];
            dw[it][k] += g[k] * xhat[it][k];
          }
        }
      }
      const float mean = block_sum(dot, smem) / static_cast<float>(cols);
#pragma unroll
      for (int it = 0; it < kBwdItems; ++it) {
        const int i = threadIdx.x + it * nthreads;
        if (i < packs) {
          float out[VEC];
#pragma unroll
          for (int k = 0; k < VEC; ++k) out[k] = (gw[it][k] - xhat[it][k] * mean) * rstd;
          store_pack<T, VEC>(dxr + i * VEC, out);
        }
      }
    } else {
      for (int i = threadIdx.x; i < packs; i += nthreads) {
        float g[VEC], xv[VEC], wv[VEC];
        gr.load(i * VEC, g);
        load_pack<T, VEC>(xr + i * VEC, xv);
        load_pack<W, VEC>(w + i * VEC, wv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float xhat = xv[k] * rstd;
          dot += g[k] * wv[k] * xhat;
          my_partial[i * VEC + k] += g[k] * xhat;
        }
      }
      const float mean = block_sum(dot, smem) / static_cast<float>(cols);
      for (int i = threadIdx.x; i < packs; i += nthreads) {
        float g[VEC], xv[VEC], wv[VEC], out[VEC];
        gr.load(i * VEC, g);
        load_pack<T, VEC>(xr + i * VEC, xv);
        load_pack<W, VEC>(w + i * VEC, wv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = (g[k] * wv[k] - xv[k] * rstd * mean) * rstd;
        store_pack<T, VEC>(dxr + i * VEC, out);
      }
    }
  }

  if (cached) {
#pragma unroll
    for (int it = 0; it < kBwdItems; ++it) {
      const int i = threadIdx.x + it * nthreads;
      if (i < packs)
#pragma unroll
        for (int k = 0; k < VEC; ++k) my_partial[i * VEC + k] = dw[it][k];
    }
  }
}

// dw[j] = sum_b partial[b, j]: blockDim (32, kSumRows); thread (tx, ty) adds rows
// ty, ty + kSumRows, ... of column j, then the column's kSumRows sums are added in order.
constexpr int kSumRows = 16;

template <typename W>
__global__ void __launch_bounds__(kWarp * kSumRows) column_sum_kernel(const float* __restrict__ partial,
                                                                      int64_t n_partials, int cols, W* out) {
  __shared__ float sums[kSumRows][kWarp + 1];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  float acc = 0.0f;
  if (j < cols)
    for (int64_t b = threadIdx.y; b < n_partials; b += kSumRows) acc += partial[b * cols + j];
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < cols) {
    float total = 0.0f;
#pragma unroll
    for (int r = 0; r < kSumRows; ++r) total += sums[r][threadIdx.x];
    out[j] = from_float<W>(total);
  }
}

template <typename W>
void launch_column_sum(const float* partial, int64_t n_partials, int cols, void* dw, cudaStream_t stream,
                       const char* op) {
  if (cols == 0) return;
  const dim3 block(kWarp, kSumRows);
  const dim3 grid(static_cast<unsigned>((static_cast<int64_t>(cols) + kWarp - 1) / kWarp));
  OLMO2_LAUNCH((column_sum_kernel<W>), grid, block, stream)(partial, n_partials, cols, static_cast<W*>(dw));
  check_launch(op);
}

// ---- RMSNorm backward: g = dy ------------------------------------------------------------
template <typename T, int VEC>
struct DyGrad {
  static constexpr int kVecN = VEC;
  const T* dy;
  int64_t stride;
  struct Row {
    const T* dy;
    __device__ __forceinline__ void load(int col, float (&g)[VEC]) const { load_pack<T, VEC>(dy + col, g); }
  };
  __device__ __forceinline__ Row row(int64_t r) const { return Row{dy + r * stride}; }
};

// ---- RoPE ------------------------------------------------------------------------------------
// Forward, per head: y = n * cos + rotate_half(n) * sin, rotate_half(n) = cat(-n2, n1).
// A pack never straddles the two halves of a head (the launcher checks half % VEC == 0).
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kFwdThreads) norm_rope_fwd_kernel(NormRopeFwdParams p) {
  __shared__ float smem[kWarp];
  const T* x = static_cast<const T*>(p.x);
  const W* w = static_cast<const W*>(p.w);
  T* y = static_cast<T*>(p.y);
  const int cols = static_cast<int>(p.cols);
  const int head_dim = static_cast<int>(p.head_dim);
  const int half = head_dim / 2;
  const int packs = cols / VEC;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* xr = x + row * p.x_stride;
    T* yr = y + row * p.y_stride;
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < packs; i += blockDim.x) sum_sq += pack_sum_sq<T, VEC>(xr + i * VEC);
    const float rstd = rstd_of(block_sum(sum_sq, smem), cols, p.eps);
    if (threadIdx.x == 0) p.rstd[row] = rstd;

    const int64_t pos = row % p.seq_len;
    const float* cos_row = p.cos + pos * head_dim;
    const float* sin_row = p.sin + pos * head_dim;
    for (int i = threadIdx.x; i < packs; i += blockDim.x) {
      const int col = i * VEC;
      const int d = col % head_dim;
      const bool first = d < half;
      const int partner = first ? col + half : col - half;
      float xv[VEC], xp[VEC], wv[VEC], wp[VEC], c[VEC], s[VEC], out[VEC];
      load_pack<T, VEC>(xr + col, xv);
      load_pack<T, VEC>(xr + partner, xp);
      load_pack<W, VEC>(w + col, wv);
      load_pack<W, VEC>(w + partner, wp);
      load_pack<float, VEC>(cos_row + d, c);
      load_pack<float, VEC>(sin_row + d, s);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float n = xv[k] * rstd * wv[k];
        const float np = xp[k] * rstd * wp[k];
        out[k] = first ? n * c[k] - np * s[k] : n * c[k] + np * s[k];
      }
      store_pack<T, VEC>(yr + col, out);
    }
  }
}

// Backward: g = dy * cos + rotate_half^T(dy * sin), rotate_half^T(v) = cat(v2, -v1):
// first half g = dy1 c1 + dy2 s2, second half g = dy2 c2 - dy1 s1.
template <typename T, int VEC>
struct UnrotatedGrad {
  static constexpr int kVecN = VEC;
  const T* dy;
  int64_t stride;
  const float* cos;
  const float* sin;
  int64_t seq_len;
  int head_dim;
  struct Row {
    const T* dy;
    const float* cos;
    const float* sin;
    int head_dim;
    __device__ __forceinline__ void load(int col, float (&g)[VEC]) const {
      const int half = head_dim / 2;
      const int d = col % head_dim;
      const bool first = d < half;
      const int partner = first ? col + half : col - half;
      const int pd = first ? d + half : d - half;
      float a[VEC], b[VEC], c[VEC], s[VEC];
      load_pack<T, VEC>(dy + col, a);
      load_pack<T, VEC>(dy + partner, b);
      load_pack<float, VEC>(cos + d, c);
      load_pack<float, VEC>(sin + pd, s);
#pragma unroll
      for (int k = 0; k < VEC; ++k) g[k] = first ? a[k] * c[k] + b[k] * s[k] : a[k] * c[k] - b[k] * s[k];
    }
  };
  __device__ __forceinline__ Row row(int64_t r) const {
    const int64_t pos = r % seq_len;
    return Row{dy + r * stride, cos + pos * head_dim, sin + pos * head_dim, head_dim};
  }
};

// ---- launch ---------------------------------------------------------------------------------
template <typename T, typename W, typename Grad>
void launch_norm_bwd(const char* op, const void* x, int64_t x_stride, const void* w, const float* rstd, void* dx,
                     int64_t dx_stride, void* dw, float* partial, int64_t n_partials, int64_t rows, int cols,
                     Grad grad, cudaStream_t stream) {
  // One pack per thread up to kBwdThreads (occupancy: the grid is only n_partials
  // blocks); wider rows use up to kBwdItems packs per thread, then the loops.
  const int packs = cols / Grad::kVecN;
  const int threads = block_threads(packs, 1, kBwdThreads);
  OLMO2_LAUNCH((norm_bwd_kernel<T, W, Grad::kVecN, Grad>), grid_for(n_partials), threads, stream)(
      static_cast<const T*>(x), x_stride, static_cast<const W*>(w), rstd, static_cast<T*>(dx), dx_stride, partial,
      rows, cols, grad);
  check_launch(op);
  launch_column_sum<W>(partial, n_partials, cols, dw, stream, op);
}

// No rows: the weight gradient is zero (all-zero bits in every dtype).
void zero_weight_grad(void* dw, int64_t cols, int w_dtype, cudaStream_t stream, const char* op) {
  const size_t bytes = static_cast<size_t>(cols) * (w_dtype == static_cast<int>(DType::F32) ? 4 : 2);
  if (cudaMemsetAsync(dw, 0, bytes, stream) != cudaSuccess) check_launch(op);
}

}  // namespace

void rms_norm_fwd(const RmsNormFwdParams& p, void* stream_ptr) {
  const char* op = "rms_norm_fwd";
  check_width(op, p.cols);
  if (p.rows == 0) return;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_x_w(p.x_dtype, p.w_dtype, op, [&](auto xt, auto wt) {
    using T = decltype(xt);
    using W = decltype(wt);
    constexpr int V = kVec<T>;
    const bool packed = packable(p.x, p.x_stride, p.rows, p.cols, V, sizeof(T)) &&
                        packable(p.y, p.y_stride, p.rows, p.cols, V, sizeof(T)) &&
                        packable(p.w, 0, 1, p.cols, V, sizeof(W));
    launch_packed_or_scalar<V>(op, packed, [&](auto width) {
      constexpr int N = decltype(width)::value;
      const int threads = block_threads(p.cols / N, 2, kFwdThreads);
      OLMO2_LAUNCH((rms_norm_fwd_kernel<T, W, N>), grid_for(p.rows), threads, stream)(p);
    });
  });
}

void rms_norm_bwd(const RmsNormBwdParams& p, void* stream_ptr) {
  const char* op = "rms_norm_bwd";
  check_width(op, p.cols);
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.cols == 0) return;
  if (p.rows == 0) return zero_weight_grad(p.dw, p.cols, p.w_dtype, stream, op);
  require(p.partial != nullptr && p.n_partials >= 1, op, "needs an fp32 partial workspace (n_partials >= 1)");
  const int cols = static_cast<int>(p.cols);
  dispatch_x_w(p.x_dtype, p.w_dtype, op, [&](auto xt, auto wt) {
    using T = decltype(xt);
    using W = decltype(wt);
    constexpr int V = kVec<T>;
    const bool packed = packable(p.x, p.x_stride, p.rows, p.cols, V, sizeof(T)) &&
                        packable(p.dy, p.dy_stride, p.rows, p.cols, V, sizeof(T)) &&
                        packable(p.dx, p.dx_stride, p.rows, p.cols, V, sizeof(T)) &&
                        packable(p.w, 0, 1, p.cols, V, sizeof(W)) && aligned(p.partial, V * sizeof(float));
    launch_packed_or_scalar<V>(op, packed, [&](auto width) {
      const DyGrad<T, decltype(width)::value> grad{static_cast<const T*>(p.dy), p.dy_stride};
      launch_norm_bwd<T, W>(op, p.x, p.x_stride, p.w, p.rstd, p.dx, p.dx_stride, p.dw, p.partial, p.n_partials,
                            p.rows, cols, grad, stream);
    });
  });
}

void norm_rope_fwd(const NormRopeFwdParams& p, void* stream_ptr) {
  const char* op = "norm_rope_fwd";
  check_width(op, p.cols);
  if (p.rows == 0) return;
  require(p.seq_len > 0, op, "seq_len must be > 0");
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_x_w(p.x_dtype, p.w_dtype, op, [&](auto xt, auto wt) {
    using T = decltype(xt);
    using W = decltype(wt);
    constexpr int V = kVec<T>;
    const bool packed = (p.head_dim / 2) % V == 0 && packable(p.x, p.x_stride, p.rows, p.cols, V, sizeof(T)) &&
                        packable(p.y, p.y_stride, p.rows, p.cols, V, sizeof(T)) &&
                        packable(p.w, 0, 1, p.cols, V, sizeof(W)) && aligned(p.cos, V * sizeof(float)) &&
                        aligned(p.sin, V * sizeof(float));
    launch_packed_or_scalar<V>(op, packed, [&](auto width) {
      constexpr int N = decltype(width)::value;
      const int threads = block_threads(p.cols / N, 2, kFwdThreads);
      OLMO2_LAUNCH((norm_rope_fwd_kernel<T, W, N>), grid_for(p.rows), threads, stream)(p);
    });
  });
}

void norm_rope_bwd(const NormRopeBwdParams& p, void* stream_ptr) {
  const char* op = "norm_rope_bwd";
  check_width(op, p.cols);
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.cols == 0) return;
  if (p.rows == 0) return zero_weight_grad(p.dw, p.cols, p.w_dtype, stream, op);
  require(p.seq_len > 0, op, "seq_len must be > 0");
  require(p.partial != nullptr && p.n_partials >= 1, op, "needs an fp32 partial workspace (n_partials >= 1)");
  const int cols = static_cast<int>(p.cols);
  const int head_dim = static_cast<int>(p.head_dim);
  dispatch_x_w(p.x_dtype, p.w_dtype, op, [&](auto xt, auto wt) {
    using T = decltype(xt);
    using W = decltype(wt);
    constexpr int V = kVec<T>;
    const bool packed = (p.head_dim / 2) % V == 0 && packable(p.x, p.x_stride, p.rows, p.cols, V, sizeof(T)) &&
                        packable(p.dy, p.dy_stride, p.rows, p.cols, V, sizeof(T)) &&
                        packable(p.dx, p.dx_stride, p.rows, p.cols, V, sizeof(T)) &&
                        packable(p.w, 0, 1, p.cols, V, sizeof(W)) && aligned(p.cos, V * sizeof(float)) &&
                        aligned(p.sin, V * sizeof(float)) && aligned(p.partial, V * sizeof(float));
    launch_packed_or_scalar<V>(op, packed, [&](auto width) {
      const UnrotatedGrad<T, decltype(width)::value> grad{static_cast<const T*>(p.dy), p.dy_stride, p.cos, p.sin,
                                                          p.seq_len, head_dim};
      launch_norm_bwd<T, W>(op, p.x, p.x_stride, p.w, p.rstd, p.dx, p.dx_stride, p.dw, p.partial, p.n_partials,
                            p.rows, cols, grad, stream);
    });
  });
}

}  // namespace olmo2::cuda
