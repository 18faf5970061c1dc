// olmo2_kernels._C: the thin layer between Python and the framework-free kernels.
//
// Tensors cross this boundary as raw device pointers (Python ints), sizes and
// strides; the Python side (olmo2_kernels/_compiled.py) validates inputs,
// allocates outputs and picks the CUDA stream. Nothing here includes torch, so
// the module builds with a CPU-only torch installed (or none) and survives torch
// upgrades.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "cpu/info.h"

namespace py = pybind11;

#ifndef OLMO2_KERNELS_VERSION
#define OLMO2_KERNELS_VERSION "0.0.0"
#endif

static py::dict capabilities() {
  py::dict caps;
  caps["version"] = OLMO2_KERNELS_VERSION;
  caps["cpu"] = true;
  caps["openmp"] = olmo2::cpu::has_openmp();
  caps["cpu_threads"] = olmo2::cpu::max_threads();
#ifdef OLMO2_HAVE_CUDA
  caps["cuda"] = true;
  caps["cuda_archs"] = std::string(OLMO2_CUDA_ARCHS);
#else
  caps["cuda"] = false;
  caps["cuda_archs"] = std::string();
#endif
  return caps;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "olmo2_kernels compiled kernels (CPU, and CUDA when built with it)";
  m.def("version", []() { return std::string(OLMO2_KERNELS_VERSION); });
  m.def("capabilities", &capabilities, "What this build of the extension contains");
}
