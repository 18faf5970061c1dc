// Dtype codes shared by the bindings, the CPU and the CUDA kernels.
//
// The Python side (olmo2_kernels/_compiled.py) maps torch dtypes to these codes;
// keep the two in sync.
#pragma once

#include <cstdint>

namespace olmo2 {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

inline bool valid_dtype_code(int code) { return code >= 0 && code <= 2; }

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
  }
  return "?";
}

inline int dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

}  // namespace olmo2
