// The CPU kernels: C++17, OpenMP over rows, fp32 accumulation. Each entry point
// takes the parameter struct of its op (common/params.h); dtype codes are
// checked here (std::invalid_argument) and everything else by the caller.
#pragma once

#include "common/params.h"

namespace olmo2::cpu {

// Threads the kernels use (the Python side mirrors torch.get_num_threads()).
void set_num_threads(int n);
int num_threads();

void rms_norm_fwd(const RmsNormFwdParams& p);
void rms_norm_bwd(const RmsNormBwdParams& p);
void norm_rope_fwd(const NormRopeFwdParams& p);
void norm_rope_bwd(const NormRopeBwdParams& p);
void cross_entropy_fwd(const CrossEntropyFwdParams& p);
void cross_entropy_bwd(const CrossEntropyBwdParams& p);
void swiglu_fwd(const SwigluFwdParams& p);
void swiglu_bwd(const SwigluBwdParams& p);

// Converts n contiguous elements between dtypes (tests check the bf16/fp16
// rounding against torch's with it).
void cast(const void* src, int src_dtype, void* dst, int dst_dtype, int64_t n);

}  // namespace olmo2::cpu
