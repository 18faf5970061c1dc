// The layout of each parameter struct (common/params.h) as data: field names,
// types and offsets, generated from the op table. `_C.param_layouts()` returns
// it, and the CUDA emulation for tests (cuda/emulation.cpp) exports it as JSON
// so that the Python side builds its ctypes mirror of the structs from the
// library it calls instead of keeping a copy by hand.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "common/params.h"

namespace olmo2 {

struct FieldLayout {
  const char* name;
  const char* type;  // "pointer", "int64", "float32" or "int32"
  std::size_t offset;
};

struct ParamsLayout {
  const char* kernel;
  const char* params;
  std::size_t size;
  std::vector<FieldLayout> fields;
};

template <typename T>
constexpr const char* field_type_name() {
  if constexpr (std::is_pointer_v<T>) {
    return "pointer";
  } else if constexpr (std::is_same_v<T, int64_t>) {
    return "int64";
  } else if constexpr (std::is_same_v<T, float>) {
    return "float32";
  } else {
    static_assert(std::is_same_v<T, int>, "op table fields are pointers, int64_t, float or int");
    return "int32";
  }
}

inline std::vector<ParamsLayout> param_layouts() {
  std::vector<ParamsLayout> layouts;
#define OLMO2_FIELD_LAYOUT(type, name, ...) FieldLayout{#name, field_type_name<type>(), offsetof(P, name)},
#define OLMO2_PARAMS_LAYOUT(kernel, Params, FIELDS, doc)                           \
  {                                                                                \
    using P = Params;                                                              \
    layouts.push_back(ParamsLayout{#kernel, #Params, sizeof(P), {FIELDS(OLMO2_FIELD_LAYOUT)}}); \
  }
  OLMO2_OPS(OLMO2_PARAMS_LAYOUT)
#undef OLMO2_PARAMS_LAYOUT
#undef OLMO2_FIELD_LAYOUT
  return layouts;
}

// {"kernel": {"params": "Name", "size": n, "fields": [["name", "type", offset], ...]}, ...}
inline std::string param_layouts_json() {
  std::string json = "{";
  const char* sep = "";
  for (const ParamsLayout& l : param_layouts()) {
    json += sep;
    json += std::string("\"") + l.kernel + "\": {\"params\": \"" + l.params + "\", \"size\": " +
            std::to_string(l.size) + ", \"fields\": [";
    const char* field_sep = "";
    for (const FieldLayout& f : l.fields) {
      json += std::string(field_sep) + "[\"" + f.name + "\", \"" + f.type + "\", " + std::to_string(f.offset) + "]";
      field_sep = ", ";
    }
    json += "]}";
    sep = ", ";
  }
  return json + "}";
}

}  // namespace olmo2
