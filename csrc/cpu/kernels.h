// The CPU kernels: C++17, OpenMP over rows, fp32 accumulation. Each entry point
// takes the parameter struct of its op (common/params.h); dtype codes are
// checked here (std::invalid_argument) and everything else by the caller.
#pragma once

#include <string>
#include <vector>

#include "common/params.h"

namespace olmo2::cpu {

// Instruction sets (cpu/isa.h). cpu_isas(): those built into this module and
// supported by this processor, baseline first, best last. set_cpu_isa("auto")
// picks the best; an unknown or unsupported name throws std::invalid_argument
// and changes nothing. The entry points below run the active one.
std::vector<std::string> cpu_isas();
std::vector<std::string> cpu_isas_built();
std::string cpu_isa();
void set_cpu_isa(const std::string& name);

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
