// The arguments of every kernel as plain structs, generated from the op table
// (common/op_table.h): raw pointers, int64 sizes and row strides (in elements),
// dtype codes, in the table's field order. Shared by the CPU and CUDA launchers
// and filled by the bindings; nothing here knows about torch or CUDA.
#pragma once

#include <cstdint>

#include "common/op_table.h"

namespace olmo2 {

#define OLMO2_PARAMS_FIELD(type, name, ...) type name;
#define OLMO2_PARAMS_STRUCT(kernel, Params, FIELDS, doc) \
  struct Params {                                        \
    FIELDS(OLMO2_PARAMS_FIELD)                           \
  };
OLMO2_OPS(OLMO2_PARAMS_STRUCT)
#undef OLMO2_PARAMS_STRUCT
#undef OLMO2_PARAMS_FIELD

}  // namespace olmo2
