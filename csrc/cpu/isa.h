// The CPU kernels are compiled once per instruction set (CMakeLists.txt): each
// build of norms.cpp, cross_entropy.cpp and swiglu.cpp (and of the inline
// helpers in numeric.h and parallel.h) lives in its own namespace, named by
// OLMO2_CPU_ISA, so the copies never share a symbol. dispatch.cpp, built for
// the baseline ISA, forwards each entry point of kernels.h to the copy the
// processor supports.
//
//   isa_baseline  x86-64 SSE2 / aarch64 NEON: runs everywhere
//   isa_avx2      x86-64 with AVX2 + FMA (built when the compiler accepts
//                 -mavx2 -mfma; chosen when the processor reports both)
#pragma once

#include <cstdint>

#include "common/params.h"

#ifndef OLMO2_CPU_ISA
#define OLMO2_CPU_ISA isa_baseline
#endif

// The per-ISA entry points, one declaration list for every namespace.
#define OLMO2_CPU_DECLARE_KERNELS                                                 \
  void rms_norm_fwd(const RmsNormFwdParams& p);                                   \
  void rms_norm_bwd(const RmsNormBwdParams& p);                                   \
  void norm_rope_fwd(const NormRopeFwdParams& p);                                 \
  void norm_rope_bwd(const NormRopeBwdParams& p);                                 \
  void cross_entropy_fwd(const CrossEntropyFwdParams& p);                         \
  void cross_entropy_bwd(const CrossEntropyBwdParams& p);                         \
  void swiglu_fwd(const SwigluFwdParams& p);                                      \
  void swiglu_bwd(const SwigluBwdParams& p);                                      \
  void cast(const void* src, int src_dtype, void* dst, int dst_dtype, int64_t n);

namespace olmo2::cpu {
namespace isa_baseline {
OLMO2_CPU_DECLARE_KERNELS
}
namespace isa_avx2 {
OLMO2_CPU_DECLARE_KERNELS
}
}  // namespace olmo2::cpu
