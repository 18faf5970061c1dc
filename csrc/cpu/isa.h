// The CPU kernels are compiled once per instruction set (CMakeLists.txt): each
// build of the kernel sources (every csrc/cpu/*.cpp but dispatch.cpp and
// info.cpp) and of the inline helpers in numeric.h and parallel.h lives in its
// own namespace, named by OLMO2_CPU_ISA, so the copies never share a symbol.
// dispatch.cpp, built for the baseline ISA, forwards each entry point of
// kernels.h to the copy the processor supports.
//
//   isa_baseline  x86-64 SSE2 / aarch64 NEON: runs everywhere
//   isa_avx2      x86-64 with AVX2 + FMA (built when the compiler accepts
//                 -mavx2 -mfma; chosen when the processor reports both)
#pragma once

#include <cstdint>

#include "common/params.h"
#include "cpu/kernels.h"

#ifndef OLMO2_CPU_ISA
#define OLMO2_CPU_ISA isa_baseline
#endif

// The per-ISA entry points, one declaration list for every namespace: one per
// entry point of the op table (common/op_table.h), and cast.
#define OLMO2_CPU_DECLARE_KERNELS                                               \
  OLMO2_OPS(OLMO2_CPU_DECLARE_KERNEL)                                           \
  void cast(const void* src, int src_dtype, void* dst, int dst_dtype, int64_t n);

namespace olmo2::cpu {
namespace isa_baseline {
OLMO2_CPU_DECLARE_KERNELS
}
namespace isa_avx2 {
OLMO2_CPU_DECLARE_KERNELS
}
}  // namespace olmo2::cpu
