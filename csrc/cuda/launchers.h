// The CUDA kernels' host entry points. Plain C++ (no CUDA headers), so the
// bindings compile with the host compiler alone. Each launches on `stream` (a
// cudaStream_t passed as void*), throws std::invalid_argument for arguments the
// kernels cannot take and std::runtime_error (with CUDA's message) when a
// launch fails. Launches are asynchronous: errors raised inside a kernel
// surface at the next synchronizing CUDA call.
#pragma once

#include "common/params.h"

namespace olmo2::cuda {

void rms_norm_fwd(const RmsNormFwdParams& p, void* stream);
// Needs p.partial: fp32 n_partials x cols, n_partials >= 1 (one row per block).
void rms_norm_bwd(const RmsNormBwdParams& p, void* stream);
void norm_rope_fwd(const NormRopeFwdParams& p, void* stream);
void norm_rope_bwd(const NormRopeBwdParams& p, void* stream);
void cross_entropy_fwd(const CrossEntropyFwdParams& p, void* stream);
void cross_entropy_bwd(const CrossEntropyBwdParams& p, void* stream);
void swiglu_fwd(const SwigluFwdParams& p, void* stream);
void swiglu_bwd(const SwigluBwdParams& p, void* stream);

}  // namespace olmo2::cuda
