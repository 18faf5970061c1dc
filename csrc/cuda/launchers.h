// The CUDA kernels' host entry points. Plain C++ (no CUDA headers), so the
// bindings compile with the host compiler alone. Each launches on `stream` (a
// cudaStream_t passed as void*), throws std::invalid_argument for arguments the
// kernels cannot take and std::runtime_error (with CUDA's message) when a
// launch fails. Launches are asynchronous: errors raised inside a kernel
// surface at the next synchronizing CUDA call.
#pragma once

#include "common/params.h"

namespace olmo2::cuda {

// One entry point per row of the op table (common/op_table.h):
//   void <kernel>(const <Params>& p, void* stream);
#define OLMO2_CUDA_DECLARE_LAUNCHER(kernel, Params, ...) void kernel(const Params& p, void* stream);
OLMO2_OPS(OLMO2_CUDA_DECLARE_LAUNCHER)
#undef OLMO2_CUDA_DECLARE_LAUNCHER

}  // namespace olmo2::cuda
