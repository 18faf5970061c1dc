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

// One entry point per row of the op table (common/op_table.h):
//   void <kernel>(const <Params>& p);
#define OLMO2_CPU_DECLARE_KERNEL(kernel, Params, ...) void kernel(const Params& p);
OLMO2_OPS(OLMO2_CPU_DECLARE_KERNEL)

// Converts n contiguous elements between dtypes (tests check the bf16/fp16
// rounding against torch's with it).
void cast(const void* src, int src_dtype, void* dst, int dst_dtype, int64_t n);

}  // namespace olmo2::cpu
