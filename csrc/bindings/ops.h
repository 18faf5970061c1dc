// The Python functions of the kernels, shared by the `cpu` and `cuda`
// submodules and generated from the op table (common/op_table.h).
//
// Every function takes keyword arguments only, named after the fields of its
// parameter struct: tensors as integer addresses (tensor.data_ptr()), sizes and
// row strides in elements, dtype codes (common/dtype.h), floats; and, last,
// `stream`, a CUDA stream handle (default 0; ignored by the CPU kernels). The
// arguments are packed into the struct and checked (checks.h); then the GIL is
// released and Backend runs the kernel.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <type_traits>

#include "bindings/checks.h"
#include "common/params.h"

namespace olmo2::bindings {

namespace py = pybind11;

// The Python-facing type of a field: addresses for pointers, double for float.
template <typename T>
struct py_arg {
  using type = T;
};
template <typename T>
struct py_arg<T*> {
  using type = std::uintptr_t;
};
template <>
struct py_arg<float> {
  using type = double;
};
template <typename T>
using py_arg_t = typename py_arg<T>::type;

template <typename T>
inline T from_py(py_arg_t<T> value) {
  if constexpr (std::is_pointer_v<T>) {
    return reinterpret_cast<T>(value);
  } else {
    return static_cast<T>(value);
  }
}

template <typename P, typename Launch>
inline void run(const P& params, std::uintptr_t stream, Launch&& launch) {
  check(params);
  py::gil_scoped_release no_gil;
  launch(params, reinterpret_cast<void*>(stream));
}

// Backend has a static void <kernel>(const Params&, void* stream) per entry point.
template <typename Backend>
void register_ops(py::module_& m) {
#define OLMO2_PY_PARAM(type, name, ...) py_arg_t<type> name,
#define OLMO2_SET_FIELD(type, name, ...) params.name = from_py<type>(name);
#define OLMO2_PY_ARG(type, name, ...) py::arg(#name),
#define OLMO2_BIND(kernel, Params, FIELDS, doc)                                            \
  m.def(                                                                                    \
      #kernel,                                                                              \
      [](FIELDS(OLMO2_PY_PARAM) std::uintptr_t stream) {                                    \
        Params params{};                                                                    \
        FIELDS(OLMO2_SET_FIELD)                                                             \
        run(params, stream, &Backend::kernel);                                              \
      },                                                                                    \
      py::kw_only(), FIELDS(OLMO2_PY_ARG) py::arg("stream") = std::uintptr_t{0}, doc);
  OLMO2_OPS(OLMO2_BIND)
#undef OLMO2_BIND
#undef OLMO2_PY_ARG
#undef OLMO2_SET_FIELD
#undef OLMO2_PY_PARAM
}

}  // namespace olmo2::bindings
